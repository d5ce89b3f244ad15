"""Config-folder trigger: a new or changed training config under ``watch.dir`` starts a Jenkins build.

Editors and copy tools do not write a file in one step: vim writes ``4913`` and ``.x.yaml.swp``, emacs
``.#x.yaml`` and ``x.yaml~``, many tools write ``x.yaml.tmp`` then rename, and a large copy shows up
half-written. So:

* only ``*.yaml``/``*.yml`` files count, never hidden files or files in hidden folders, nor the editor
  leftovers above (:func:`is_candidate`);
* each path is debounced on its own: it is used only once it has had no event *and* kept the same size
  and mtime for ``debounce_s`` (a partial write keeps changing);
* a file whose content is the same as the last time it was handled (a ``touch``, an attribute change, a
  save without edits) is not handled again; files already in the folder at start are not triggered.

A settled file goes to ``validate(path)`` (the trainer's config validator: an error message or None).
Valid: ``trigger_build(job, {parameter: absolute path})``. Invalid: logged with the error, no build. When
Jenkins already has an identical build queued (it answers 303, not 201) the outcome is "already queued", a
success. A failed trigger (controller down; the job missing, disabled or without the parameter, which the
trigger checks before the first trigger and names) is logged, and the next change of the file triggers again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agentd.jenkins.settings import WatchSettings

log = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml")
_EDITOR_NAMES = ("4913",)                    # vim's "can I write here" probe file
_EDITOR_SUFFIXES = ("~", ".swp", ".swx", ".swo", ".tmp", ".part", ".bak", ".orig", ".crdownload")
_EDITOR_PREFIXES = (".", "#", ".#")          # hidden, emacs auto-save and lock files


def is_candidate(path: Path, root: Path) -> bool:
    """True when ``path`` (under ``root``) looks like a finished training config, not an editor's file."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return False
    if any(part.startswith(".") for part in relative.parts):
        return False
    name = path.name
    if name in _EDITOR_NAMES or name.startswith(_EDITOR_PREFIXES) or name.endswith(_EDITOR_SUFFIXES):
        return False
    return name.lower().endswith(CONFIG_SUFFIXES)


class WatchError(Exception):
    """The watch folder cannot be watched (missing, not a folder)."""


@dataclass
class _Pending:
    last_event: float          # time.monotonic() of the last event or observed change
    size: Optional[int]
    mtime_ns: Optional[int]


def _stat(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _digest(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "ConfigWatcher"):
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        if kind in ("created", "modified", "closed"):
            self._watcher._note(Path(os.fsdecode(event.src_path)))
        elif kind == "moved":
            self._watcher._forget(Path(os.fsdecode(event.src_path)))
            self._watcher._note(Path(os.fsdecode(event.dest_path)))
        elif kind == "deleted":
            self._watcher._forget(Path(os.fsdecode(event.src_path)))


class ConfigWatcher:
    """Watches ``settings.dir`` and triggers ``settings.job`` for each settled, valid config.

    ``trigger_build`` is :meth:`agentd.jenkins.builds.BuildTrigger.trigger_build`;
    ``validate`` returns an error message or None. :meth:`start` raises :class:`WatchError` when the folder
    is missing; nothing else raises out of the watcher.
    """

    def __init__(self, settings: WatchSettings, validate: Callable[[Path], Optional[str]],
                 trigger_build: Callable[[str, Mapping[str, str]], object]):
        self.settings = settings
        self.root = Path(os.path.abspath(settings.dir))
        self._validate = validate
        self._trigger = trigger_build
        self._lock = threading.Lock()
        self._pending: dict[Path, _Pending] = {}
        self._handled: dict[Path, str] = {}      # path -> sha256 of the content last handled
        self._stopping = threading.Event()
        self._observer: Optional[Observer] = None
        self._thread: Optional[threading.Thread] = None
        self._tick = min(0.2, settings.debounce_s / 4)
        self._counts = {"triggered": 0, "already_queued": 0, "rejected": 0, "trigger_failed": 0}
        self._last: Optional[dict] = None

    def start(self) -> None:
        """Start watching. Files already present are remembered, not triggered."""
        if not self.root.is_dir():
            raise WatchError(f"jenkins.watch.dir {self.root} does not exist or is not a folder")
        for path in self.root.rglob("*"):
            if path.is_file() and is_candidate(path, self.root):
                digest = _digest(path)
                if digest:
                    self._handled[path] = digest
        self._stopping.clear()
        self._observer = Observer()
        self._observer.schedule(_Handler(self), str(self.root), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._settle_loop, name="agentd-config-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s for training configs -> Jenkins job %s (%s=<path>)",
                 self.root, self.settings.job, self.settings.parameter)

    def stop(self) -> None:
        """Stop watching; pending (unsettled) files are dropped."""
        self._stopping.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def status(self) -> dict:
        """Counters and the last handled file, for ``agentd status``."""
        with self._lock:
            return {"dir": str(self.root), "job": self.settings.job, "parameter": self.settings.parameter,
                    "state": "watching" if self._thread and self._thread.is_alive() else "stopped",
                    "pending": len(self._pending), **self._counts,
                    "last": dict(self._last) if self._last else None}

    # -- events (watchdog's thread) ------------------------------------------------------------------

    def _note(self, path: Path) -> None:
        if not is_candidate(path, self.root):
            return
        stat = _stat(path)
        with self._lock:
            self._pending[path] = _Pending(time.monotonic(), *(stat or (None, None)))

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    # -- settling (own thread) -----------------------------------------------------------------------

    def _settle_loop(self) -> None:
        while not self._stopping.wait(self._tick):
            for path in self._settled_paths():
                try:
                    self._handle(path)
                except Exception:  # never let one file stop the watcher
                    log.exception("config watcher: error handling %s", path)

    def _settled_paths(self) -> list[Path]:
        """Paths quiet for ``debounce_s`` with the same size and mtime; removes them from pending."""
        now = time.monotonic()
        settled = []
        with self._lock:
            for path, pending in sorted(self._pending.items(), key=lambda item: item[1].last_event):
                if now - pending.last_event < self.settings.debounce_s:
                    continue
                stat = _stat(path)
                if stat is None:
                    del self._pending[path]
                elif stat != (pending.size, pending.mtime_ns):
                    pending.size, pending.mtime_ns = stat
                    pending.last_event = now            # still being written: wait another window
                else:
                    del self._pending[path]
                    settled.append(path)
        return settled

    def _handle(self, path: Path) -> None:
        digest = _digest(path)
        if digest is None or self._handled.get(path) == digest:
            return
        try:
            error = self._validate(path)
        except Exception as e:
            error = f"validator failed: {type(e).__name__}: {e}"
        if error:
            log.warning("config %s is invalid, no build triggered: %s", path, error)
            self._handled[path] = digest
            self._record(path, "rejected", error)
            return
        job, params = self.settings.job, {self.settings.parameter: str(path)}
        try:
            result = self._trigger(job, params)
        except Exception as e:
            log.error("config %s is valid but Jenkins job %s could not be triggered: %s", path, job, e)
            self._record(path, "trigger_failed", str(e))
            return
        self._handled[path] = digest
        if getattr(result, "already_queued", False):
            log.info("config %s: Jenkins job %s already has an identical build queued", path, job)
            self._record(path, "already_queued", None)
            return
        log.info("config %s: triggered Jenkins job %s (%s)", path, job, result)
        self._record(path, "triggered", None)

    def _record(self, path: Path, outcome: str, error: Optional[str]) -> None:
        with self._lock:
            self._counts[outcome] += 1
            self._last = {"path": str(path), "outcome": outcome, "error": error, "at": time.time()}
