"""The daemon with its Jenkins link: a real `agentd serve` against the fake controller over real HTTP,
agent.jar played by tests/fake_java.py through the real launcher path. The token must never leak."""
from __future__ import annotations

import json
import sys
from pathlib import Path


from fake_jenkins import FakeJenkins
from tests.daemon_harness import DaemonProc

TOKEN = "11c0ffee5ecret70ken"
FAKE_JAVA = f"{sys.executable} {Path(__file__).parent / 'fake_java.py'}"


def settings_for(fake: FakeJenkins, tmp_path: Path, launcher: str = "inbound") -> str:
    return (f"jenkins:\n  url: {fake.url}\n  user: agentd\n  token_env: AGENTD_TEST_TOKEN\n  node_name: gpubox\n"
            f"  labels: [gpu-node]\n  launcher: {launcher}\n  remote_fs: {tmp_path / 'remote'}\n"
            f"  agent_jar_dir: {tmp_path / 'agent'}\n  java: env FAKE_JAVA_LOG={tmp_path / 'java.jsonl'} {FAKE_JAVA}\n  timeout_s: 5\n  sync_interval_s: 0.3\n"
            f"  retry_min_s: 0.1\n  retry_max_s: 0.5\n  agent_restart_min_s: 0.1\n  agent_restart_max_s: 0.5\n")


def test_registers_node_runs_agent_goes_offline_on_drain_and_never_leaks_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_JAVA_LOG", str(tmp_path / "java.jsonl"))
    with FakeJenkins() as fake:
        root = tmp_path / "d"
        root.mkdir()
        d = DaemonProc(root, settings_for(fake, tmp_path), env={"AGENTD_TEST_TOKEN": TOKEN,
                                                                "FAKE_JAVA_LOG": str(tmp_path / "java.jsonl")})
        d.start()
        try:
            d.wait_for(lambda: d.status()["jenkins"].get("state") == "online", what="link online")
            node = fake.nodes["gpubox"]
            assert "cpu-only" in node.labels and "gpu-node" in node.labels
            assert node.num_executors == 1 and node.mode == "EXCLUSIVE"
            d.wait_for(lambda: (d.status()["jenkins"].get("agent") or {}).get("state") == "running",
                       what="agent.jar running")

            assert d.run("drain").returncode == 0
            d.wait_for(lambda: fake.nodes["gpubox"].temporarily_offline, what="node offline while draining")
            assert "draining" in (fake.nodes["gpubox"].offline_reason or "")
            assert d.run("undrain").returncode == 0
            d.wait_for(lambda: not fake.nodes["gpubox"].temporarily_offline, what="node online again")

            status_text = d.run("status", "--json").stdout + d.run("status").stdout
            agent_pid = d.status()["jenkins"]["agent"]["pid"]
            cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in (d.proc.pid, agent_pid)]
        finally:
            d.stop()
        leaks = {
            "status": status_text,
            "daemon log": d.log.read_text(),
            "journal": b"".join(p.read_bytes() for p in d.state.glob("journal.sqlite3*")).decode("latin-1"),
            "argv": b" ".join(cmdlines).decode("latin-1"),
        }
        for where, text in leaks.items():
            assert TOKEN not in text, f"token leaked into {where}"
        secret = fake.agent_secret("gpubox")
        assert secret not in leaks["argv"], "agent secret in argv"


def test_wrong_token_is_reported_and_local_jobs_still_run(tmp_path, assets):
    from tests.conftest import write_config

    with FakeJenkins() as fake:
        root = tmp_path / "d"
        root.mkdir()
        d = DaemonProc(root, settings_for(fake, tmp_path, launcher="none"),
                       env={"AGENTD_TEST_TOKEN": "wrong-token"}).start()
        try:
            st = d.wait_for(lambda: (lambda j: j if j.get("state") == "auth-error" else None)(d.status()["jenkins"]),
                            what="auth error")
            assert "HTTP 401" in st["last_error"] and "token_env $AGENTD_TEST_TOKEN" in st["last_error"] and "wrong-token" not in json.dumps(st)
            cfg_dir = tmp_path / "job"
            cfg_dir.mkdir()
            assert d.run("run", str(write_config(cfg_dir, assets, max_train_steps=2))).returncode == 0
        finally:
            d.stop()
