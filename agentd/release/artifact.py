"""A run's LoRA as the set of files a release copies, each with its sha256.

Image runs release `<name>.safetensors` (one file), text runs `<name>-peft/` (a PEFT adapter folder).
In a release it is renamed `NAME-vN-<sha256[:12]>.safetensors` (or that folder name): the name is never
reused, so no server can serve a stale copy under it. A folder's sha256 is that of its manifest lines
(`<sha256>  <relative path>`, sorted), so one hash names either kind.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(files: dict[str, dict]) -> str:
    lines = "".join(f"{files[rel]['sha256']}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class LocalArtifact:
    """Files on this box: `root` is the .safetensors file or the PEFT folder."""

    root: Path
    files: dict  # relative path inside the folder ("" for a single file) -> {"sha256", "size"}

    @property
    def is_folder(self) -> bool:
        return "" not in self.files

    @property
    def sha256(self) -> str:
        return self.files[""]["sha256"] if not self.is_folder else folder_digest(self.files)

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def source(self, rel: str) -> Path:
        return self.root if rel == "" else self.root / rel


def read_artifact(root: Path) -> LocalArtifact:
    root = Path(root)
    if root.is_file():
        return LocalArtifact(root, {"": {"sha256": sha256_file(root), "size": root.stat().st_size}})
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return LocalArtifact(root, files)


def release_name(name: str, version: int, sha256: str, is_folder: bool) -> str:
    """The immutable name of version `version`: NAME-vN-<sha256[:12]>(.safetensors)."""
    stem = f"{name}-v{version}-{sha256[:12]}"
    return stem if is_folder else f"{stem}.safetensors"


def keys_of(name: str, artifact: str, files: dict) -> dict[str, str]:
    """relative path -> storage key (NAME/<artifact> for a file, NAME/<artifact>/<rel> for a folder's files)."""
    return {rel: f"{name}/{artifact}" if rel == "" else f"{name}/{artifact}/{rel}" for rel in files}


def manifest_key(name: str, artifact: str) -> str:
    return f"{name}/{artifact}.manifest.json"
