"""The daemon with its Jenkins link: a real `agentd serve` against the fake controller over real HTTP,
agent.jar played by tests/fake_java.py through the real launcher path. The token must never leak."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


from fake_java import FAKE_JAVA
from fake_jenkins import TOKEN, FakeJenkins
from tests.daemon_harness import DaemonProc


def settings_for(fake: FakeJenkins, tmp_path: Path, launcher: str = "inbound", sync_interval_s: float = 0.3) -> str:
    return (f"jenkins:\n  url: {fake.url}\n  user: agentd\n  token_env: AGENTD_TEST_TOKEN\n  node_name: gpubox\n"
            f"  labels: [gpu-node]\n  launcher: {launcher}\n  remote_fs: {tmp_path / 'remote'}\n"
            f"  agent_jar_dir: {tmp_path / 'agent'}\n  java: env FAKE_JAVA_LOG={tmp_path / 'java.jsonl'} {FAKE_JAVA}\n  timeout_s: 5\n  sync_interval_s: {sync_interval_s}\n"
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


# Loaded by every Python started with this folder on PYTHONPATH: `agentd serve` then imports this fake as
# `pynvml` (the real NvmlProbe runs over it). A process not agentd's holds 20 GiB on GPU 0, and the amount
# changes every 0.2 s, so the foreign-VRAM reason's numbers change on every daemon tick.
CHANGING_FOREIGN_VRAM = """
import sys, threading, time
sys.path.insert(0, {tests!r})
from fake_nvml import FakeGpu, FakeNvml

nvml = FakeNvml([FakeGpu("NVIDIA GeForce RTX 3090", total_mib=24576)])
nvml.add_process(0, pid=4242, used_mib=20000)


def churn():
    step = 0
    while True:
        step += 1
        nvml.gpus[0].processes[0].used_mib = 20000 + step
        time.sleep(0.2)


threading.Thread(target=churn, daemon=True).start()
sys.modules["pynvml"] = nvml
"""


def wanted_reason(jenkins: dict):
    """Why agentd wants the node offline: `offline_reason` in the typed status, the link's own key otherwise."""
    return jenkins.get("offline_reason") or jenkins.get("requested_offline_reason")


def test_an_idle_daemon_costs_the_controller_a_handful_of_requests(tmp_path):
    """`agentd serve` with sync_interval_s 60, held offline for foreign VRAM whose numbers change every
    tick: over 10 idle seconds it sends at most a few requests and never re-posts the offline cause."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CHANGING_FOREIGN_VRAM.format(tests=str(Path(__file__).parent)))
    with FakeJenkins() as fake:
        root = tmp_path / "d"
        root.mkdir()
        settings = settings_for(fake, tmp_path, launcher="none", sync_interval_s=60) + "max_foreign_vram_mib: 4096\n"
        env = {"AGENTD_TEST_TOKEN": TOKEN, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
        d = DaemonProc(root, settings, env=env).start()
        try:
            d.wait_for(lambda: d.status()["jenkins"].get("state") == "offline", what="node offline for foreign VRAM")
            node = fake.nodes["gpubox"]
            assert node.temporarily_offline and "max_foreign_vram_mib (4096 MiB)" in node.offline_reason
            assert d.status()["slots"][0]["gpu"]["name"] == "NVIDIA GeForce RTX 3090", "the fake NVML is in use"
            before = wanted_reason(d.status()["jenkins"])
            startup = [(r.method, r.path) for r in fake.requests]
            fake.clear_requests()
            time.sleep(10)
            after = wanted_reason(d.status()["jenkins"])
            idle = [(r.method, r.path, r.query.get("offlineMessage")) for r in fake.requests]
        finally:
            d.stop()
        assert before != after, "the reason's numbers changed while idle (the premise of this test)"
        assert len(idle) <= 3, idle
        posts = [r for r in startup + [(m, p) for m, p, _ in idle] if r[0] == "POST"]
        assert posts.count(("POST", "/computer/gpubox/toggleOffline")) == 1
        assert ("POST", "/computer/gpubox/changeOfflineCause") not in posts
        assert ("GET", "/") not in startup, "the version is read from responses already made"
