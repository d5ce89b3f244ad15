"""`folder` target: a NAS mount or any folder. Files are written to a temporary name in the same folder,
fsynced, then renamed (a reader sees the whole file or none); the folder is fsynced after the rename."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from agentd.release import ReleaseError
from agentd.release.artifact import sha256_file
from agentd.release.targets import Storage, partial_copies, temporary_path
from trainer.api import fsync_dir


class FolderStorage(Storage):
    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _ready(self) -> None:
        if not self.root.is_dir():
            raise ReleaseError(f"target {self.name}: folder {self.root} does not exist or is not mounted: mount "
                               f"it or fix release.targets.{self.name}.path")

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            self._ready()
            return None

    def put(self, key, data):
        self._ready()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def append(self, key, line):
        self._ready()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line.rstrip("\n") + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def upload(self, key, src, sha256):
        self._ready()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ReleaseError(f"target {self.name}: cannot write {path}: {e.strerror}; check the folder's "
                               "free space and that the daemon may write it") from None
        fsync_dir(path.parent)

    def head(self, key):
        path = self._path(key)
        if not path.is_file():
            return None
        return {"size": path.stat().st_size, "sha256": sha256_file(path)}

    def download(self, key, dest):
        shutil.copyfile(self._path(key), dest)

    def delete(self, key):
        path = self._path(key)
        path.unlink(missing_ok=True)
        for partial in partial_copies(path):  # a copy cut short by a killed daemon
            partial.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()) and parent.parent != self.root:
            parent.rmdir()  # a PEFT folder's emptied sub-folders (never NAME/ itself)
            parent = parent.parent

    def names(self):
        self._ready()
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "registry.jsonl").is_file())


def make(name, settings, secret):
    return FolderStorage(name, settings.path)

