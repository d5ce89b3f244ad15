"""A small LRU of frozen base models, so the daemon's next job on the same base skips loading it.

Polite to a shared GPU: a base stays on the GPU only while a job uses it and for `warm_vram_ttl_s`
after (a queue of jobs on the same base keeps it there); then `offload_expired` (the daemon's main
loop calls it every tick) moves it to host memory and returns the GPU memory to the driver, so an idle
agentd holds ~0 VRAM that a colleague's notebook or the VRAM gate would otherwise see as taken. The
next job moves it back to its device (`get` measures the move: far faster than loading from disk).

The key says what was loaded and how: resolved path, the file's (or folder's key files') size and
mtime, family and dtype - not the device, since entries move. A changed file on disk is a different
key. Jobs add their LoRA layers to a cached base and remove them when they end (the task's `detach`),
so the cached object is always the plain base model.

A base is any object whose torch modules are attributes (the families' `SdBase`, `TextBase`
dataclasses) or a module itself. torch is imported only when a base moves.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
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


def modules_of(base) -> list:
    """The torch modules a base holds (itself, or its attributes that are modules)."""
    import torch

    if isinstance(base, torch.nn.Module):
        return [base]
    return [v for v in vars(base).values() if isinstance(v, torch.nn.Module)]


def tensor_bytes(base) -> int:
    """Bytes of the base's parameters and buffers."""
    return sum(t.numel() * t.element_size() for m in modules_of(base)
               for t in [*m.parameters(), *m.buffers()])


def move_base(base, device) -> None:
    """Move every module of `base` to `device` (in place)."""
    for m in modules_of(base):
        m.to(device)


def _is_host(device) -> bool:
    return str(device).split(":")[0] in ("cpu", "None")


@dataclass
class _Entry:
    base: object
    device: str  # where its tensors are now ("cpu" = host memory)
    mib: float
    users: int = 0
    released_at: float | None = None  # when the last job using it ended (clock time)


class BaseModelCache:
    def __init__(self, capacity: int = 1, warm_vram_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.warm_vram_ttl_s = warm_vram_ttl_s
        self._clock = clock
        self._items: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.last_move_s: float | None = None

    def get(self, key: tuple, load: Callable[[], object], device=None) -> tuple[object, str, float | None]:
        """(base, how, move_s): the base for `key` on `device`, and how it was had - "device" (still warm
        there), "host" (moved back from host memory, taking move_s seconds) or "cold" (loaded by `load()`,
        which puts it on the device)."""
        device = str(device) if device is not None else "cpu"
        with self._lock:
            entry = self._items.get(key)
            in_use = False
            if entry is not None:
                self._items.move_to_end(key)
                entry.users += 1  # released by this job's release(key) like any other user's
                in_use = entry.users > 1
                self.hits += 0 if in_use else 1
        if entry is not None and not in_use:
            if entry.device == device:
                return entry.base, "device", None
            t0 = time.perf_counter()
            move_base(entry.base, device)
            moved = round(time.perf_counter() - t0, 3)
            with self._lock:
                entry.device = device
                self.last_move_s = moved
            return entry.base, "host", moved
        # Not cached, or another job trains on the cached base right now (it carries that job's LoRA layers and
        # sits on its device: two jobs on one box's CPU slots, or GPUs, with the same base): a copy of its own.
        base = load()
        with self._lock:
            self.misses += 1
            if entry is None and self.capacity > 0:
                self._items[key] = _Entry(base, device, round(tensor_bytes(base) / 2**20, 1), users=1)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return base, "cold", None

    def release(self, key: tuple) -> None:
        """A job using `key` ended: its base may stay on the device for `warm_vram_ttl_s`."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                entry.users = max(0, entry.users - 1)
                entry.released_at = self._clock()
        if self.warm_vram_ttl_s <= 0:
            self.offload_expired()

    def offload_expired(self, force: bool = False) -> list[tuple]:
        """Move to host memory every unused entry on a GPU whose TTL ran out (all unused ones with
        `force`, e.g. when the VRAM gate needs the room); returns their keys."""
        now = self._clock()
        with self._lock:
            due = [(k, e) for k, e in self._items.items()
                   if e.users == 0 and not _is_host(e.device)
                   and (force or e.released_at is None or now - e.released_at >= self.warm_vram_ttl_s)]
        for _, e in due:
            move_base(e.base, "cpu")
            e.device = "cpu"
        if due:
            _return_gpu_memory()
        return [k for k, _ in due]

    def discard(self, key: tuple) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)

    def info(self) -> dict:
        """What status shows: entries, hits/misses, what sits on a GPU and in host memory, when it moves."""
        now = self._clock()
        with self._lock:
            entries = list(self._items.values())
        on_device = [e for e in entries if not _is_host(e.device)]
        expires = [max(0.0, self.warm_vram_ttl_s - (now - e.released_at)) for e in on_device
                   if e.users == 0 and e.released_at is not None]
        return {"entries": len(entries), "hits": self.hits, "misses": self.misses, "on_device": len(on_device),
                "device_mib": round(sum(e.mib for e in on_device), 1),
                "host_mib": round(sum(e.mib for e in entries if _is_host(e.device)), 1),
                "warm_vram_ttl_s": self.warm_vram_ttl_s,
                "device_expires_in_s": round(min(expires), 1) if expires else None}

    def device_of(self, key: tuple) -> str | None:
        with self._lock:
            entry = self._items.get(key)
            return entry.device if entry else None


def _return_gpu_memory() -> None:
    """Hand the freed blocks back to the driver, so nvidia-smi and other processes see them free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
