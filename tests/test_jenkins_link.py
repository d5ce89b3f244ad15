"""JenkinsLink and BuildTrigger over real HTTP against the fake controller (tests/fake_jenkins.py).

python-jenkins is not mocked: every call goes over a socket to the fake, which records it. The fake behaves
as the Jenkins version it is given; the link's tests run against 2.426.3 (below the supported floor),
2.462.3 (one offline-cause field, reasons unescaped) and the current LTS (separate temporary-offline cause,
escaped reasons): see VERSIONS.
"""

import hashlib
import json
import logging
import os
import random
import re
import signal
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from agentd.jenkins.agent_process import SECRET_FILE_NAME
from agentd.jenkins.builds import BuildTrigger
from agentd.jenkins.link import JenkinsLink
from agentd.jenkins.offline import MARK_FILE_NAME
from agentd.jenkins.session import JenkinsSession, LinkError
from agentd.jenkins.settings import JenkinsSettings, Secret
from fake_java import FAKE_JAVA
from fake_jenkins import CURRENT_LTS, JNLP_LAUNCHER, SSH_LAUNCHER, TOKEN, FakeJenkins
from waiting import wait_for

NODE = "gpu-box-1"
VERSIONS = ["2.426.3", "2.462.3", CURRENT_LTS]
SUPPORTED = ["2.462.3", CURRENT_LTS]
CONFIG_POST = rf"/computer/{NODE}/config.xml"
TOGGLE = rf"/computer/{NODE}/toggleOffline"



def rtx3090():
    return SimpleNamespace(name="NVIDIA GeForce RTX 3090", memory_total_mib=24576, cuda_version="12.4")


@pytest.fixture(params=VERSIONS)
def fake(request):
    """The controller at a version (or a dict of FakeJenkins arguments, for indirect parametrization)."""
    options = request.param if isinstance(request.param, dict) else {"version": request.param}
    with FakeJenkins(**options) as controller:
        yield controller


def java_starts(tmp_path) -> list[dict]:
    log = tmp_path / "java-starts.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def settings_for(fake, tmp_path):
    def make(**overrides) -> JenkinsSettings:
        options = dict(url=fake.url, user="agentd", token_file=str(tmp_path / "jenkins.token"),
                       node_name=NODE, launcher="none", labels=["gpu-node"],
                       remote_fs=str(tmp_path / "remote"),
                       agent_jar_dir=str(tmp_path / "agent"), timeout_s=5,
                       # agent.jar inherits only allow-listed variables: the stand-in's log path goes in argv
                       java=f"env FAKE_JAVA_LOG={tmp_path / 'java-starts.jsonl'} {FAKE_JAVA}",
                       sync_interval_s=0.2, retry_min_s=0.05, retry_max_s=0.4,
                       agent_restart_min_s=0.05, agent_restart_max_s=0.2)
        options.update(overrides)
        return JenkinsSettings(**options)

    return make


@pytest.fixture
def make_link(settings_for):
    """A link as the daemon makes one; ``gpus`` is a list of GPU facts or the probe itself."""
    links = []

    def make(gpus=None, slots=None, token=TOKEN, state_dir=None, **overrides):
        facts = [rtx3090()] if gpus is None else gpus
        probe = facts if callable(facts) else (lambda: facts)
        session = JenkinsSession(settings_for(**overrides), Secret(token) if token else None)
        link = JenkinsLink(session, probe, slots, rng=random.Random(7), state_dir=state_dir)
        links.append(link)
        return link

    yield make
    for link in links:
        link.stop()


@pytest.fixture
def trigger(settings_for):
    """The folder trigger's BuildTrigger, as the daemon makes it."""
    return BuildTrigger(JenkinsSession(settings_for(), Secret(TOKEN)))


def test_node_created_with_derived_labels_exclusive_and_executors(fake, make_link):
    link = make_link(gpus=[rtx3090(), rtx3090()], slots=2)
    assert link.sync() is True
    node = fake.nodes[NODE]
    assert set(node.labels.split()) == {"gpu", "gpu:rtx3090", "vram:24g", "cuda:12.4", "gpu-node"}
    assert node.mode == "EXCLUSIVE" and node.num_executors == 2
    assert node.description == "agentd 0.1.0: 2x NVIDIA GeForce RTX 3090 (24 GiB), CUDA 12.4; 2 slots"
    assert node.launcher_class == JNLP_LAUNCHER
    create = [r for r in fake.requests if r.path == "/computer/doCreateItem"]
    assert len(create) == 1 and "Jenkins-Crumb" in create[0].headers
    status = link.status()
    assert status["state"] == "online" and status["last_error"] is None
    assert status["labels"] == sorted(node.labels.split()) and status["executors"] == 2
    assert status["authenticated_as"] == "agentd" and status["controller_version"] == fake.version
    # python-jenkins checked credentials before anything else
    assert fake.requests[0].path == "/crumbIssuer/api/json" and fake.requests[1].path == "/me/api/json"


def test_no_reconfig_when_nothing_changed(fake, make_link):
    link = make_link()
    for _ in range(3):
        assert link.sync()
    assert fake.count("POST", CONFIG_POST) == 0
    assert fake.count("GET", CONFIG_POST) == 2
    assert fake.count("POST", r"/computer/doCreateItem") == 1


def test_labels_and_executors_follow_gpu_changes(fake, make_link):
    gpus = [rtx3090()]
    link = make_link(gpus=gpus)
    assert link.sync()
    gpus.append(SimpleNamespace(name="NVIDIA A100-SXM4-80GB", memory_total_mib=81559, cuda_version="12.4.1"))
    assert link.sync()
    node = fake.nodes[NODE]
    assert {"gpu:a100-sxm4-80gb", "vram:80g", "gpu:rtx3090", "vram:24g"} <= set(node.labels.split())
    assert node.num_executors == 2 and "NVIDIA A100-SXM4-80GB (80 GiB)" in node.description
    assert fake.count("POST", CONFIG_POST) == 1
    assert link.sync() and fake.count("POST", CONFIG_POST) == 1, "idempotent after the change"
    gpus.clear()
    assert link.sync()
    assert set(node.labels.split()) == {"cpu-only", "gpu-node"} and node.num_executors == 1


def test_offline_while_requested_online_after_and_no_needless_toggle(fake, make_link):
    link = make_link()
    assert link.sync()
    assert fake.count("POST", TOGGLE) == 0, "a disconnected agent is offline but must not be toggled"
    link.request_offline("draining (agentd drain)")
    assert link.sync()
    node = fake.nodes[NODE]
    assert node.temporarily_offline and node.offline_reason == "agentd: draining (agentd drain)"
    toggle = [r for r in fake.requests if r.path == f"/computer/{NODE}/toggleOffline"]
    assert toggle[0].method == "POST"
    assert toggle[0].query["offlineMessage"] == ["agentd: draining (agentd drain)"]
    assert link.status()["state"] == "offline"
    assert link.sync() and fake.count("POST", TOGGLE) == 1
    link.request_offline("GPU 0 unhealthy")
    assert link.sync()
    assert node.offline_reason == "agentd: GPU 0 unhealthy" and fake.count("POST", TOGGLE) == 1
    assert fake.count("POST", rf"/computer/{NODE}/changeOfflineCause") == 1
    link.request_online()
    assert link.sync()
    assert not node.temporarily_offline and fake.count("POST", TOGGLE) == 2
    assert link.sync() and fake.count("POST", TOGGLE) == 2
    assert link.status()["state"] == "online"


def test_repeated_offline_and_online_requests_toggle_once_each(fake, make_link):
    link = make_link()
    assert link.sync()
    link.request_offline("foreign process holds 20 GiB on GPU 0")
    assert link.sync()
    assert fake.nodes[NODE].temporarily_offline
    link.request_offline("foreign process holds 20 GiB on GPU 0")
    assert link.sync()
    assert fake.count("POST", TOGGLE) == 1
    link.request_online()
    assert link.sync()
    link.request_online()
    assert link.sync()
    assert not fake.nodes[NODE].temporarily_offline and fake.count("POST", TOGGLE) == 2


def test_node_marked_offline_by_an_admin_is_left_offline(fake, make_link):
    link = make_link()
    assert link.sync()
    fake.nodes[NODE].temporarily_offline, fake.nodes[NODE].offline_reason = True, "swapping a fan"
    assert link.sync()
    assert fake.nodes[NODE].temporarily_offline and fake.count("POST", TOGGLE) == 0
    status = link.status()
    assert status["state"] == "offline" and status["node_offline_reason"] == "swapping a fan"


def test_controller_restart_mid_run_reregisters(fake, make_link):
    link = make_link()
    link.request_offline("drain")
    assert link.sync()
    fake.restart()  # sessions, crumbs and nodes gone
    assert NODE not in fake.nodes
    assert link.sync(), link.status()["last_error"]
    assert fake.nodes[NODE].temporarily_offline, "desired offline state re-applied to the new node"
    creates = [r.status for r in fake.requests if r.path == "/computer/doCreateItem"]
    assert creates == [302, 403, 302], "stale crumb rejected once, then a new session re-created the node"
    fake.restart(wipe_nodes=False)  # the node survives; only the session is stale
    fake.clear_requests()
    link.request_online()
    assert link.sync(), link.status()["last_error"]
    assert not fake.nodes[NODE].temporarily_offline
    assert fake.count("GET", r"/crumbIssuer/api/json") == 1, "one fresh session after the stale crumb"


def test_wrong_token_is_an_auth_error_naming_the_source(fake, make_link, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-token-f00d"
    link = make_link(token=wrong)
    assert link.sync() is False
    status = link.status()
    assert status["state"] == "auth-error"
    message = status["last_error"]
    assert "HTTP 401" in message and "'agentd'" in message
    assert f"token_file {tmp_path / 'jenkins.token'}" in message
    assert wrong not in json.dumps(status)
    assert fake.count("POST", r"/computer/doCreateItem") == 0, "no create attempted with bad credentials"
    formatter = logging.Formatter("%(name)s %(message)s")
    for record in caplog.records:
        text = formatter.format(record)
        if record.exc_info:
            text += formatter.formatException(record.exc_info)
        assert wrong not in text and TOKEN not in text
    assert any("HTTP 401" in record.getMessage() for record in caplog.records)
    assert {record.name for record in caplog.records if record.name.startswith("agentd.jenkins")} == \
        {"agentd.jenkins.link"}, "the link's lines keep their logger name"


def test_user_without_permission_gets_a_permission_message(fake, make_link):
    fake.add_user("reader", "reader-token-1234", {"read"})
    link = make_link(token="reader-token-1234", user="reader")
    assert link.sync() is False
    status = link.status()
    assert status["state"] == "auth-error"
    assert "HTTP 403" in status["last_error"] and "Agent/Create" in status["last_error"]
    assert "reader-token-1234" not in json.dumps(status)


def test_server_errors_are_recorded_then_recovered(fake, make_link):
    link = make_link()
    fake.fail_next(3)
    assert link.sync() is False
    status = link.status()
    assert status["state"] == "error" and "500" in status["last_error"]
    assert status["consecutive_failures"] == 1
    wait_for(link.sync, timeout=5, what="recovery after 500s")
    assert link.status()["state"] == "online" and link.status()["consecutive_failures"] == 0


def test_timeouts_are_an_error_not_an_exception(fake, make_link):
    link = make_link(timeout_s=0.2)
    fake.set_delay(0.5)
    assert link.sync() is False
    assert "timed out" in link.status()["last_error"]
    fake.set_delay(0)
    assert link.sync()


def test_controller_down_backs_off_and_recovers_in_the_background(fake, make_link):
    link = make_link()
    fake.stop()
    started = time.monotonic()
    link.start()
    wait_for(lambda: link.status()["consecutive_failures"] >= 4, what="4 failed attempts")
    elapsed = time.monotonic() - started
    status = link.status()
    assert status["state"] == "error" and "connection refused" in status["last_error"]
    assert fake.url in status["last_error"]
    # backoff: after failures 1..3 the loop waited at least 0.025 + 0.05 + 0.1 s (no tight loop)
    assert elapsed >= 0.17
    link.request_offline("drain")  # wakes during an outage do not shorten the backoff...
    fake.start()
    wait_for(lambda: link.status()["state"] == "offline", what="recovery")  # ...but are applied on recovery
    assert fake.nodes[NODE].temporarily_offline
    link.request_online()
    wait_for(lambda: not fake.nodes[NODE].temporarily_offline, what="online again")
    assert link._thread.is_alive()


@pytest.mark.parametrize("fake", SUPPORTED, indirect=True)
def test_agent_jar_downloaded_verified_cached_and_refetched_on_version_change(fake, make_link, tmp_path):
    dest = tmp_path / "jar"
    link = make_link(launcher="inbound", agent_jar_dir=str(dest))
    assert link.sync(), link.status()["last_error"]
    jar = dest / "agent.jar"
    assert jar.read_bytes() == fake.agent_jar()
    assert (dest / "agent.jar.version").read_text().strip() == fake.version
    assert link.status()["agent_jar_version"] == fake.version and link.status()["agent"]["jar"] == str(jar)
    assert link.sync(), link.status()["last_error"]
    assert fake.count("GET", r"/jnlpJars/agent.jar") == 1, "cached while the controller version is the same"
    fake.set_version("2.479.1")
    assert link.sync(), link.status()["last_error"]
    assert fake.count("GET", r"/jnlpJars/agent.jar") == 2 and jar.read_bytes() == fake.agent_jar("2.479.1")
    fake.set_version("2.480")
    fake.serve_bad_jar = True
    assert link.sync() is False
    assert "did not return a jar" in link.status()["last_error"]
    assert jar.read_bytes() == fake.agent_jar("2.479.1"), "a bad download never replaces the cached jar"
    assert sorted(p.name for p in dest.iterdir()) == ["agent.jar", "agent.jar.version", SECRET_FILE_NAME]


@pytest.mark.parametrize("fake", SUPPORTED, indirect=True)
def test_agent_secret_comes_from_the_jnlp_file(fake, make_link, tmp_path):
    link = make_link(launcher="inbound")
    assert link.sync(), link.status()["last_error"]
    secret_file = tmp_path / "agent" / SECRET_FILE_NAME
    assert secret_file.read_text() == fake.agent_secret(NODE) + "\n"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert fake.count("GET", rf"/computer/{NODE}/jenkins-agent.jnlp") == 1
    assert fake.agent_secret(NODE) not in json.dumps(link.status())


@pytest.mark.parametrize("fake", SUPPORTED, indirect=True)
def test_inbound_launcher_runs_agent_jar_with_the_secret_in_a_file(fake, make_link, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    link = make_link(launcher="inbound", websocket=True)
    assert link.sync(), link.status()["last_error"]
    agent = link.status()["agent"]
    pid = wait_for(lambda: link.status()["agent"]["pid"], what="agent started")
    secret = fake.agent_secret(NODE)
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    starts = wait_for(lambda: (tmp_path / "java-starts.jsonl").exists()
                      and (tmp_path / "java-starts.jsonl").read_text().splitlines(), what="fake java start")
    start = json.loads(starts[0])
    assert start["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest() and start["websocket"]
    assert start["argv"][start["argv"].index("-url") + 1] == fake.url
    assert start["argv"][start["argv"].index("-jar") + 1] == str(tmp_path / "agent" / "agent.jar")
    assert agent["command"][-1] == "-webSocket"
    # a new controller version brings a new agent.jar and a restart of the agent
    fake.set_version("2.500")
    assert link.sync()
    wait_for(lambda: link.status()["agent"]["pid"] not in (None, pid), what="agent restarted")
    link.stop()
    assert link.status()["agent"]["state"] == "stopped"
    for record in caplog.records:
        assert secret not in record.getMessage() and TOKEN not in record.getMessage()
    assert secret not in json.dumps(link.status())


def test_ssh_launcher_registers_ssh_settings_and_runs_no_agent(fake, make_link):
    link = make_link(launcher="ssh", ssh={"credentials_id": "gpu-ssh-key", "host": "gpu1.lan", "port": 2222})
    assert link.sync(), link.status()["last_error"]
    launcher = fake.nodes[NODE].launcher
    assert launcher.get("class") == SSH_LAUNCHER
    assert (launcher.findtext("host"), launcher.findtext("port"), launcher.findtext("credentialsId")) == \
        ("gpu1.lan", "2222", "gpu-ssh-key")
    assert link.status()["agent"] is None and fake.count("GET", r".*\.jnlp") == 0
    assert link.sync() and fake.count("POST", CONFIG_POST) == 0


def test_trigger_build_queues_a_parameterized_build_and_an_identical_one_is_already_queued(fake, trigger):
    fake.add_job("train-lora")
    first = trigger.trigger_build("train-lora", {"CONFIG_FILE": "/srv/configs/a b.yaml"})
    assert not first.already_queued and str(first) == f"queue item {first.queue_id}"
    assert fake.builds == [{"job": "train-lora", "params": {"CONFIG_FILE": "/srv/configs/a b.yaml"},
                            "queue_id": first.queue_id, "user": "agentd"}]
    assert fake.count("GET", r"/job/train-lora/api/json") == 1, "the job was checked before the first trigger"
    again = trigger.trigger_build("train-lora", {"CONFIG_FILE": "/srv/configs/a b.yaml"})
    assert again.already_queued and str(again) == "already queued" and len(fake.builds) == 1
    assert [r.status for r in fake.requests if r.path.endswith("buildWithParameters")] == [201, 303]
    assert fake.count("GET", r"/job/train-lora/api/json") == 1, "checked once, not before every trigger"
    fake.leave_queue()
    assert not trigger.trigger_build("train-lora", {"CONFIG_FILE": "/srv/configs/a b.yaml"}).already_queued


def test_trigger_reports_missing_job_parameter_and_disabled_job_by_name_before_building(fake, trigger):
    fake.add_job("needs-config", parameters=("CONFIG",))
    fake.add_job("no-params", parameters=())
    fake.add_job("off", disabled=True)
    cases = [("missing-job", "'missing-job' not found"),
             ("needs-config", "'needs-config' does not define the parameter 'CONFIG_FILE' (it defines 'CONFIG')"),
             ("no-params", "'no-params' takes no parameters"),
             ("off", "'off' is disabled")]
    for job, message in cases:
        with pytest.raises(LinkError, match=re.escape(message)):
            trigger.trigger_build(job, {"CONFIG_FILE": "/x.yaml"})
    assert fake.count("POST", r".*/buildWithParameters") == 0, "no build attempted"
    assert fake.builds == []
    # a job disabled after its first trigger: Jenkins' 409 is reported by name too
    fake.add_job("later-off")
    trigger.trigger_build("later-off", {"CONFIG_FILE": "/x.yaml"})
    fake.jobs["later-off"].disabled = True
    fake.leave_queue()
    with pytest.raises(LinkError, match=r"'later-off' is disabled \(HTTP 409"):
        trigger.trigger_build("later-off", {"CONFIG_FILE": "/x.yaml"})


def test_disabled_link_does_nothing():
    session = JenkinsSession(JenkinsSettings(), None)
    link = JenkinsLink(session, lambda: [])
    assert link.sync() is True
    assert link.status()["state"] == "disabled" and link.status()["token_source"] is None
    with pytest.raises(LinkError, match="disabled"):
        BuildTrigger(session).trigger_build("x", {})


def test_gpu_probe_failure_is_an_error_not_a_crash(fake, make_link):
    def broken():
        raise RuntimeError("NVML: driver not loaded")

    link = make_link(gpus=broken)
    assert link.sync() is False
    assert "GPU probe failed" in link.status()["last_error"] and NODE not in fake.nodes


@pytest.fixture
def tls_cert(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_is_verified_by_default_and_a_ca_bundle_can_be_given(tls_cert, tmp_path):
    with FakeJenkins(tls=tls_cert) as fake:
        base = dict(url=fake.url, user="agentd", token_env="T", node_name=NODE, launcher="none", timeout_s=5)
        strict = JenkinsLink(JenkinsSession(JenkinsSettings(**base), Secret(TOKEN)), lambda: [])
        assert strict.sync() is False
        message = strict.status()["last_error"]
        assert "TLS error: [SSL: CERTIFICATE_VERIFY_FAILED]" in message and "jenkins.ca_bundle" in message
        assert fake.requests == [], "nothing was sent over an unverified connection"
        with_ca = JenkinsLink(JenkinsSession(JenkinsSettings(**base, ca_bundle=tls_cert[0]), Secret(TOKEN)),
                              lambda: [])
        assert with_ca.sync(), with_ca.status()["last_error"]
        unverified = JenkinsLink(JenkinsSession(JenkinsSettings(**base, verify_tls=False), Secret(TOKEN)),
                                 lambda: [])
        assert unverified.sync(), unverified.status()["last_error"]


def test_fixing_the_token_and_restarting_brings_the_node_online(fake, make_link, tmp_path):
    """SIGHUP reloads nothing: a fixed token takes a restart, which must not wait out the backoff."""
    link = make_link(token="wrong-token-0000", retry_min_s=30.0, retry_max_s=60.0)
    link.start()
    wait_for(lambda: link.status()["state"] == "auth-error", what="auth error")
    started = time.monotonic()
    link.stop()
    assert time.monotonic() - started < 5, "stop cuts the 15-30 s backoff short"
    restarted = make_link(retry_min_s=30.0, retry_max_s=60.0)   # the daemon, restarted with the right token
    restarted.start()
    wait_for(lambda: restarted.status()["state"] == "online", timeout=5, what="online at once")
    assert NODE in fake.nodes


@pytest.mark.parametrize("fake", SUPPORTED, indirect=True)
def test_a_node_reconfiguration_keeps_agent_jar_running(fake, make_link):
    gpus = [rtx3090()]
    link = make_link(gpus=gpus, launcher="inbound")
    assert link.sync(), link.status()["last_error"]
    pid = wait_for(lambda: link.status()["agent"]["pid"], what="agent started")
    gpus.append(SimpleNamespace(name="NVIDIA A100-SXM4-80GB", memory_total_mib=81559, cuda_version="12.4"))
    assert link.sync()
    assert "gpu:a100-sxm4-80gb" in fake.nodes[NODE].labels.split() and fake.count("POST", CONFIG_POST) == 1
    assert link.status()["agent"]["pid"] == pid, "a label change must not abort the builds on this node"


# -- politeness, versions and the offline mark -----------------------------------------------------------

VRAM = "other processes hold more than max_foreign_vram_mib (4096 MiB) on every GPU: GPU 0 {} MiB (pid 4242)"


def test_requests_wake_the_loop_only_when_the_wanted_state_changes(fake, make_link):
    link = make_link(sync_interval_s=60)
    link.start()
    wait_for(lambda: link.status()["state"] == "online", what="first sync")
    fake.clear_requests()
    for _ in range(30):                 # the daemon's tick while nothing changes
        link.request_online()
        time.sleep(0.01)
    link.request_offline(VRAM.format(20000))
    wait_for(lambda: link.status()["state"] == "offline", what="offline")
    for i in range(30):                 # the foreign process' memory changes every tick
        link.request_offline(VRAM.format(20001 + i))
        time.sleep(0.01)
    link.request_offline("no healthy GPU: GPU 0: GPU is lost")     # another kind of reason
    wait_for(lambda: "no healthy GPU" in (link.status()["node_offline_reason"] or ""), what="new cause")
    link.request_online()
    wait_for(lambda: link.status()["state"] == "online", what="online")
    requests = [(r.method, r.path) for r in fake.requests]
    assert requests.count(("POST", f"/computer/{NODE}/changeOfflineCause")) == 1
    assert requests.count(("POST", f"/computer/{NODE}/toggleOffline")) == 2
    assert ("GET", "/") not in requests, "the controller version comes from responses already made"
    # three wakes, each: the node's api/json + config.xml, the POST (+ its redirect) and api/json again
    assert len(requests) <= 3 * 5, requests


def test_the_node_comes_back_online_whatever_reconnects_did_to_the_cause(fake, make_link, tmp_path):
    """Before 2.482 a reconnect clears the cause and a broken connection replaces it (temporarilyOffline
    stays): the mark agentd keeps in its state folder, not the cause text, says the node is agentd's."""
    state = tmp_path / "state"
    link = make_link(state_dir=state)
    link.request_offline("agentd is draining: finishing the running jobs")
    assert link.sync()
    node = fake.nodes[NODE]
    assert node.temporarily_offline and (state / MARK_FILE_NAME).exists()
    fake.connect_agent(NODE)                 # agent.jar reconnects
    fake.connect_agent(NODE, False)          # its connection breaks
    fake.connect_agent(NODE)                 # and it reconnects again
    info = node.api_json(fake.version)
    if fake.version == "2.462.3":
        assert info["temporarilyOffline"] and info["offlineCauseReason"] == "" and info["offlineCause"] is None
    link.stop()
    restarted = make_link(state_dir=state)   # the daemon restarted in between
    assert restarted.status()["offline_mark"]["reason"] == "agentd: agentd is draining: finishing the running jobs"
    restarted.request_online()
    assert restarted.sync(), restarted.status()["last_error"]
    assert not node.temporarily_offline
    assert restarted.status()["offline_mark"] is None and not (state / MARK_FILE_NAME).exists()


def test_an_admins_cause_set_over_agentds_is_left_alone(fake, make_link, tmp_path):
    link = make_link(state_dir=tmp_path / "state")
    link.request_offline("agentd is draining: finishing")
    assert link.sync()
    fake.nodes[NODE].set_offline_by("admin", "replacing the PSU")
    link.request_online()
    assert link.sync()
    assert fake.nodes[NODE].temporarily_offline and fake.nodes[NODE].offline_reason == "replacing the PSU"
    assert link.status()["offline_mark"] is None and link.status()["node_offline_reason"] == "replacing the PSU"


def test_escaped_reasons_are_recognised_and_not_reposted(fake, make_link):
    link = make_link()
    reason = "GPU  0 \"busy\" <20 GiB> & o'k\nnext line"
    link.request_offline(reason)
    for _ in range(3):
        assert link.sync()
    assert fake.count("POST", rf"/computer/{NODE}/changeOfflineCause") == 0
    assert fake.count("POST", TOGGLE) == 1
    raw = fake.nodes[NODE].api_json(fake.version)["offlineCauseReason"]
    assert ("&quot;" in raw) == (fake.version == CURRENT_LTS), "escaped from 2.483 on"
    assert link.status()["node_offline_reason"] == "agentd: " + reason
    link.request_online()
    assert link.sync() and not fake.nodes[NODE].temporarily_offline


@pytest.mark.parametrize("fake", ["2.426.3"], indirect=True)
def test_a_controller_below_the_floor_is_reported_and_agent_jar_never_started(fake, make_link, tmp_path):
    link = make_link(launcher="inbound")
    for _ in range(3):
        assert link.sync()
    status = link.status()
    assert status["state"] == "unsupported-version" and status["controller_version"] == "2.426.3"
    assert "older than 2.440.1" in status["last_error"] and "Upgrade the controller" in status["last_error"]
    assert status["controller_version_note"] == status["last_error"]
    assert status["agent"] is None and java_starts(tmp_path) == []
    assert fake.count("GET", r".*\.jnlp") == 0 and fake.count("GET", r"/jnlpJars/agent.jar") == 0
    link.request_offline("agentd is draining")      # the node itself is still kept true
    assert link.sync() and fake.nodes[NODE].temporarily_offline


@pytest.mark.parametrize("fake", [{"version": "2.426.3", "strip_version_header": True}], indirect=True)
def test_an_agent_jar_that_prints_its_usage_is_reported_not_restarted(fake, make_link, tmp_path, caplog):
    link = make_link(launcher="inbound")
    link.start()
    status = wait_for(lambda: (lambda s: s if s["state"] == "unsupported-version" else None)(link.status()),
                      what="usage exit reported")
    assert status["controller_version"] is None and "X-Jenkins" in status["controller_version_note"]
    assert "printed its usage" in status["last_error"] and "-url" in status["last_error"]
    assert status["agent"]["state"] == "failed" and status["agent"]["last_exit_code"] == 0
    time.sleep(1.0)   # restart_min_s is 0.05 s: a restart loop would have started it many times by now
    starts = java_starts(tmp_path)
    assert len(starts) == 1 and starts[0]["usage_exit"] and starts[0]["remoting"] < 3176
    assert not any(r.exc_info for r in caplog.records), "a clear state, not a traceback"


@pytest.mark.parametrize("fake", [{"version": "2.462.3", "strip_version_header": True}], indirect=True)
def test_a_proxy_that_strips_x_jenkins_gives_a_clear_state(fake, make_link, caplog):
    link = make_link()
    assert link.sync() and link.sync()
    status = link.status()
    assert status["state"] == "online" and status["controller_version"] is None
    assert "no X-Jenkins header" in status["controller_version_note"]
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("fake", SUPPORTED, indirect=True)
def test_the_jnlp_secret_is_fetched_only_when_agent_jar_starts_or_exits(fake, make_link, tmp_path):
    link = make_link(launcher="inbound")
    for _ in range(4):
        assert link.sync(), link.status()["last_error"]
    pid = wait_for(lambda: link.status()["agent"]["pid"], what="agent started")
    jnlp = rf"/computer/{NODE}/jenkins-agent.jnlp"
    assert fake.count("GET", jnlp) == 1
    assert len(fake.warnings) == 1, "each JNLP fetch is a WARNING in the controller's log from 2.437"
    os.kill(pid, signal.SIGKILL)             # agent.jar dies (or fails to connect)
    wait_for(lambda: link.status()["agent"]["pid"] not in (None, pid), what="agent restarted")
    assert link.sync()
    assert fake.count("GET", jnlp) == 2
    assert link.sync() and fake.count("GET", jnlp) == 2


def test_403_on_config_xml_names_agent_configure(fake, make_link):
    fake.add_user("limited", "limited-token-1234", {"read", "create", "connect", "disconnect"})
    link = make_link(token="limited-token-1234", user="limited")
    assert link.sync(), link.status()["last_error"]          # creating the node needs no config.xml
    assert link.sync() is False
    message = link.status()["last_error"]
    assert "HTTP 403" in message and "grant it Agent/Configure" in message and "ExtendedRead" not in message


def test_config_xml_is_decoded_as_utf8_and_written_back_byte_for_byte(fake, make_link):
    link = make_link()
    assert link.sync()
    node = fake.nodes[NODE]
    node.properties = ET.fromstring(
        "<nodeProperties><hudson.slaves.EnvironmentVariablesNodeProperty><envVars><string>GREETING</string>"
        "<string>Grüße, 東京 &amp; café</string></envVars></hudson.slaves.EnvironmentVariablesNodeProperty>"
        "</nodeProperties>")
    served = node.config_xml().encode("utf-8")
    old_label = f"<label>{node.labels}</label>".encode()
    link.stop()
    link = make_link(labels=["gpu-node", "team-b"])      # the daemon, restarted with another label
    assert link.sync(), link.status()["last_error"]
    post = [r for r in fake.requests if r.method == "POST" and r.path == CONFIG_POST][-1]
    assert "charset=utf-8" in post.headers["Content-Type"].lower()
    new_label = f"<label>{' '.join(link.status()['labels'])}</label>".encode()
    assert post.body.replace(new_label, old_label) == served, "only the label's bytes changed"
    assert node.properties.findall(".//string")[1].text == "Grüße, 東京 & café"
    assert "team-b" in node.labels.split()
