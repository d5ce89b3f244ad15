"""JenkinsLink over real HTTP against the fake controller (tests/fake_jenkins.py).

python-jenkins is not mocked: every call goes over a socket to the fake, which records it.
"""

import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agentd.jenkins.link import JenkinsLink, LinkError
from agentd.jenkins.settings import JenkinsSettings, Secret
from fake_jenkins import JNLP_LAUNCHER, SSH_LAUNCHER, FakeJenkins
from waiting import wait_for

TOKEN = "11c0ffee5ecret70ken"
FAKE_JAVA = f"{sys.executable} {Path(__file__).with_name('fake_java.py')}"
NODE = "gpu-box-1"
CONFIG_POST = rf"/computer/{NODE}/config.xml"
TOGGLE = rf"/computer/{NODE}/toggleOffline"



def rtx3090():
    return SimpleNamespace(name="NVIDIA GeForce RTX 3090", memory_total_mib=24576, cuda_version="12.4")


@pytest.fixture
def fake():
    with FakeJenkins() as controller:
        yield controller


@pytest.fixture
def make_link(fake, tmp_path, monkeypatch):
    links = []
    monkeypatch.setenv("FAKE_JAVA_LOG", str(tmp_path / "java-starts.jsonl"))

    def make(gpus=None, slots=None, token=TOKEN, **overrides):
        options = dict(url=fake.url, user="agentd", token_file=str(tmp_path / "jenkins.token"),
                       node_name=NODE, launcher="none", labels=["gpu-node"],
                       remote_fs=str(tmp_path / "remote"),
                       agent_jar_dir=str(tmp_path / "agent"), java=FAKE_JAVA, timeout_s=5,
                       sync_interval_s=0.2, retry_min_s=0.05, retry_max_s=0.4,
                       agent_restart_min_s=0.05, agent_restart_max_s=0.2)
        options.update(overrides)
        settings = JenkinsSettings(**options)
        facts = [rtx3090()] if gpus is None else gpus
        secret = Secret(token) if token else None
        link = JenkinsLink(settings, secret, lambda: facts, slots, rng=random.Random(7))
        links.append(link)
        return link

    yield make
    for link in links:
        link.stop()


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
    link.resync()
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


def test_set_offline_and_set_online_apply_at_once(fake, make_link):
    link = make_link()
    assert link.sync()
    link.set_offline("foreign process holds 20 GiB on GPU 0")
    assert fake.nodes[NODE].temporarily_offline
    link.set_offline("foreign process holds 20 GiB on GPU 0")
    assert fake.count("POST", TOGGLE) == 1
    link.set_online()
    link.set_online()
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


def test_agent_jar_downloaded_verified_cached_and_refetched_on_version_change(fake, make_link, tmp_path):
    link = make_link()
    dest = tmp_path / "jar"
    jar = link.download_agent_jar(dest)
    assert jar.read_bytes() == fake.agent_jar()
    assert (dest / "agent.jar.version").read_text().strip() == fake.version
    assert link.download_agent_jar(dest) == jar
    assert fake.count("GET", r"/jnlpJars/agent.jar") == 1, "cached while the controller version is the same"
    fake.set_version("2.479.1")
    link.download_agent_jar(dest)
    assert fake.count("GET", r"/jnlpJars/agent.jar") == 2 and jar.read_bytes() == fake.agent_jar("2.479.1")
    fake.set_version("2.480")
    fake.serve_bad_jar = True
    with pytest.raises(LinkError, match="did not return a jar"):
        link.download_agent_jar(dest)
    assert jar.read_bytes() == fake.agent_jar("2.479.1"), "a bad download never replaces the cached jar"
    assert sorted(p.name for p in dest.iterdir()) == ["agent.jar", "agent.jar.version"]


def test_agent_secret_comes_from_the_jnlp_file(fake, make_link):
    link = make_link()
    assert link.sync()
    secret = link.agent_secret()
    assert secret.reveal() == fake.agent_secret(NODE) and repr(secret) == "***"
    assert fake.count("GET", rf"/computer/{NODE}/jenkins-agent.jnlp") == 1


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


def test_trigger_build_queues_a_parameterized_build(fake, make_link):
    fake.add_job("train-lora")
    link = make_link()
    queue_id = link.trigger_build("train-lora", {"CONFIG_FILE": "/srv/configs/a b.yaml"})
    assert fake.builds == [{"job": "train-lora", "params": {"CONFIG_FILE": "/srv/configs/a b.yaml"},
                            "queue_id": queue_id, "user": "agentd"}]
    with pytest.raises(LinkError, match="'missing-job' not found"):
        link.trigger_build("missing-job", {"CONFIG_FILE": "/x.yaml"})


def test_disabled_link_does_nothing():
    link = JenkinsLink(JenkinsSettings(), None, lambda: [])
    assert link.sync() is True
    assert link.status()["state"] == "disabled" and link.status()["token_source"] is None
    with pytest.raises(LinkError, match="disabled"):
        link.trigger_build("x", {})


def test_gpu_probe_failure_is_an_error_not_a_crash(fake, make_link):
    link = make_link()

    def broken():
        raise RuntimeError("NVML: driver not loaded")

    link._gpus = broken
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
        strict = JenkinsLink(JenkinsSettings(**base), Secret(TOKEN), lambda: [])
        assert strict.sync() is False
        message = strict.status()["last_error"]
        assert "TLS error: [SSL: CERTIFICATE_VERIFY_FAILED]" in message and "jenkins.ca_bundle" in message
        assert fake.requests == [], "nothing was sent over an unverified connection"
        with_ca = JenkinsLink(JenkinsSettings(**base, ca_bundle=tls_cert[0]), Secret(TOKEN), lambda: [])
        assert with_ca.sync(), with_ca.status()["last_error"]
        unverified = JenkinsLink(JenkinsSettings(**base, verify_tls=False), Secret(TOKEN), lambda: [])
        assert unverified.sync(), unverified.status()["last_error"]


def test_fixing_the_token_and_reloading_cuts_the_backoff_short(fake, make_link, tmp_path):
    link = make_link(token="wrong-token-0000", retry_min_s=30.0, retry_max_s=60.0)
    link.start()
    wait_for(lambda: link.status()["state"] == "auth-error", what="auth error")
    link.update_settings(link.settings, Secret(TOKEN))   # the daemon re-read the token after a reload
    wait_for(lambda: link.status()["state"] == "online", timeout=5, what="online without waiting the backoff")
    assert NODE in fake.nodes


def test_reload_keeps_agent_jar_running_unless_its_own_settings_change(fake, make_link):
    link = make_link(launcher="inbound")
    assert link.sync(), link.status()["last_error"]
    pid = wait_for(lambda: link.status()["agent"]["pid"], what="agent started")
    link.update_settings(link.settings.model_copy(update={"labels": ["gpu-node", "team-a"]}), Secret(TOKEN))
    assert link.sync()
    assert "team-a" in fake.nodes[NODE].labels.split()
    assert link.status()["agent"]["pid"] == pid, "a label change must not abort the builds on this node"
    link.update_settings(link.settings.model_copy(update={"websocket": True}), Secret(TOKEN))
    assert link.sync()
    new_pid = wait_for(lambda: link.status()["agent"]["pid"], what="agent restarted")
    assert new_pid != pid and link.status()["agent"]["command"][-1] == "-webSocket"
    assert fake.nodes[NODE].launcher.findtext("webSocket") == "true"
