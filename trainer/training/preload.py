"""Import the whole training stack before the first job needs it (the daemon's warm-up)."""
from __future__ import annotations

import threading

from trainer.families import FAMILIES
from trainer.runs.report import use_headless_matplotlib

_preload_lock = threading.Lock()


def preload_all() -> None:
    """Import the whole training stack: every family's loading stack and the report's matplotlib.

    The daemon does this once in the background, so the first job starts warm, and each job thread calls
    it before training. The lock makes the job wait for a preload in progress: two threads importing the
    same packages for the first time can meet in a cross-thread import cycle, where Python hands one of
    them a half-initialised module (seen: sympy's optional matplotlib probe under diffusers vs. the
    report's `import matplotlib`, "module 'matplotlib' has no attribute 'get_data_path'")."""
    with _preload_lock:
        import trainer.training.job  # noqa: F401  (torch)

        use_headless_matplotlib()
        for m in FAMILIES.values():
            m.preload()
