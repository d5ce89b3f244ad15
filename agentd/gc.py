"""Retention: what `agentd gc` and the daemon's daily pass remove.

- journal entries (jobs, transitions, events) of jobs that ended more than `retention_days` ago;
- files in the daemon's cache folder not modified for `retention_days` (agent.jar is re-fetched; the jobs'
  on-disk latents and text embeddings under latents/ and text/ are re-encoded when next needed, and every
  cache hit touches its file, so entries in use stay);
- with `gc_user_outputs: true` only: checkpoints beyond each journaled job's `keep_checkpoints` in its
  output folder. User outputs are never touched otherwise.

`collect(..., dry_run=True)` returns exactly the list a real run acts on.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path


def plan(settings, journal, now: float | None = None) -> list[tuple[str, str]]:
    """(kind, target) pairs to remove: kind is journal | cache | checkpoint."""
    now = time.time() if now is None else now
    cutoff = now - settings.retention_days * 86400
    actions: list[tuple[str, str]] = [("journal", r["id"]) for r in journal.expired(cutoff)]
    cache = Path(settings.cache_dir)
    if cache.is_dir():
        for p in sorted(cache.rglob("*")):
            if p.is_file() and p.stat().st_mtime < cutoff:
                kind = {"latents": "latent-cache", "text": "text-cache"}.get(p.relative_to(cache).parts[0], "cache")
                actions.append((kind, str(p)))
    if settings.gc_user_outputs:
        from trainer.runs.checkpoint import list_checkpoints

        seen = set()
        for r in journal.jobs():
            out = r.get("output_dir")
            if not out or out in seen or r["state"] in ("queued", "gated", "running", "interrupted"):
                continue
            seen.add(out)
            keep = int((r.get("resolved") or {}).get("keep_checkpoints") or 3)
            actions += [("checkpoint", str(p)) for p in list_checkpoints(Path(out) / "checkpoints")[keep:]]
    return actions


def collect(settings, journal, dry_run: bool, now: float | None = None) -> list[tuple[str, str]]:
    actions = plan(settings, journal, now)
    if dry_run:
        return actions
    journal.delete_jobs([t for k, t in actions if k == "journal"])
    for kind, target in actions:
        if kind in ("cache", "latent-cache", "text-cache"):
            Path(target).unlink(missing_ok=True)
        elif kind == "checkpoint":
            shutil.rmtree(target, ignore_errors=True)
    return actions
