"""The agent.jar supervisor, with a stand-in "java" (tests/fake_java.py) launched through the real path."""

import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest

from agentd.jenkins.agent_process import AgentProcess, build_agent_command, write_secret_file
from agentd.jenkins.settings import Secret
from fake_java import FAKE_JAVA
from waiting import wait_for

SECRET = "5ec7e7" * 10 + "abcd"



def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def make_agent(tmp_path, monkeypatch):
    agents = []
    log = tmp_path / "starts.jsonl"
    monkeypatch.setenv("FAKE_JAVA_LOG", str(log))

    def make(mode="sleep", **kw):
        monkeypatch.setenv("FAKE_JAVA_MODE", mode)
        options = dict(java=FAKE_JAVA, jar=tmp_path / "agent.jar", url="http://127.0.0.1:9/", name="gpu1",
                       work_dir=tmp_path / "work", secret_file=tmp_path / "state" / "agent.secret",
                       restart_min_s=0.05, restart_max_s=0.4, stable_s=30.0, stop_timeout_s=2.0,
                       # agent.jar inherits only allow-listed variables: the stand-in's settings go explicitly
                       env={k: v for k, v in os.environ.items() if k.startswith("FAKE_JAVA_")})
        options.update(kw)
        agent = AgentProcess(**options)
        agent.set_secret(Secret(SECRET))
        agents.append(agent)
        return agent

    make.starts = lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    yield make
    for agent in agents:
        agent.stop()


def test_command_line_shape():
    command = build_agent_command("java -Xmx256m", Path("/a/agent.jar"), "https://ci/", "gpu1",
                                  Path("/s/agent.secret"), Path("/w"), websocket=True)
    assert command == ["java", "-Xmx256m", "-jar", "/a/agent.jar", "-url", "https://ci/", "-name", "gpu1",
                       "-secret", "@/s/agent.secret", "-workDir", "/w", "-webSocket"]


def test_secret_file_is_0600_and_rewritten_only_on_change(tmp_path):
    path = tmp_path / "state" / "agent.secret"
    old_umask = os.umask(0)
    try:
        assert write_secret_file(path, Secret(SECRET)) is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == SECRET + "\n"
    assert write_secret_file(path, Secret(SECRET)) is False
    assert write_secret_file(path, Secret("other-secret-1234")) is True
    assert [p.name for p in path.parent.iterdir()] == ["agent.secret"], "no temp files left behind"


def test_secret_never_in_argv_and_output_goes_to_the_log(make_agent, caplog):
    caplog.set_level(logging.INFO, logger="agentd.jenkins.agent")
    agent = make_agent()
    agent.start()
    pid = wait_for(lambda: agent.status()["pid"], what="agent pid")
    wait_for(lambda: make_agent.starts(), what="fake java start")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert SECRET not in cmdline
    assert f"@{agent.secret_file}" in cmdline.split("\0")
    assert SECRET not in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert stat.S_IMODE(agent.secret_file.stat().st_mode) == 0o600
    start = make_agent.starts()[0]
    assert start["secret_sha256"] == __import__("hashlib").sha256(SECRET.encode()).hexdigest()
    wait_for(lambda: "Connected" in caplog.text, what="child output in the log")
    assert any(r.name == "agentd.jenkins.agent" and "fake agent gpu1" in r.getMessage()
               for r in caplog.records)
    status = agent.status()
    assert status["state"] == "running" and status["restarts"] == 0
    assert SECRET not in json.dumps(status)


def test_crash_restarts_with_exponential_backoff(make_agent, caplog):
    caplog.set_level(logging.ERROR, logger="agentd.jenkins.agent")
    agent = make_agent("crash", restart_min_s=0.1, restart_max_s=0.4)
    started = time.monotonic()
    agent.start()
    wait_for(lambda: len(make_agent.starts()) >= 4, what="4 starts")
    elapsed = time.monotonic() - started
    # delays after failures 1..3 are at least 0.05 + 0.1 + 0.2 (jitter halves at most): no tight loop
    assert elapsed >= 0.35
    status = agent.status()
    assert status["restarts"] >= 3 and status["last_exit_code"] == 3
    assert status["state"] in ("backoff", "running", "starting")
    assert "cannot connect, giving up" in caplog.text, "SEVERE lines are logged as errors"


def test_backoff_resets_after_a_stable_run(make_agent, monkeypatch):
    monkeypatch.setenv("FAKE_JAVA_RUN_S", "0.15")
    agent = make_agent("crash-after", restart_min_s=0.05, restart_max_s=5.0, stable_s=0.1)
    agent.start()
    seen = []

    def backoff_seen():
        status = agent.status()
        if status["state"] == "backoff" and status["next_restart_in_s"] is not None:
            seen.append(status["next_restart_in_s"])
        return len(make_agent.starts()) >= 4

    wait_for(backoff_seen, what="4 starts")
    # every run lasted longer than stable_s, so every delay is the first one (<= restart_min_s), never 0.4+
    assert seen and max(seen) <= 0.05


def test_stop_terminates_and_reaps_the_child(make_agent):
    agent = make_agent()
    agent.start()
    pid = wait_for(lambda: agent.status()["pid"], what="agent pid")
    agent.stop()
    assert gone(pid)
    assert agent.status()["state"] == "stopped" and agent.status()["pid"] is None
    assert not agent.running


def test_stop_kills_a_child_that_ignores_sigterm(make_agent, caplog):
    caplog.set_level(logging.INFO, logger="agentd.jenkins.agent")
    agent = make_agent("ignore-term", stop_timeout_s=0.3)
    agent.start()
    pid = wait_for(lambda: agent.status()["pid"], what="agent pid")
    wait_for(lambda: "ignoring SIGTERM" in caplog.text, what="SIGTERM handler installed")
    started = time.monotonic()
    agent.stop()
    assert gone(pid)
    assert time.monotonic() - started >= 0.3
    assert agent.status()["last_exit_code"] == -9


def test_restart_on_request_skips_backoff(make_agent):
    agent = make_agent(restart_min_s=30.0, restart_max_s=60.0)
    agent.start()
    first = wait_for(lambda: agent.status()["pid"], what="agent pid")
    agent.restart()
    second = wait_for(lambda: (agent.status()["pid"] or first) != first and agent.status()["pid"],
                      what="new pid")
    assert second != first and gone(first)


def test_missing_java_is_reported_not_raised(make_agent):
    agent = make_agent(java="/nonexistent/bin/java", restart_min_s=0.05, restart_max_s=0.1)
    agent.start()
    wait_for(lambda: (agent.status()["last_error"] or "").startswith("cannot start /nonexistent/bin/java"),
             what="start failure")
    assert agent.running
    agent.stop()
    assert agent.status()["state"] == "stopped"


def test_an_old_agent_jar_that_prints_its_usage_is_reported_not_restarted(make_agent, tmp_path):
    """remoting < 3176 (Jenkins < 2.437) has no -url/-name: Launcher.main prints the usage and exits 0."""
    from fake_jenkins import FakeJenkins

    jar = tmp_path / "old-agent.jar"
    jar.write_bytes(FakeJenkins(version="2.426.3").agent_jar())
    agent = make_agent(jar=jar)
    agent.start()
    wait_for(lambda: agent.status()["state"] == "failed", what="agent gave up")
    time.sleep(1.0)  # restart_min_s is 0.05 s: a restart loop would have started it many times by now
    status = agent.status()
    assert [start.get("usage_exit") for start in make_agent.starts()] == [True]
    assert status["last_exit_code"] == 0 and status["restarts"] == 0 and not agent.running
    assert "printed its usage" in status["gave_up_reason"] and status["last_error"] == status["gave_up_reason"]
    assert "-url" in status["gave_up_reason"] and "2.440.1" in status["gave_up_reason"]
    agent.start()          # a new start (a new agent.jar) tries again
    wait_for(lambda: len(make_agent.starts()) == 2, what="second try")
    wait_for(lambda: agent.status()["state"] == "failed", what="gave up again")
