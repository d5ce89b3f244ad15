"""The fake controller answers like Jenkins does for what python-jenkins 1.8.3 calls (see its docstring)."""

import xml.etree.ElementTree as ET

import jenkins
import pytest
import requests

from fake_jenkins import FakeJenkins

TOKEN = "11c0ffee5ecret70ken"


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
