"""The `release:` section of agentd.yaml: where released LoRAs go, and where their credentials are.

    release:
      registry: nas                 # the storage target that holds NAME/registry.jsonl and NAME/aliases.json
      default_to: [nas, webui]      # targets of a promote without --to (default: the registry alone)
      backup: offsite               # the storage target `agentd backup` copies released LoRAs to (optional)
      targets:
        nas:    {type: folder, path: /mnt/nas/loras}
        bucket: {type: s3, bucket: loras, endpoint_url: "https://minio:9000", credential: s3-loras}
        webui:  {type: a1111, url: "http://127.0.0.1:7860", lora_dir: /srv/webui/models/Lora}
        comfy:  {type: comfyui, url: "http://127.0.0.1:8188", lora_dir: /srv/comfy/models/loras}
        chat:   {type: vllm, url: "http://127.0.0.1:8000", lora_dir: /srv/vllm/loras, max_lora_rank: 16}

Targets are box-level: they carry credentials, and builds never see them. A credential is never a setting
value: `credential` names a systemd credential (`LoadCredential=NAME:/path` in the unit, read from
$CREDENTIALS_DIRECTORY/NAME, as the Jenkins token), `credential_file` a file only the daemon may read.
S3 without either uses boto3's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of the daemon, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

STORAGE_TYPES = ("folder", "s3")
IMAGE_FAMILIES = ["sd", "sdxl", "flux"]


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    credential: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of a systemd credential ($CREDENTIALS_DIRECTORY/NAME) holding this target's secret."""
    credential_file: Optional[Path] = None
    """A file only the daemon may read holding this target's secret (mode 0600)."""
    timeout_s: float = Field(30, gt=0)
    """Per request: a target that does not answer within this long fails the release (named, nothing moved)."""

    @model_validator(mode="after")
    def _one_secret_source(self):
        if self.credential is not None and self.credential_file is not None:
            raise ValueError("set only one of credential, credential_file")
        return self


class FolderTarget(_Target):
    type: Literal["folder"]
    path: Path
    """A NAS mount or any folder: NAME/ holds the immutable files, their manifests and the registry."""


class S3Target(_Target):
    type: Literal["s3"]
    bucket: str = Field(min_length=3)
    """The bucket (it must exist: agentd never creates one)."""
    prefix: str = ""
    """Key prefix inside the bucket (e.g. loras/)."""
    endpoint_url: Optional[str] = None
    """An S3-compatible store (MinIO, Ceph, R2, ...); unset: AWS."""
    region: Optional[str] = None
    """Region name (boto3's default chain when unset)."""
    checksums: Optional[Literal["when_required", "when_supported"]] = None
    """boto3's request_checksum_calculation. Default: when_required with an endpoint_url (boto3 >= 1.36 sends
    CRC checksums many S3-compatible stores refuse, boto3 #4392), boto3's own default on AWS.
    The credential holds `ACCESS_KEY_ID:SECRET_ACCESS_KEY` on its first line."""


class _ServerTarget(_Target):
    url: str = Field(pattern=r"^https?://")
    """The server's base URL."""
    lora_dir: Path
    """The server's LoRA folder as this box sees it (the server must see the same files)."""


class A1111Target(_ServerTarget):
    type: Literal["a1111"]
    families: list[Literal["sd", "sdxl", "flux"]] = Field(default_factory=lambda: list(IMAGE_FAMILIES))
    """Model families the server's checkpoint can use (a LoRA of another family is refused)."""
    # credential: `user:password` of its --api-auth (HTTP basic).


class ComfyUITarget(_ServerTarget):
    type: Literal["comfyui"]
    families: list[Literal["sd", "sdxl", "flux"]] = Field(default_factory=lambda: list(IMAGE_FAMILIES))
    """Model families the server's workflows use (a LoRA of another family is refused)."""
    # credential: a bearer token for the reverse proxy in front of it (ComfyUI itself has no auth).


class VllmTarget(_ServerTarget):
    type: Literal["vllm"]
    max_lora_rank: Optional[int] = Field(None, ge=1)
    """The server's --max-lora-rank: an adapter of a higher rank is refused before loading."""
    keep: int = Field(2, ge=1)
    """Versions of one name kept loaded; older ones are unloaded (their files stay for a rollback)."""
    canary_prompt: Optional[str] = None
    """A prompt completed greedily (8 tokens) with the new adapter after loading, to prove it serves."""
    # credential: the server's --api-key (sent as a bearer token).


Target = Annotated[Union[FolderTarget, S3Target, A1111Target, ComfyUITarget, VllmTarget], Field(discriminator="type")]


class ReleaseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    registry: Optional[str] = None
    """The folder or s3 target that holds each name's registry.jsonl and aliases.json. Unset: no releases."""
    targets: dict[str, Target] = Field(default_factory=dict)
    """Where releases go, by name."""
    default_to: list[str] = Field(default_factory=list)
    """Targets of a promote that names none (default: the registry target)."""
    backup: Optional[str] = None
    """A folder or s3 target every released version is copied to (daily, and `agentd backup`)."""

    @model_validator(mode="after")
    def _check_names(self):
        problems = []
        names = ", ".join(sorted(self.targets)) or "none defined"
        for field, value, storage in [("registry", self.registry, True), ("backup", self.backup, True),
                                      *(("default_to", n, False) for n in self.default_to)]:
            if value is None:
                continue
            if value not in self.targets:
                problems.append(f"release.{field}: unknown target {value!r} (targets: {names}); add it under "
                                 "release.targets or fix the name")
            elif storage and self.targets[value].type not in STORAGE_TYPES:
                problems.append(f"release.{field}: target {value!r} is a {self.targets[value].type} server; "
                                f"it must be a folder or s3 target")
        if self.targets and self.registry is None:
            problems.append("release.registry: targets are set but no registry: name the folder or s3 target "
                            "that keeps the registry")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def enabled(self) -> bool:
        return self.registry is not None

    def promote_targets(self) -> list[str]:
        return list(self.default_to) or [self.registry]
