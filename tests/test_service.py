"""Running as a systemd service: sd_notify against a real datagram socket, SIGTERM with a checkpoint,
retention (gc) and the metrics endpoint, all through a real `agentd serve` process."""
from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request


from tests.conftest import write_config
from tests.daemon_harness import DaemonProc, Tail
from tests.test_notify import Receiver


def collect(rx: Receiver, seconds: float) -> list[str]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg, _pid = rx.recv(timeout=max(0.05, deadline - time.monotonic()))
            out.append(msg)
        except (socket.timeout, BlockingIOError):
            break
    return out


def test_notify_ready_status_watchdog_stopping_and_sigterm_checkpoint(tmp_path, assets):
    rx = Receiver("path")
    root = tmp_path / "d"
    root.mkdir()
    d = DaemonProc(root, env={"NOTIFY_SOCKET": rx.env_value, "WATCHDOG_USEC": "1000000"})
    d.proc = None
    try:
        d.start()
        first, pid = rx.recv(timeout=30)
        assert first.startswith("READY=1") and pid == d.proc.pid
        with socket.socket(socket.AF_UNIX) as s:  # READY=1 came after the socket accepts connections
            s.connect(str(d.socket))
        cfg_dir = tmp_path / "job"
        cfg_dir.mkdir()
        cfg = write_config(cfg_dir, assets, max_train_steps=500, save_steps=1000, log_every=1)
        client = Tail(d.agentd("run", str(cfg)))
        client.until("step 3/500")
        msgs = collect(rx, 3.0)
        assert sum(m == "WATCHDOG=1" for m in msgs) >= 3, msgs  # interval: WATCHDOG_USEC / 2
        assert any(m.startswith("STATUS=training job-000001 step") for m in msgs), msgs

        os.kill(d.proc.pid, signal.SIGSTOP)  # a hung main loop
        rx.pending()
        time.sleep(2.0)
        stalled = rx.pending()
        os.kill(d.proc.pid, signal.SIGCONT)
        assert "WATCHDOG=1" not in stalled
        assert "WATCHDOG=1" in collect(rx, 2.0)

        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)  # systemctl stop
        assert d.proc.wait(90) == 0
        assert time.monotonic() - t0 < 60  # well within stop_timeout_s and TimeoutStopSec
        msgs = collect(rx, 1.0) + rx.pending()
        assert any(m.startswith("STOPPING=1") for m in msgs), msgs
        assert list((cfg.parent / "out/checkpoints").iterdir()), "the running job checkpointed"
        (row,) = d.journal_rows("SELECT state FROM jobs")
        assert row["state"] == "interrupted"
        client.finish(timeout=5) if client.proc.poll() is not None else client.proc.kill()
    finally:
        d.stop()
        rx.close()


def test_metrics_endpoint_enabled_and_absent_when_disabled(tmp_path, assets):
    (tmp_path / "on").mkdir()
    d = DaemonProc(tmp_path / "on", "metrics:\n  enabled: true\n  port: 0\n").start()
    try:
        cfg_dir = tmp_path / "job"
        cfg_dir.mkdir()
        assert d.run("run", str(write_config(cfg_dir, assets, max_train_steps=2))).returncode == 0
        url = d.status()["daemon"]["metrics"]
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 60  # generous: the counter may lag the reply on a busy machine
        while True:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            if 'agentd_jobs_finished_total{outcome="succeeded"} 1.0' in body or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for series in ("agentd_queue_length 0.0", "agentd_jobs_running 0.0",
                       'agentd_jobs_finished_total{outcome="succeeded"} 1.0', "agentd_gate_waits_total 0.0"):
            assert series in body, body
    finally:
        d.stop()
    (tmp_path / "off").mkdir()
    d = DaemonProc(tmp_path / "off").start()
    try:
        assert d.status()["daemon"]["metrics"] is None
    finally:
        d.stop()


def test_gc_removes_only_what_it_should_and_dry_run_lists_exactly_that(tmp_path):
    import subprocess

    from agentd.journal import Journal
    from tests.conftest import BIN

    state, cache = tmp_path / "state", tmp_path / "cache"
    cache.mkdir()
    settings = tmp_path / "agentd.yaml"
    settings.write_text(f"state_dir: {state}\ncache_dir: {cache}\nretention_days: 30\ngc_user_outputs: true\n")
    journal = Journal(state / "journal.sqlite3")
    old = time.time() - 40 * 86400
    outs = []
    for name, state_, when in (("old", "succeeded", old), ("new", "succeeded", time.time()),
                               ("oldrunning", "queued", old)):
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        for step in (10, 20, 30, 40):
            (out / f"checkpoints/step-{step:08d}").mkdir()
        (out / "keep.safetensors").write_text("user output")
        outs.append(out)
        job = journal.create(config_path=f"/x/{name}.yaml", config_text="", config_hash="h",
                             resolved={"keep_checkpoints": 2}, output_dir=str(out), name=name, submitter={}, env={})
        if state_ != "queued":
            journal.transition(job, state_)
        journal.update(job, ended=when, created=when)
    journal.close()
    stale, fresh = cache / "agent.jar", cache / "fresh.bin"
    stale.write_text("jar")
    fresh.write_text("new")
    os.utime(stale, (old, old))

    def gc(*args):
        return subprocess.run([str(BIN / "agentd"), "gc", "--config", str(settings), *args], capture_output=True,
                              text=True, timeout=60)

    dry = gc("--dry-run")
    assert dry.returncode == 0
    planned = sorted(line.split(" ", 2)[2] for line in dry.stdout.splitlines() if line.startswith("would remove"))
    assert os.path.exists(stale) and len(list((outs[0] / "checkpoints").iterdir())) == 4  # nothing removed
    real = gc()
    done = sorted(line.split(" ", 1)[1] for line in real.stdout.splitlines() if line.startswith("removed "))
    # 1 expired journal entry + 1 stale cache file + 2 surplus checkpoints in each of the 2 finished jobs
    assert planned == done and len(done) == 1 + 1 + 2 * 2
    assert not stale.exists() and fresh.exists()
    journal = Journal(state / "journal.sqlite3")
    assert sorted(j["name"] for j in journal.jobs()) == ["new", "oldrunning"]
    journal.close()
    for out in outs:
        assert (out / "keep.safetensors").exists()  # user outputs other than checkpoints are never touched
    # keep_checkpoints 2: surplus checkpoints pruned for finished jobs, never for an active one
    assert sorted(p.name for p in (outs[1] / "checkpoints").iterdir()) == ["step-00000030", "step-00000040"]
    assert len(list((outs[2] / "checkpoints").iterdir())) == 4
