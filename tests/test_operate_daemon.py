"""Operating a shared box through a real `agentd serve` and the real CLI: status names the Jenkins node and
agent.jar's state, `agentd run` waits for a starting daemon, pause/resume with an attached `agentd run`,
infrastructure retries (exit 0, then exit 5 with the node offline) and device pick on fake GPUs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fake_jenkins import FakeJenkins
from tests.conftest import BIN, write_config
from tests.daemon_harness import DaemonProc, Tail
from tests.test_daemon import STATUS_SCHEMA, check_schema
from tests.test_daemon_jenkins import TOKEN, settings_for


def job_config(tmp_path: Path, assets, name: str, **fields) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return write_config(folder, assets, **fields)


def test_status_names_the_node_and_agent_jar_state(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_JAVA_LOG", str(tmp_path / "java.jsonl"))
    with FakeJenkins() as fake:
        root = tmp_path / "d"
        root.mkdir()
        d = DaemonProc(root, settings_for(fake, tmp_path), env={"AGENTD_TEST_TOKEN": TOKEN}).start()
        try:
            d.wait_for(lambda: (d.status()["jenkins"].get("agent") or {}).get("state") == "running",
                       what="agent.jar running")
            plain = d.run("status").stdout
            assert f"{fake.url}" in plain and "node gpubox" in plain and "node N/A" not in plain
            assert "agent.jar: running pid" in plain
            status = json.loads(d.run("status", "--json").stdout)
            check_schema(status, STATUS_SCHEMA)
            assert status["jenkins"]["node_name"] == "gpubox" and status["jenkins"]["agent"]["state"] == "running"
            assert "agent" not in status  # one place for each fact: jenkins.agent
        finally:
            d.stop()


def test_run_waits_for_a_starting_daemon_and_gives_up_after_connect_timeout(tmp_path, assets):
    root = tmp_path / "d"
    root.mkdir()
    d = DaemonProc(root)
    cfg = job_config(tmp_path, assets, "early", max_train_steps=2, save_steps=2)
    quick = subprocess.run([str(BIN / "agentd"), "run", str(cfg), "--connect-timeout", "1", "--socket", str(d.socket)],
                           capture_output=True, text=True, timeout=60)
    assert quick.returncode == 4, quick.stdout + quick.stderr
    assert "waiting for agentd to start: try 1" in quick.stdout and "waited 1 s" in quick.stderr
    early = Tail(d.agentd("run", str(cfg), "--connect-timeout", "120"))  # a build that starts during a restart
    early.until("waiting for agentd to start: try 2")
    d.start()
    try:
        code, lines = early.finish(timeout=300)
        assert code == 0, "\n".join(lines)
        assert "submitted job-000001" in lines
    finally:
        d.stop()


def _as_nobody(argv: list[str]) -> int:
    """Run an agentd CLI command in a child that dropped root for nobody (the socket is root's, 0660)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            from agentd.cli import main

            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 98
        finally:
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_pause_and_resume_with_an_attached_run(tmp_path, assets, capfd):
    root = tmp_path / "d"
    root.mkdir()
    d = DaemonProc(root).start()
    try:
        cfg = job_config(tmp_path, assets, "long", max_train_steps=12, save_steps=100, log_every=1)
        run = Tail(d.agentd("run", str(cfg)))
        run.until("step 2/12")
        paused = d.run("pause", "job-000001")
        assert paused.returncode == 0 and "pausing" in paused.stdout
        run.until("job job-000001 paused")
        status = d.status()
        assert status["running"] == [] and status["paused"][0]["id"] == "job-000001"
        assert "paused: 1" in d.run("status").stdout
        assert "agentd resume job-000001" in d.run("status").stdout
        again = d.run("pause", "job-000001")
        assert again.returncode == 1 and "job-000001 is paused: only a running job can be paused" in again.stderr
        assert d.run("jobs").stdout.split()[1] == "paused"

        os.chmod(d.rundir, 0o755)  # so that only the socket's own mode (0660, root) keeps nobody out
        assert _as_nobody(["pause", "job-000001", "--socket", str(d.socket)]) == 4
        assert "permission denied on" in capfd.readouterr().err

        assert run.proc.poll() is None  # the attached run keeps waiting
        resumed = d.run("resume", "job-000001")
        assert resumed.returncode == 0 and "queued" in resumed.stdout
        code, lines = run.finish(timeout=300)
        text = "\n".join(lines)
        assert code == 0, text
        assert "resumed after a pause" in (cfg.parent / "out/run.json").read_text()
        assert "resumed from step" in text and "succeeded" in text
        late = d.run("resume", "job-000001")
        assert late.returncode == 1 and "is succeeded: only a paused job can be resumed" in late.stderr
        assert d.run("pause", "job-999999").returncode == 1
        states = [r["state"] for r in d.journal_rows(
            "SELECT state FROM transitions WHERE job_id = 'job-000001' ORDER BY rowid")]
        assert states == ["queued", "running", "paused", "queued", "running", "succeeded"]
    finally:
        d.stop()


FAKE_GPUS = [{"name": "NVIDIA GeForce RTX 4090", "total_mib": 24564},
             {"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920}]


def test_infrastructure_fault_retried_exit_0_then_exhausted_exit_5_node_offline_and_device_pick(tmp_path, assets):
    with FakeJenkins() as fake:
        root = tmp_path / "d"
        root.mkdir()
        # Every job's first attempt hits a CUDA "illegal memory access" at step 4.
        d = DaemonProc(root, settings_for(fake, tmp_path, launcher="none") + "max_infra_retries: 2\n",
                       env={"AGENTD_TEST_TOKEN": TOKEN, "AGENTD_INJECT_INFRA_FAULT": "4"}, fake_gpus=FAKE_GPUS)
        d.start()
        try:
            d.wait_for(lambda: d.status()["jenkins"]["state"] == "online", what="link online")
            nowhere = d.run("run", str(job_config(tmp_path, assets, "nowhere", device="*H100*")))
            assert nowhere.returncode == 2
            assert "matches no GPU" in nowhere.stderr and "1: NVIDIA A100-SXM4-80GB (GPU-" in nowhere.stderr

            cfg = job_config(tmp_path, assets, "retried", max_train_steps=6, save_steps=2, log_every=1)
            first = Tail(d.agentd("run", str(cfg)))
            first.until("step 1/6")
            running = d.status()["running"][0]
            assert running["slot"] == "cuda:0" and running["device_uuid"].startswith("GPU-")  # best fit: the 4090
            assert running["device_uuid"] in d.run("status").stdout
            code, lines = first.finish(timeout=300)
            text = "\n".join(lines)
            assert code == 0, text
            assert "infrastructure failure on cuda:0" in text and "retry 1/2 from the checkpoint at step 2" in text
            assert "resumed from step 2" in text and "on cuda:1" in text and "succeeded" in text
            run = json.loads((cfg.parent / "out/run.json").read_text())
            assert run["status"] == "succeeded" and len(run["infra_retries"]) == 1
            assert "illegal memory access" in run["infra_retries"][0]["error"]
            assert run["resumes"][-1]["why"].startswith("infrastructure retry 1")
            assert d.journal_rows("SELECT infra_retries, state FROM jobs WHERE config_path = ?", (str(cfg),)) == [
                {"infra_retries": 1, "state": "succeeded"}]
            assert not fake.nodes["gpubox"].temporarily_offline  # one healthy GPU left: still online

            # The next job fails on the last healthy GPU: no healthy GPU is left for its retry.
            doomed = d.run("run", str(job_config(tmp_path, assets, "doomed", max_train_steps=6, save_steps=2)))
            assert doomed.returncode == 5, doomed.stdout
            assert "FAILED (infrastructure): " in doomed.stdout
            slots = d.status()["slots"]
            assert [s["healthy"] for s in slots] == [False, False]
            assert all("illegal memory access" in s["unhealthy_reason"] for s in slots)
            assert d.status()["counters"]["infra_retries"] == 2
            d.wait_for(lambda: fake.nodes["gpubox"].temporarily_offline, what="node offline: no healthy GPU")
            assert "illegal memory access" in fake.nodes["gpubox"].offline_reason
            assert "UNHEALTHY" in d.run("status").stdout
        finally:
            d.stop()
