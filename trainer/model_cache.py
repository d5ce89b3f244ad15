"""A small LRU of frozen base models, so the daemon's next job on the same base skips loading it.

The key says what was loaded and how: resolved path, the file's (or folder's key files') size and
mtime, mode, dtype and device. A changed file on disk is a different key. Jobs add their LoRA layers
to a cached base and remove them when they end (`ImageTask.detach`), so the cached object is always
the plain base model.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable


def file_identity(path: Path) -> tuple:
    """Size and mtime of a checkpoint file, or of every file in a model folder (cheap: stat only)."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in path.rglob("*") if p.is_file()))


class BaseModelCache:
    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, load: Callable[[], object]) -> tuple[object, bool]:
        """The cached base for `key` (and True), or a fresh one from `load()` (and False)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key], True
        base = load()
        with self._lock:
            self.misses += 1
            if self.capacity > 0:
                self._items[key] = base
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return base, False

    def discard(self, key: tuple) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)
