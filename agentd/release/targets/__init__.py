"""Release targets, one module per type; each builds a target object with the same five methods:

    check(rel)              refuse before anything is copied (a family the server cannot serve, a rank too high)
    publish(rel, local)     copy the files under the versioned name (and load them, on a server)
    activate(rel)           make an already-copied version live again (rollback: no copying)
    verify(rel, live)       problems with this version's copy (hashes against the manifest; `live`: the
                            server must list it)
    remove(rel)             take this version's copy away (a promote that failed elsewhere)

`rel` is the release record (name, version, artifact, sha256, files, family, lora_rank, ...); `local` the
LocalArtifact on this box. Storage targets (folder, s3) also hold the registry (`Storage` below).
"""
from __future__ import annotations

import importlib
import json
import os
import threading
from pathlib import Path

from agentd.release import ReleaseError
from agentd.release.artifact import keys_of, manifest_key

MODULES = {"folder": "folder", "s3": "s3", "a1111": "a1111", "comfyui": "comfyui", "vllm": "vllm"}


def make_target(name: str, settings, secret):
    """The target object for settings `settings` (its `type` picks the module); `secret` may be None."""
    module = importlib.import_module(f"agentd.release.targets.{MODULES[settings.type]}")
    return module.make(name, settings, secret)


class Storage:
    """Files under keys (NAME/...): what folder and s3 implement, and the registry reads and writes through."""

    name: str

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...  # atomic: whole or absent
    def append(self, key: str, line: str) -> None: ...
    def upload(self, key: str, src: Path, sha256: str) -> None: ...
    def head(self, key: str) -> dict | None: ...  # {"size", "sha256"} (sha256 as recorded, or hashed)
    def download(self, key: str, dest: Path) -> None: ...
    def delete(self, key: str) -> None: ...
    def names(self) -> list[str]: ...  # the release names that have a folder / prefix here

    # --- the target interface, the same for every storage ----------------------------------------
    def check(self, rel: dict) -> None:
        return None

    def publish(self, rel: dict, local) -> None:
        """Every file, then the manifest: a copy without its manifest is incomplete and never verifies."""
        keys = keys_of(rel["name"], rel["artifact"], rel["files"])
        for relpath, key in keys.items():
            self.upload(key, local.source(relpath), rel["files"][relpath]["sha256"])
        self.put(manifest_key(rel["name"], rel["artifact"]), json.dumps(manifest(rel), indent=1).encode())

    def activate(self, rel: dict) -> None:
        return None

    def verify(self, rel: dict, live: bool = False) -> list[str]:
        raw = self.get(manifest_key(rel["name"], rel["artifact"]))
        if raw is None:
            return [f"{self.name}: {rel['artifact']} has no manifest (an incomplete copy): promote again or "
                    "restore it from the backup"]
        files = json.loads(raw)["files"]
        problems = []
        for relpath, key in keys_of(rel["name"], rel["artifact"], files).items():
            want = files[relpath]
            got = self.head(key)
            if got is None:
                problems.append(f"{self.name}: {key} is missing (manifest sha256 {want['sha256']})")
            elif got["sha256"] != want["sha256"] or got["size"] != want["size"]:
                problems.append(f"{self.name}: {key} does not match its manifest: sha256 {got['sha256']} size "
                                f"{got['size']}, manifest sha256 {want['sha256']} size {want['size']}")
        return problems

    def remove(self, rel: dict) -> None:
        self.delete(manifest_key(rel["name"], rel["artifact"]))  # first: what remains is marked incomplete
        for key in keys_of(rel["name"], rel["artifact"], rel["files"]).values():
            self.delete(key)

    def fetch(self, rel: dict, dest: Path) -> Path:
        """Download this version into folder `dest` and check every file's sha256 against the manifest
        (restore and resolve: a download is hashed, never trusted). Returns the file or folder."""
        raw = self.get(manifest_key(rel["name"], rel["artifact"]))
        if raw is None:
            raise ReleaseError(f"{self.name}: {rel['name']} v{rel['version']} has no manifest here "
                               f"({rel['artifact']}.manifest.json): it was never completely copied to {self.name}")
        files = json.loads(raw)["files"]
        from agentd.release.artifact import sha256_file

        out = Path(dest) / rel["artifact"]
        for relpath, key in keys_of(rel["name"], rel["artifact"], files).items():
            target = out if relpath == "" else out / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            self.download(key, tmp)
            got = sha256_file(tmp)
            if got != files[relpath]["sha256"]:
                tmp.unlink(missing_ok=True)
                raise ReleaseError(f"{self.name}: {key} downloaded with sha256 {got}, but its manifest says "
                                   f"{files[relpath]['sha256']}: the copy on {self.name} is corrupt; restore "
                                   "from another target")
            tmp.replace(target)
        return out


def temporary_path(path: Path) -> Path:
    """Where a copy of `path` is written before its rename: a hidden name no other writer shares (processes and
    the daemon's threads), found again by `partial_copies` when a killed daemon left it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def partial_copies(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.tmp-*"))


def manifest(rel: dict) -> dict:
    return {"name": rel["name"], "version": rel["version"], "artifact": rel["artifact"], "sha256": rel["sha256"],
            "files": rel["files"]}
