"""Runs in one output_dir: the resume / new run / nothing to do / refuse decision, the manifest-only move
to runs/<run-id>/, keep_runs, and the CI loop through the real `lora-train` and the real daemon."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, write_config
from tests.daemon_harness import DaemonProc, Tail
from trainer.runs.checkpoint import Candidate
from trainer.runs.history import (MANIFEST, PreviousRun, RunManifest, UnsafeHistory, decide_run, move_aside,
                          prune_history, read_manifest, read_previous, recover_moves)

FIELDS = {"learning_rate": 0.002, "lora_rank": 4}
DEFAULTS = {"learning_rate": 0.0001, "lora_rank": 8, "validation_split": None}


def prev(status="succeeded", **fields) -> PreviousRun:
    return PreviousRun("20261201-000000-abcdef", status, {**FIELDS, **fields}, "fp", 1_700_000_000.0, 6, 0.5)


def ckpt(step=4, **fields) -> Candidate:
    return Candidate(Path(f"/o/checkpoints/step-{step:08d}"), step, None, {**FIELDS, **fields}, "fp")


def decide(policy, previous, candidates=(), fields=FIELDS, fp="fp"):
    return decide_run(policy, fields, fp, previous, list(candidates), DEFAULTS, "runs", Path("/o/checkpoints"))


def test_decision_finished_run():
    same = decide("auto", prev())
    assert same.action == "nothing" and "already trained at 2023-11-14" in same.reason
    assert "(run 20261201-000000-abcdef): nothing to do" in same.reason
    changed = decide("auto", prev(learning_rate=0.001), [ckpt(learning_rate=0.001)])
    assert changed.action == "new" and changed.move_previous
    assert changed.reason.startswith("config changed since the last run (learning_rate 0.001 -> 0.002)")
    assert "the previous one is kept in runs/20261201-000000-abcdef" in changed.reason
    data = decide("auto", prev(), fp="other")
    assert data.action == "new" and "dataset: files or captions changed" in data.reason
    strict = decide("strict", prev(learning_rate=0.001))
    assert strict.action == "refuse" and "learning_rate 0.001 -> 0.002" in strict.reason
    assert decide("strict", prev()).action == "nothing"
    again = decide("never", prev())
    assert again.action == "new" and again.move_previous and again.reason.startswith("resume: never")
    # a key an older run.json lacks counts as its default: no spurious "config changed"
    old = PreviousRun("r", "succeeded", dict(FIELDS), "fp", 1.0)
    assert decide("auto", old, fields={**FIELDS, "validation_split": None}).action == "nothing"


def test_decision_interrupted_run():
    for status in ("running", "cancelled", "failed"):
        d = decide("auto", prev(status), [ckpt(6), ckpt(4)])
        assert d.action == "resume" and d.checkpoint.name == "step-00000006" and not d.move_previous
        assert "resuming the interrupted run 20261201-000000-abcdef from step 6" in d.reason
    changed = decide("auto", prev("cancelled", learning_rate=0.001), [ckpt(learning_rate=0.001)])
    assert changed.action == "new" and changed.move_previous and "learning_rate 0.001 -> 0.002" in changed.reason
    strict = decide("strict", prev("cancelled", learning_rate=0.001), [ckpt(learning_rate=0.001)])
    assert strict.action == "refuse" and "resume: auto" in strict.reason
    bad = Candidate(Path("/o/checkpoints/step-00000008"), 8, "rng.pt missing")
    fallback = decide("auto", prev("cancelled"), [bad, ckpt(4)])
    assert fallback.action == "resume" and fallback.checkpoint.name == "step-00000004" and fallback.warnings
    nothing_usable = decide("auto", prev("failed"), [bad])
    assert nothing_usable.action == "new" and "left no usable checkpoint" in nothing_usable.reason
    assert decide("auto", None).action == "new" and decide("auto", None).reason == "starting the first run in output_dir"


def _run_files(out: Path) -> None:
    for rel in ("run.json", "config.yaml", "logs/loss.csv", "checkpoints/step-00000002/lora.safetensors"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(rel)
    m = RunManifest(out, "run-a")
    m.add("run.json", "config.yaml", "logs/loss.csv", out / "checkpoints/step-00000002", "gone.png")


def test_move_aside_moves_only_the_manifest_files(tmp_path):
    out = tmp_path / "out"
    _run_files(out)
    (out / "notes.txt").write_text("mine")  # the user's files, in and beside the run's folders
    (out / "logs/mine.log").write_text("mine")
    (out / "checkpoints/step-00000099").mkdir()
    moved = move_aside(out, out / "runs", "run-a")
    assert moved == out / "runs/run-a"
    assert sorted(str(p.relative_to(moved)) for p in moved.rglob("*") if p.is_file()) == [
        "checkpoints/step-00000002/lora.safetensors", "config.yaml", "logs/loss.csv", MANIFEST, "run.json"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "logs/mine.log").exists()
    assert (out / "checkpoints/step-00000099").is_dir()
    assert not (out / MANIFEST).exists() and not list((out / "runs").glob(".moving-*"))


def test_a_move_cut_short_is_finished_by_the_next_run(tmp_path):
    out, history = tmp_path / "out", tmp_path / "hist"
    _run_files(out)
    staging = history / ".moving-run-a"  # as if the process died after moving two files
    (staging / "logs").mkdir(parents=True)
    os.rename(out / "run.json", staging / "run.json")
    os.rename(out / "logs/loss.csv", staging / "logs/loss.csv")
    recover_moves(out, history)
    final = history / "run-a"
    assert (final / "run.json").exists() and (final / "logs/loss.csv").exists() and (final / "config.yaml").exists()
    assert (final / MANIFEST).exists() and not staging.exists() and not (out / MANIFEST).exists()


def test_keep_runs_prunes_only_runs(tmp_path):
    history = tmp_path / "runs"
    for name in ("20260101-000000-a", "20260102-000000-b", "20260103-000000-c"):
        (history / name).mkdir(parents=True)
        (history / name / MANIFEST).write_text("{}")
    (history / "photos").mkdir()  # not a run: never deleted
    removed = prune_history(history, 2)
    assert [p.name for p in removed] == ["20260101-000000-a"]
    assert sorted(p.name for p in history.iterdir()) == ["20260102-000000-b", "20260103-000000-c", "photos"]


def _daemon_files(tmp_path: Path) -> Path:
    """A folder standing for the daemon's own (its journal), outside output_dir."""
    daemon = tmp_path / "daemon"
    daemon.mkdir()
    (daemon / "journal.sqlite3").write_text("journal")
    (daemon / MANIFEST).write_text(json.dumps({"run_id": "x", "files": []}))
    return daemon


def test_a_link_planted_in_output_dir_never_moves_the_daemons_files(tmp_path):
    out = tmp_path / "out"
    _run_files(out)
    daemon = _daemon_files(tmp_path)
    (out / "link").symlink_to(daemon)  # a folder link: `link/journal.sqlite3` would be the journal
    (out / "direct").symlink_to(daemon / "journal.sqlite3")
    RunManifest.continue_or_start(out, "run-a").add("link/journal.sqlite3", "direct")
    moved = move_aside(out, out / "runs", "run-a")
    assert (daemon / "journal.sqlite3").read_text() == "journal"
    assert (out / "link").is_symlink() and (out / "direct").is_symlink()  # left where the submitter put them
    assert not (moved / "link").exists() and not os.path.lexists(moved / "direct")
    assert (moved / "run.json").exists()


def test_a_planted_staging_or_history_link_is_refused(tmp_path):
    daemon = _daemon_files(tmp_path)
    out = tmp_path / "out"
    _run_files(out)
    (out / "runs").mkdir()
    (out / "runs" / ".moving-run-a").symlink_to(daemon)  # the move would go into the daemon's folder
    with pytest.raises(UnsafeHistory, match=r"\.moving-run-a"):
        move_aside(out, out / "runs", "run-a")
    assert sorted(p.name for p in daemon.iterdir()) == ["journal.sqlite3", MANIFEST]
    assert (out / "run.json").exists() and (out / MANIFEST).exists()  # nothing moved, nothing lost
    recover_moves(out, out / "runs")  # the link is not a move of ours: left alone, nothing followed
    assert (out / "runs" / ".moving-run-a").is_symlink() and (daemon / MANIFEST).exists()

    shutil.rmtree(out)
    _run_files(out)
    (out / "runs").symlink_to(daemon)  # runs/ itself a link
    with pytest.raises(UnsafeHistory, match="symbolic link"):
        move_aside(out, out / "runs", "run-a")
    elsewhere = tmp_path / "hist"
    elsewhere.symlink_to(daemon)  # a configured history_dir that became a link after the submit check
    with pytest.raises(UnsafeHistory, match="symbolic link"):
        move_aside(out, elsewhere, "run-a")
    assert sorted(p.name for p in daemon.iterdir()) == ["journal.sqlite3", MANIFEST]


def test_keep_runs_and_the_run_reader_never_follow_links(tmp_path):
    daemon = _daemon_files(tmp_path)
    history = tmp_path / "runs"
    (history / "20260102-000000-b").mkdir(parents=True)
    (history / "20260102-000000-b" / MANIFEST).write_text("{}")
    (history / "20260101-000000-a").symlink_to(daemon)  # oldest by name, "holds a manifest"
    assert prune_history(history, 0) == [history / "20260102-000000-b"]
    assert (daemon / "journal.sqlite3").exists()
    out = tmp_path / "out"
    out.mkdir()
    (daemon / "run.json").write_text(json.dumps({"config": {"secret": 1}, "status": "succeeded"}))
    (out / "run.json").symlink_to(daemon / "run.json")
    (out / MANIFEST).symlink_to(daemon / MANIFEST)
    assert read_previous(out, frozenset()) is None and read_manifest(out) is None


# ------------------------------------------------------------------------------------------------
# Through the real trainer


def train(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lora-train"), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=600)


def test_ci_loop_in_the_foreground(tmp_path, assets):
    cfg = write_config(tmp_path, assets, max_train_steps=4, save_steps=2, keep_runs=1)
    out = cfg.parent / "out"
    first = train(cfg)
    assert first.returncode == 0, first.stderr
    assert "starting the first run in output_dir" in first.stdout
    (out / "notes.txt").write_text("the user's file")
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    stamp = (out / "run.json").stat().st_mtime_ns
    same = train(cfg)
    assert same.returncode == 0, same.stderr
    assert f"(run {run_id}): nothing to do" in same.stdout and "step 1/" not in same.stdout
    assert (out / "run.json").stat().st_mtime_ns == stamp, "nothing to do writes nothing"

    text = cfg.read_text()
    cfg.write_text(text.replace("learning_rate: 2e-3", "learning_rate: 1e-3"))
    changed = train(cfg)
    assert changed.returncode == 0, changed.stderr
    assert (f"config changed since the last run (learning_rate 0.002 -> 0.001): starting a new run; "
            f"the previous one is kept in runs/{run_id}") in changed.stdout
    assert "step 4/4" in changed.stdout
    kept = out / "runs" / run_id
    assert json.loads((kept / "run.json").read_text())["config"]["learning_rate"] == 0.002
    assert (kept / "out.safetensors").is_file() and (kept / "checkpoints/step-00000004").is_dir()
    assert (out / "notes.txt").read_text() == "the user's file" and not (kept / "notes.txt").exists()
    assert json.loads((out / "run.json").read_text())["config"]["learning_rate"] == 0.001

    cfg.write_text(text + "resume: strict\n")  # back to 2e-3: strict refuses to start a new run
    refused = train(cfg)
    assert refused.returncode == 2 and "learning_rate 0.001 -> 0.002" in refused.stderr
    assert "resume: strict" in refused.stderr

    cfg.write_text(text.replace("learning_rate: 2e-3", "learning_rate: 1e-3") + "resume: never\n")
    forced = train(cfg)
    assert forced.returncode == 0 and "resume: never: starting a new run" in forced.stdout
    assert "step 4/4" in forced.stdout
    assert len(list((out / "runs").iterdir())) == 1, "keep_runs: 1 keeps one previous run"


def test_changed_config_through_the_daemon_starts_a_new_run(tmp_path, assets):
    (tmp_path / "daemon").mkdir()
    d = DaemonProc(tmp_path / "daemon").start()
    try:
        cfg = write_config(tmp_path, assets, max_train_steps=3, save_steps=3)
        first = d.run("run", str(cfg))
        assert first.returncode == 0, first.stdout
        run_id = json.loads((cfg.parent / "out/run.json").read_text())["run_id"]
        cfg.write_text(cfg.read_text().replace("learning_rate: 2e-3", "learning_rate: 1e-3"))
        second = d.run("run", str(cfg))
        assert second.returncode == 0, second.stdout
        assert "config changed since the last run (learning_rate 0.002 -> 0.001)" in second.stdout
        assert (cfg.parent / "out/runs" / run_id / "run.json").is_file()
        third = d.run("run", str(cfg))
        assert third.returncode == 0 and "nothing to do" in third.stdout
    finally:
        d.stop()


def test_nothing_to_do_is_answered_at_submit_while_the_only_slot_is_busy(tmp_path, assets):
    """A finished, unchanged config needs no GPU: the daemon answers it at submit time, while another job
    holds its only slot, instead of queueing it behind that job (journaled as succeeded with the note).
    A `resume: strict` refusal is decided there too."""
    (tmp_path / "daemon").mkdir()
    d = DaemonProc(tmp_path / "daemon").start()
    busy = None
    try:
        (tmp_path / "done").mkdir()
        (tmp_path / "long").mkdir()
        done = write_config(tmp_path / "done", assets, max_train_steps=2, save_steps=2)
        first = d.run("run", str(done))
        assert first.returncode == 0, first.stdout
        run_id = json.loads((done.parent / "out/run.json").read_text())["run_id"]
        stamp = (done.parent / "out/run.json").stat().st_mtime_ns

        long = write_config(tmp_path / "long", assets, max_train_steps=100_000, save_steps=100_000, log_every=1)
        busy = Tail(d.agentd("run", str(long)))
        busy.until("step 2/100000")
        assert [j["id"] for j in d.status()["running"]] == ["job-000002"]

        again = d.run("run", str(done), timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"(run {run_id}): nothing to do" in again.stdout and "step 1/" not in again.stdout
        # Answered while the slot was still busy: the long job never stopped running for it.
        assert [j["id"] for j in d.status()["running"]] == ["job-000002"]
        assert busy.proc.poll() is None
        rows = d.journal_rows("SELECT state, detail FROM transitions WHERE job_id = 'job-000003' ORDER BY rowid")
        assert [r["state"] for r in rows] == ["queued", "succeeded"]
        assert "nothing to do" in rows[-1]["detail"]
        assert (done.parent / "out/run.json").stat().st_mtime_ns == stamp, "nothing to do writes nothing"
        # resume: strict with a changed config: refused at submit too (exit 2, the line of resume:), not
        # after waiting behind the busy slot; no job is journaled for it.
        done.write_text(done.read_text().replace("learning_rate: 2e-3", "learning_rate: 1e-3") + "resume: strict\n")
        line = done.read_text().splitlines().index("resume: strict") + 1
        refused = d.run("run", str(done), timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"{done}:{line}: resume: the last run ({run_id}) finished with another training config" in refused.stderr
        assert "learning_rate 0.002 -> 0.001" in refused.stderr and "resume: strict refuses" in refused.stderr
        assert [j["id"] for j in d.status()["running"]] == ["job-000002"] and busy.proc.poll() is None
        assert [r["id"] for r in d.journal_rows("SELECT id FROM jobs ORDER BY seq")][-1] == "job-000003"
        assert d.run("cancel", "job-000002").returncode == 0
        code, _ = busy.finish(timeout=120)
        assert code != 0  # cancelled
    finally:
        if busy is not None and busy.proc.poll() is None:
            busy.proc.kill()
        d.stop()


def test_demo_config_trains_from_scratch_every_time(tmp_path, assets):
    from trainer.dev.demo import write_demo_config

    cfg = write_demo_config(tmp_path, max_train_steps=3)
    for _ in range(2):
        proc = train(cfg)
        assert proc.returncode == 0, proc.stderr
        assert "step 3/3" in proc.stdout and "nothing to do" not in proc.stdout
    assert len(list((tmp_path / "demo_lora/runs").iterdir())) == 1
