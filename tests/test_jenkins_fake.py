"""The fake controller answers like Jenkins does for what python-jenkins 1.8.3 calls, as the Jenkins version it
is given does (see its docstring for the source of each behaviour), and fake_java.py like that version's agent.jar."""

import json
import shlex
import subprocess
import xml.etree.ElementTree as ET

import jenkins
import pytest
import requests

from fake_java import FAKE_JAVA
from fake_jenkins import CURRENT_LTS, TOKEN, FakeJenkins, bundled_remoting, jenkins_escape



@pytest.fixture
def fake():
    with FakeJenkins() as controller:
        yield controller


def client(fake, user="agentd", token=TOKEN):
    return jenkins.Jenkins(fake.url, username=user, password=token, timeout=5)


def test_version_header_and_authentication_statuses(fake):
    assert requests.get(fake.url, auth=("agentd", TOKEN)).headers["X-Jenkins"] == fake.version
    anonymous = requests.get(fake.url + "me/api/json")
    assert anonymous.status_code == 403 and anonymous.headers["X-Jenkins"] == fake.version
    wrong = requests.get(fake.url + "me/api/json", auth=("agentd", "wrong"))
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == 'Basic realm="Jenkins"'
    with pytest.raises(jenkins.JenkinsException, match=r"\[401\]"):
        client(fake, token="wrong").get_whoami()
    assert client(fake).get_whoami()["id"] == "agentd"


def test_posts_need_the_sessions_crumb(fake):
    fake.add_job("j")
    session = requests.Session()
    session.auth = ("agentd", TOKEN)
    no_crumb = session.post(fake.url + "job/j/buildWithParameters?A=1")
    assert no_crumb.status_code == 403 and "No valid crumb" in no_crumb.text
    crumb = session.get(fake.url + "crumbIssuer/api/json").json()
    assert crumb["_class"] == "hudson.security.csrf.DefaultCrumbIssuer"
    assert crumb["crumbRequestField"] == "Jenkins-Crumb"
    ok = session.post(fake.url + "job/j/buildWithParameters?A=1", headers={"Jenkins-Crumb": crumb["crumb"]},
                      allow_redirects=False)
    assert ok.status_code == 201 and ok.headers["Location"] == fake.url + "queue/item/1/"
    other_session = requests.post(fake.url + "job/j/buildWithParameters?A=1", auth=("agentd", TOKEN),
                                  headers={"Jenkins-Crumb": crumb["crumb"]})
    assert other_session.status_code == 403, "a crumb belongs to its session"


def test_python_jenkins_node_round_trip(fake):
    j = client(fake)
    j.create_node("n1", numExecutors=2, nodeDescription="d", remoteFS="/r", labels="a b", exclusive=True,
                  launcher=jenkins.LAUNCHER_JNLP, launcher_params={"webSocket": True})
    with pytest.raises(jenkins.JenkinsException, match="already exists"):
        j.create_node("n1", remoteFS="/r", launcher_params={})
    info = j.get_node_info("n1")
    assert info["offline"] is True and info["temporarilyOffline"] is False  # no agent connected
    assert {label["name"] for label in info["assignedLabels"]} == {"a", "b", "n1"}
    assert info["numExecutors"] == 2
    config = ET.fromstring(j.get_node_config("n1"))
    assert config.findtext("mode") == "EXCLUSIVE" and config.findtext("label") == "a b"
    config.find("label").text = "c"
    j.reconfig_node("n1", ET.tostring(config, encoding="unicode"))
    assert fake.nodes["n1"].labels == "c"
    jnlp = requests.get(fake.url + "computer/n1/jenkins-agent.jnlp", auth=("agentd", TOKEN)).text
    arguments = [a.text for a in ET.fromstring(jnlp).findall("./application-desc/argument")]
    assert arguments[:3] == [fake.agent_secret("n1"), "n1", "-webSocket"]
    assert arguments[-2:] == ["-url", fake.url]
    j.delete_node("n1")
    assert not j.node_exists("n1")


def test_disable_node_pitfall_is_reproduced(fake):
    """python-jenkins' disable_node looks at `offline`, true for any disconnected agent: it does nothing."""
    j = client(fake)
    j.create_node("n1", remoteFS="/r", launcher=jenkins.LAUNCHER_JNLP, launcher_params={})
    j.disable_node("n1", "maintenance")
    assert fake.nodes["n1"].temporarily_offline is False
    fake.connect_agent("n1")
    j.disable_node("n1", "maintenance")
    info = j.get_node_info("n1")
    assert info["temporarilyOffline"] is True and info["offlineCauseReason"] == "maintenance"


def test_permissions_and_queue_item(fake):
    fake.add_user("viewer", "viewer-token", {"read"})
    fake.add_job("train", ["CONFIG_FILE"])
    with pytest.raises(jenkins.JenkinsException, match=r"\[403\]"):
        client(fake, "viewer", "viewer-token").create_node("n2", remoteFS="/r", launcher_params={})
    j = client(fake)
    number = j.build_job("train", {"CONFIG_FILE": "/c/x.yaml"})
    item = j.get_queue_item(number)
    assert item["actions"][0]["parameters"] == [
        {"_class": "hudson.model.StringParameterValue", "name": "CONFIG_FILE", "value": "/c/x.yaml"}]
    assert item["task"]["name"] == "train"


def test_controls_fail_stop_and_record(fake):
    fake.fail_next(1)
    assert requests.get(fake.url, auth=("agentd", TOKEN)).status_code == 500
    fake.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url, timeout=2)
    fake.start()
    assert requests.get(fake.url, auth=("agentd", TOKEN)).status_code == 200
    assert all("Authorization" not in r.headers for r in fake.requests)
    assert [(r.method, r.path, r.status) for r in fake.requests] == [("GET", "/", 500), ("GET", "/", 200)]


# -- version-faithful behaviour (see the fake's docstring for the Jenkins/remoting source of each) -------



def offline_node(fake, name="n1"):
    j = client(fake)
    j.create_node(name, remoteFS="/r", launcher=jenkins.LAUNCHER_JNLP, launcher_params={})
    fake.connect_agent(name)
    j.disable_node(name, "agentd: drain")     # toggleOffline with a message, as a user
    return j


@pytest.mark.parametrize("version, cleared", [("2.462.3", True), ("2.479.3", True), ("2.482", False),
                                              (CURRENT_LTS, False)])
def test_reconnects_clear_the_offline_cause_before_2_482(version, cleared):
    with FakeJenkins(version=version) as fake:
        j = offline_node(fake)
        assert j.get_node_info("n1")["offlineCauseReason"] == "agentd: drain"
        fake.connect_agent("n1", False)
        info = j.get_node_info("n1")
        assert info["temporarilyOffline"] is True
        if cleared:
            assert info["offlineCause"]["_class"] == "hudson.slaves.OfflineCause$ChannelTermination"
            assert info["offlineCauseReason"].startswith("Connection was broken")
        fake.connect_agent("n1")
        info = j.get_node_info("n1")
        assert info["temporarilyOffline"] is True
        assert info["offlineCauseReason"] == ("" if cleared else "agentd: drain")


@pytest.mark.parametrize("version, escaped", [("2.482", False), ("2.483", True), (CURRENT_LTS, True)])
def test_reasons_come_back_escaped_from_2_483(version, escaped):
    message = "a  b <c> & \"d\" 'e'\nf"
    with FakeJenkins(version=version) as fake:
        j = offline_node(fake)
        j.jenkins_open(requests.Request("POST", fake.url + "computer/n1/changeOfflineCause",
                                        params={"offlineMessage": message}))
        reason = j.get_node_info("n1")["offlineCauseReason"]
        assert reason == (jenkins_escape(message) if escaped else message)
    assert jenkins_escape(message) == "a&nbsp; b &lt;c&gt; &amp; &quot;d&quot; &#039;e&#039;<br>f"


@pytest.mark.parametrize("version, warns", [("2.426.3", False), ("2.437", True), (CURRENT_LTS, True)])
def test_each_jnlp_fetch_is_a_controller_warning_from_2_437(version, warns):
    with FakeJenkins(version=version) as fake:
        j = client(fake)
        j.create_node("n1", remoteFS="/r", launcher=jenkins.LAUNCHER_JNLP, launcher_params={})
        for _ in range(2):
            requests.get(fake.url + "computer/n1/jenkins-agent.jnlp", auth=("agentd", TOKEN)).raise_for_status()
        assert len(fake.warnings) == (2 if warns else 0)


def test_builds_303_when_identical_queued_409_disabled_400_unparameterized_unknown_dropped(fake):
    fake.add_job("train")
    fake.add_job("plain", parameters=())
    fake.add_job("off", disabled=True)
    session = requests.Session()
    session.auth = ("agentd", TOKEN)
    crumb = session.get(fake.url + "crumbIssuer/api/json").json()["crumb"]

    def post(job, query):
        return session.post(fake.url + f"job/{job}/buildWithParameters", params=query,
                            headers={"Jenkins-Crumb": crumb}, allow_redirects=False)

    assert post("train", {"CONFIG_FILE": "a.yaml", "NOT_DEFINED": "x"}).status_code == 201
    assert fake.builds[-1]["params"] == {"CONFIG_FILE": "a.yaml"}, "an undefined parameter is dropped silently"
    again = post("train", {"CONFIG_FILE": "a.yaml"})
    assert again.status_code == 303 and again.headers["Location"] == fake.url + "job/train/"
    assert post("train", {"CONFIG_FILE": "b.yaml"}).status_code == 201
    assert post("off", {"CONFIG_FILE": "a.yaml"}).status_code == 409
    assert post("plain", {"CONFIG_FILE": "a.yaml"}).status_code == 400
    info = client(fake).get_job_info("train")
    assert info["buildable"] is True
    assert [d["name"] for d in info["property"][0]["parameterDefinitions"]] == ["CONFIG_FILE"]
    assert client(fake).get_job_info("plain")["property"] == []


def test_config_xml_has_no_charset_and_configure_implies_extended_read(fake):
    fake.add_user("configurer", "configurer-token", {"read", "configure"})
    client(fake).create_node("n1", remoteFS="/r", launcher=jenkins.LAUNCHER_JNLP, launcher_params={})
    response = requests.get(fake.url + "computer/n1/config.xml", auth=("configurer", "configurer-token"))
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/xml"
    assert response.content.startswith(b"<?xml version='1.1' encoding='UTF-8'?>")


def test_a_proxy_can_strip_x_jenkins():
    with FakeJenkins(strip_version_header=True) as fake:
        response = requests.get(fake.url, auth=("agentd", TOKEN))
        assert response.status_code == 200 and "X-Jenkins" not in response.headers
        j = client(fake)
        j.get_whoami()                    # python-jenkins sends credentials only after a first request
        with pytest.raises(KeyError):
            j.get_version()               # what python-jenkins does without the header


@pytest.mark.parametrize("version, accepts_url", [("2.426.3", False), ("2.437", True), ("2.440.1", True),
                                                  ("2.462.3", True), (CURRENT_LTS, True)])
def test_agent_jar_accepts_exactly_its_remotings_flags(version, accepts_url, tmp_path):
    with FakeJenkins(version=version) as fake:
        jar = tmp_path / "agent.jar"
        jar.write_bytes(fake.agent_jar())
    assert (int(bundled_remoting(version).split(".")[0]) >= 3176) == accepts_url
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    log = tmp_path / "starts.jsonl"

    def run(*args):
        return subprocess.run([*shlex.split(FAKE_JAVA), "-jar", str(jar), *args], capture_output=True,
                              text=True, timeout=30, env={"FAKE_JAVA_LOG": str(log), "FAKE_JAVA_MODE": "crash"})

    modern = run("-url", "http://ci/", "-name", "n1", "-secret", f"@{secret}", "-workDir", str(tmp_path))
    if accepts_url:
        assert modern.returncode == 3 and "connecting to http://ci/" in modern.stdout
    else:
        assert modern.returncode == 0 and '"-url" is not a valid option' in modern.stderr
        assert "java -jar agent.jar [options...]" in modern.stderr
    unknown = run("-bogus", "-url", "http://ci/")
    assert unknown.returncode == 0 and '"-bogus" is not a valid option' in unknown.stderr
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    assert starts[-1]["usage_exit"] and all(s["remoting"] == int(bundled_remoting(version).split(".")[0])
                                            for s in starts)
