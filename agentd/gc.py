"""Retention: what `agentd gc` and the daemon's daily pass remove.

- journal entries (jobs, transitions, events) of jobs that ended more than `retention_days` ago;
- files in the daemon's cache folder not modified for `retention_days` (agent.jar is re-fetched; the jobs'
  on-disk latents and text embeddings under latents/ and text/ are re-encoded when next needed, and every
  cache hit touches its file, so entries in use stay);
- with `gc_user_outputs: true` only: checkpoints beyond each journaled job's `keep_checkpoints` in its
  output folder; and, with a release backup target (`release.backup`), every checkpoint older than
  `retention_days` of a run (the current one or one in its history, `runs/<id>/`) whose LoRA (released, or
  kept: `release: {keep: true}`) has a verified copy on the backup target: never one whose LoRA has none.
  The run's LoRA, run.json and logs stay. User outputs are never touched otherwise.

`collect(..., dry_run=True)` returns exactly the list a real run acts on.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path


def plan(settings, journal, now: float | None = None, releases=None) -> list[tuple[str, str]]:
    """(kind, target) pairs to remove: kind is journal | cache | checkpoint | released-checkpoint.
    `releases`: the daemon's agentd.release.service.Releases (None: no release-aware pruning)."""
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
        from trainer.api import list_checkpoints

        seen = set()
        for r in journal.jobs():
            out = r.get("output_dir")
            if not out or out in seen or r["state"] in ("queued", "gated", "running", "interrupted"):
                continue
            seen.add(out)
            keep = int((r.get("resolved") or {}).get("keep_checkpoints") or 3)
            actions += [("checkpoint", str(p)) for p in list_checkpoints(out)[keep:]]
        if releases is not None and settings.release.backup:
            taken = {t for _, t in actions}
            actions += [a for a in released_checkpoints(sorted(seen), releases, cutoff) if a[1] not in taken]
    return actions


def released_checkpoints(output_dirs: list[str], releases, cutoff: float) -> list[tuple[str, str]]:
    """Checkpoints older than `cutoff` of the runs in `output_dirs` (and their runs/<id>/ history) whose LoRA
    hashes to a released or kept LoRA verified on the backup target."""
    from agentd.release import ReleaseError
    from agentd.release.artifact import read_artifact
    from agentd.release.service import read_run, run_lora

    backed_up = releases.backed_up()
    out = []
    for folder in output_dirs:
        history = Path(folder) / "runs"
        runs = [Path(folder)] + (sorted(p for p in history.iterdir() if p.is_dir()) if history.is_dir() else [])
        for run_dir in runs:
            try:
                sha = read_artifact(run_lora(run_dir, read_run(run_dir))).sha256
            except (ReleaseError, OSError):
                continue  # not a finished run with a LoRA: nothing of it is backed up
            if sha not in backed_up:
                continue
            checkpoints = run_dir / "checkpoints"
            if checkpoints.is_dir():
                out += [("released-checkpoint", str(p)) for p in sorted(checkpoints.iterdir())
                        if p.is_dir() and p.stat().st_mtime < cutoff]
    return out


def collect(settings, journal, dry_run: bool, now: float | None = None, releases=None) -> list[tuple[str, str]]:
    actions = plan(settings, journal, now, releases)
    if dry_run:
        return actions
    journal.delete_jobs([t for k, t in actions if k == "journal"])
    for kind, target in actions:
        if kind in ("cache", "latent-cache", "text-cache"):
            Path(target).unlink(missing_ok=True)
        elif kind in ("checkpoint", "released-checkpoint"):
            shutil.rmtree(target, ignore_errors=True)
    return actions
