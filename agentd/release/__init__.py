"""Releases: a registry per LoRA name, publishing to storage and inference servers, the gate, rollback, backup.

    settings.py   the `release:` section of agentd.yaml (targets by type, registry, default_to, backup)
    credentials.py  a target's secret from a systemd credential or a daemon-only file
    registry.py   the registry's records and aliases: pure decisions (versions, gate, alias moves)
    artifact.py   a run's LoRA as files with their sha256 (a .safetensors file or a PEFT folder)
    targets/      one module per target type: folder, s3 (storage), a1111, comfyui, vllm (servers)
    service.py    the daemon's side: promote, list, rollback, verify, backup, restore, resolve (one lock per name)
"""


class ReleaseError(Exception):
    """A release refused or failed; the message names what (a target, a version, a file) and how to fix it.
    It never holds a secret. `details` go to the client as they are (e.g. the metric deltas of a refusal)."""

    def __init__(self, message: str, code: str = "release_failed", **details):
        super().__init__(message)
        self.code = code
        self.details = details
