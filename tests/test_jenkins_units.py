"""Pure parts of the Jenkins link: settings, token, labels, backoff, and the reconcile decisions."""

import io
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from agentd.jenkins.backoff import backoff_delay
from agentd.jenkins.labels import (cuda_major_minor, derive_labels, is_valid_label, model_slug,
                                   node_description, vram_gib)
from agentd.jenkins.agent_jar import is_jar, parse_jnlp_secret
from agentd.jenkins.builds import job_problem
from agentd.jenkins.node_config import JNLP_LAUNCHER, SSH_LAUNCHER, plan_reconfig
from agentd.jenkins.offline import MARK_FILE_NAME, OfflineMarkStore, offline_action, reason_kind
from agentd.jenkins.reconcile import desired_spec
from agentd.jenkins.session import LinkError
from agentd.jenkins.versions import MIN_CONTROLLER_VERSION, version_problem
from agentd.jenkins.settings import JenkinsSettings, Secret, TokenError, read_token, token_source
from agentd.jenkins.watcher import is_candidate

TOKEN = "11c0ffee5ecret70ken"


def gpu(name="NVIDIA GeForce RTX 3090", mib=24576, cuda="12.4"):
    return SimpleNamespace(name=name, memory_total_mib=mib, cuda_version=cuda)


def settings(**kw):
    base = dict(url="http://ci.example:8080", user="agentd", token_env="JENKINS_TOKEN", node_name="gpu1",
                remote_fs="/srv/agentd/jenkins")  # as in CONFIG below, whatever the default is
    base.update(kw)
    return JenkinsSettings(**base)


# -- Secret and token -----------------------------------------------------------------------------------

def test_secret_never_shows_its_value():
    secret = Secret(TOKEN)
    for shown in (repr(secret), str(secret), f"{secret}", "%s" % secret, f"{secret!r}", str([secret])):
        assert TOKEN not in shown
    assert secret.reveal() == TOKEN
    assert secret == Secret(TOKEN) and secret != Secret("other")
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_read_token_from_file_strips_newline(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert read_token(settings(token_env=None, token_file=path)).reveal() == TOKEN


def test_read_token_warns_when_file_is_group_readable(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        read_token(settings(token_env=None, token_file=path))
    assert "chmod 600" in caplog.text and TOKEN not in caplog.text


def test_read_token_from_env_and_systemd_credential(tmp_path):
    assert read_token(settings(), environ={"JENKINS_TOKEN": f" {TOKEN} "}).reveal() == TOKEN
    (tmp_path / "jenkins-token").write_text(TOKEN)
    s = settings(token_env=None, token_credential="jenkins-token")
    assert read_token(s, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}).reveal() == TOKEN


@pytest.mark.parametrize("kw, environ, expected", [
    (dict(token_env=None, token_file=Path("/nonexistent/agentd.token")), {},
     "jenkins.token_file: file /nonexistent/agentd.token does not exist"),
    (dict(), {}, "environment variable JENKINS_TOKEN is not set"),
    (dict(), {"JENKINS_TOKEN": "  "}, "jenkins.token_env $JENKINS_TOKEN is empty"),
    (dict(token_env=None, token_credential="jt"), {}, "$CREDENTIALS_DIRECTORY is not set"),
    (dict(token_env=None, token_credential="jt"), {"CREDENTIALS_DIRECTORY": "/nonexistent"},
     "/nonexistent/jt does not exist"),
])
def test_read_token_errors_name_the_source(kw, environ, expected):
    with pytest.raises(TokenError) as info:
        read_token(settings(**kw), environ=environ)
    assert expected in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_read_token_unreadable_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0)
    with pytest.raises(TokenError, match="not readable"):
        read_token(settings(token_env=None, token_file=path))


def test_token_source_describes_without_token(tmp_path):
    assert token_source(settings()) == "token_env $JENKINS_TOKEN"
    assert token_source(settings(token_env=None, token_file=tmp_path / "t")) == f"token_file {tmp_path / 't'}"


# -- settings -------------------------------------------------------------------------------------------

def test_settings_defaults_and_disabled_link():
    s = JenkinsSettings()
    assert not s.enabled and s.launcher == "inbound" and s.verify_tls and s.node_name
    assert s.remote_fs == "/srv/agentd/jenkins"  # outside the daemon's state folder
    assert settings().url == "http://ci.example:8080/"


@pytest.mark.parametrize("kw, message", [
    (dict(bogus=1), "Extra inputs are not permitted"),
    (dict(user=None), "jenkins.user is required"),
    (dict(token_env=None), "one of token_file, token_env, token_credential is required"),
    (dict(token_file="/x"), "set only one of"),
    (dict(url="ftp://x"), "http:// or https://"),
    (dict(url="https://bob:pw@ci.example"), "must not contain user:password@"),
    (dict(launcher="ssh"), "needs an ssh:"),
    (dict(labels=["gpu node"]), "invalid label"),
    (dict(node_name="a/b"), "refuses in node names"),
    (dict(retry_min_s=10, retry_max_s=1), "retry_min_s must not exceed"),
    (dict(watch={"dir": "/x", "job": "train", "debounce": 1}), "Extra inputs"),
])
def test_settings_validation_errors(kw, message):
    with pytest.raises(ValidationError) as info:
        settings(**kw)
    assert message in str(info.value)


def test_every_settings_field_is_documented():
    from agentd.jenkins.settings import SshLauncherSettings, WatchSettings
    for model in (JenkinsSettings, SshLauncherSettings, WatchSettings):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


# -- labels ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, slug", [
    ("NVIDIA GeForce RTX 3090", "rtx3090"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
    ("NVIDIA GeForce GTX 1080 Ti", "gtx1080-ti"),
    ("Tesla T4", "t4"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
    ("NVIDIA RTX A6000", "rtx-a6000"),
    ("NVIDIA RTX 6000 Ada Generation", "rtx6000-ada"),
    ("AMD Instinct MI300X", "mi300x"),
    ("???", "unknown"),
    (None, "unknown"),
])
def test_model_slug(name, slug):
    assert model_slug(name) == slug
    assert is_valid_label(f"gpu:{slug}")


@pytest.mark.parametrize("mib, gib", [(24576, 24), (24564, 24), (81559, 80), (81920, 80), (40960, 40),
                                      (23028, 24), (15109, 16), (143771, 141), (11264, 11), (8192, 8),
                                      (13312, 13), (512, 1)])
def test_vram_gib(mib, gib):
    assert vram_gib(mib) == gib


def test_cuda_major_minor():
    assert cuda_major_minor("12.4.1") == "12.4"
    assert cuda_major_minor("12") == "12.0"
    assert cuda_major_minor(None) is None and cuda_major_minor("n/a") is None


def test_derive_labels_sorted_unique_atoms():
    labels = derive_labels([gpu(), gpu(), gpu("NVIDIA A100-SXM4-80GB", 81559, "12.2.0")], ["gpu-node", "gpu"])
    assert labels == sorted(labels)
    assert labels == ["cuda:12.2", "cuda:12.4", "gpu", "gpu-node", "gpu:a100-sxm4-80gb", "gpu:rtx3090",
                      "vram:24g", "vram:80g"]
    assert all(is_valid_label(label) and " " not in label for label in labels)


def test_derive_labels_cpu_only_and_unknown_facts():
    assert derive_labels([], ["trainer"]) == ["cpu-only", "trainer"]
    assert derive_labels([gpu(mib=None, cuda=None)]) == ["gpu", "gpu:rtx3090"]
    with pytest.raises(ValueError):
        derive_labels([], ["two words"])


def test_node_description():
    text = node_description([gpu(), gpu()], "0.1.0", 2)
    assert text == "agentd 0.1.0: 2x NVIDIA GeForce RTX 3090 (24 GiB), CUDA 12.4; 2 slots"
    assert node_description([], "0.1.0", 1) == "agentd 0.1.0: no GPU (cpu-only); 1 slot"
    lost = SimpleNamespace(name=None, memory_total_mib=None, cuda_version=None)  # a GPU NVML lost
    assert node_description([lost, gpu()]) == "agentd: NVIDIA GeForce RTX 3090 (24 GiB), unknown GPU, CUDA 12.4"
    assert derive_labels([lost]) == ["gpu", "gpu:unknown"]


# -- backoff --------------------------------------------------------------------------------------------

def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(1)
    for failures in range(1, 200):
        base = min(30.0, 0.5 * 2 ** (failures - 1))
        delay = backoff_delay(failures, 0.5, 30.0, rng)
        assert base / 2 <= delay <= base
    delays = {round(backoff_delay(1, 1.0, 60.0, rng), 6) for _ in range(20)}
    assert len(delays) > 1, "jitter"
    assert backoff_delay(0, 1.0, 60.0, rng) >= 0.5


# -- reconcile decisions --------------------------------------------------------------------------------

DISCONNECTED = {"offline": True, "temporarilyOffline": False}
CONNECTED = {"offline": False, "temporarilyOffline": False}
USER = {"_class": "hudson.slaves.OfflineCause$UserCause"}
OURS = {"offline": True, "temporarilyOffline": True, "offlineCauseReason": "agentd: drain", "offlineCause": USER}
ADMINS = {"offline": True, "temporarilyOffline": True, "offlineCauseReason": "disk swap", "offlineCause": USER}
# Jenkins < 2.482: a reconnect clears the cause, a broken connection replaces it; temporarilyOffline stays.
CLEARED = {"offline": False, "temporarilyOffline": True, "offlineCauseReason": "", "offlineCause": None}
BROKEN = {"offline": True, "temporarilyOffline": True, "offlineCause": {"_class": "hudson.slaves.OfflineCause$ChannelTermination"},
          "offlineCauseReason": "Connection was broken: java.io.EOFException"}
# Jenkins >= 2.483 escapes the reason (hudson.Util.escape)
ESCAPED = {"offline": True, "temporarilyOffline": True, "offlineCause": USER,
           "offlineCauseReason": "agentd: GPU&nbsp; 0 &quot;busy&quot; &lt;20 GiB&gt; &amp; o&#039;k"}
VRAM = "agentd: other processes hold more than max_foreign_vram_mib (4096 MiB) on every GPU: GPU 0 {} MiB"


@pytest.mark.parametrize("info, wanted, mark, expected", [
    (DISCONNECTED, None, None, (None, None)),          # a merely disconnected agent is not toggled "online"
    (CONNECTED, None, "agentd: drain", (None, None)),   # someone brought it online: the mark is dropped
    (DISCONNECTED, "agentd: drain", None, ("toggle", "agentd: drain")),
    (OURS, "agentd: drain", "agentd: drain", (None, "agentd: drain")),
    (OURS, "agentd: drain", None, (None, "agentd: drain")),      # the prefix still says it is ours
    (OURS, "agentd: gpu lost", "agentd: drain", ("change-cause", "agentd: gpu lost")),
    (OURS, None, "agentd: drain", ("toggle", None)),
    (ADMINS, None, None, (None, None)),                # an admin's offline mark is left alone
    (ADMINS, "agentd: drain", None, (None, None)),
    (ADMINS, None, "agentd: drain", (None, None)),     # the admin re-labelled it: theirs now
    (CLEARED, None, "agentd: drain", ("toggle", None)),
    (CLEARED, None, None, (None, None)),               # not ours to bring back without a mark
    (BROKEN, None, "agentd: drain", ("toggle", None)),
    (CLEARED, "agentd: drain", "agentd: drain", ("change-cause", "agentd: drain")),
    (ESCAPED, "agentd: GPU  0 \"busy\" <20 GiB> & o'k", "agentd: GPU  0 \"busy\" <20 GiB> & o'k",
     (None, "agentd: GPU  0 \"busy\" <20 GiB> & o'k")),
    ({**OURS, "offlineCauseReason": VRAM.format(20123)}, VRAM.format(20480), VRAM.format(20123),
     (None, VRAM.format(20123))),                      # new numbers, same kind: no changeOfflineCause
])
def test_offline_action(info, wanted, mark, expected):
    assert offline_action(info, wanted, mark) == expected


def test_reason_kind_ignores_numbers_and_details():
    assert reason_kind(VRAM.format(1)) == reason_kind(VRAM.format(23456)) == reason_kind(VRAM.format(1)[8:])
    assert reason_kind("agentd is draining: finishing") != reason_kind(VRAM.format(1))
    assert reason_kind("no healthy GPU: GPU 0 lost") == reason_kind("no healthy GPU: GPU 1 lost; GPU 2 lost")


def test_offline_mark_persists_per_controller_and_node(tmp_path):
    store = OfflineMarkStore(tmp_path, "http://ci/", "gpu1")
    assert store.reason is None and not (tmp_path / MARK_FILE_NAME).exists()
    store.set("agentd: drain")
    assert OfflineMarkStore(tmp_path, "http://ci/", "gpu1").reason == "agentd: drain"
    assert OfflineMarkStore(tmp_path, "http://ci/", "gpu2").reason is None
    assert OfflineMarkStore(tmp_path, "http://other/", "gpu1").reason is None
    store.set(None)
    assert not (tmp_path / MARK_FILE_NAME).exists()
    (tmp_path / MARK_FILE_NAME).write_text("{not json")
    assert OfflineMarkStore(tmp_path, "http://ci/", "gpu1").reason is None


@pytest.mark.parametrize("version, launcher, too_old", [
    ("2.426.3", "inbound", True), ("2.440.1", "inbound", False), ("2.439", "inbound", True),
    ("2.462.3", "inbound", False), ("2.516.3", "inbound", False), ("2.426.3", "none", False),
    ("2.426.3", "ssh", False), (None, "inbound", False), ("garbage", "inbound", False)])
def test_version_floor(version, launcher, too_old):
    problem = version_problem(version, launcher)
    assert bool(problem) == too_old
    if problem:
        assert version in problem and MIN_CONTROLLER_VERSION in problem and "Upgrade" in problem


PARAMS = {"property": [{"_class": "hudson.model.ParametersDefinitionProperty",
                        "parameterDefinitions": [{"name": "CONFIG_FILE"}, {"name": "EXTRA"}]}]}


@pytest.mark.parametrize("info, needle", [
    ({"buildable": True, **PARAMS}, None),
    ({"buildable": False, **PARAMS}, "'train' is disabled"),
    ({"buildable": True, "property": []}, "'train' takes no parameters"),
    ({"buildable": True, "property": [{"parameterDefinitions": [{"name": "CONFIG"}]}]},
     "'train' does not define the parameter 'CONFIG_FILE' (it defines 'CONFIG')"),
])
def test_job_problem_names_job_and_parameter(info, needle):
    problem = job_problem(info, "train", ["CONFIG_FILE"])
    assert (problem is None) if needle is None else (needle in problem)


CONFIG = """<?xml version='1.1' encoding='UTF-8'?>
<slave>
  <name>gpu1</name>
  <description>{description}</description>
  <remoteFS>/srv/agentd/jenkins</remoteFS>
  <numExecutors>{executors}</numExecutors>
  <mode>EXCLUSIVE</mode>
  <retentionStrategy class="hudson.slaves.RetentionStrategy$Always"/>
  <launcher class="hudson.slaves.JNLPLauncher">
    <workDirSettings><disabled>false</disabled></workDirSettings>
    <webSocket>false</webSocket>
  </launcher>
  <label>{labels}</label>
  <nodeProperties><hudson.slaves.EnvironmentVariablesNodeProperty/></nodeProperties>
</slave>"""


def test_plan_reconfig_is_idempotent_and_order_insensitive():
    spec = desired_spec(settings(), [gpu()], 1, "0.1.0")
    labels = "  ".join(reversed(spec.labels))
    current = CONFIG.format(description=spec.description, executors=1, labels=labels)
    changed, _ = plan_reconfig(current, spec)
    assert changed == []


def test_plan_reconfig_updates_only_what_differs_and_keeps_the_rest():
    spec = desired_spec(settings(labels=["extra"]), [gpu()], 2, "0.1.0")
    current = CONFIG.format(description=spec.description, executors=1, labels="gpu")
    changed, xml = plan_reconfig(current, spec)
    assert changed == ["numExecutors", "label"]
    assert "<numExecutors>2</numExecutors>" in xml and "EnvironmentVariablesNodeProperty" in xml
    assert plan_reconfig(xml, spec)[0] == []


def test_plan_reconfig_switches_launcher_and_leaves_it_alone_for_none():
    ssh = settings(launcher="ssh", ssh={"credentials_id": "gpu-key", "host": "gpu1.lan", "port": 2222})
    spec = desired_spec(ssh, [gpu()], 1, "0.1.0")
    assert spec.launcher_class == SSH_LAUNCHER
    current = CONFIG.format(description=spec.description, executors=1, labels=" ".join(spec.labels))
    changed, xml = plan_reconfig(current, spec)
    assert changed == ["launcher"]
    assert "<credentialsId>gpu-key</credentialsId>" in xml and "<port>2222</port>" in xml
    none_spec = desired_spec(settings(launcher="none"), [gpu()], 1, "0.1.0")
    assert none_spec.launcher_class == JNLP_LAUNCHER
    assert plan_reconfig(xml, none_spec)[0] == []


def test_plan_reconfig_writes_back_fields_it_does_not_own_byte_for_byte():
    spec = desired_spec(settings(labels=["extra"]), [gpu()], 2, "0.1.0")
    original = ("<?xml version='1.1' encoding='UTF-8'?>\n<slave>\n  <!-- kept -->\n  <name>gpu1</name>\n"
                "  <description/>\n  <remoteFS>/srv/agentd/jenkins</remoteFS>\n"
                "  <numExecutors>1</numExecutors>\n  <retentionStrategy class='hudson.slaves.RetentionStrategy$Always'/>\n"
                "  <launcher class=\"hudson.slaves.JNLPLauncher\">\n    <vmargs>-Dx=&quot;é&quot;</vmargs>\n  </launcher>\n"
                "  <nodeProperties><hudson.slaves.EnvironmentVariablesNodeProperty><envVars>"
                "<string>NAME</string><string>Grüße, 東京 &amp; &lt;tag&gt;</string></envVars>"
                "</hudson.slaves.EnvironmentVariablesNodeProperty></nodeProperties>\n</slave>\n").encode("utf-8")
    changed, updated = plan_reconfig(original, spec)
    assert changed == ["description", "numExecutors", "mode", "label", "launcher.webSocket"]
    assert isinstance(updated, bytes)
    text = updated.decode("utf-8")
    for kept in ("<!-- kept -->", "class='hudson.slaves.RetentionStrategy$Always'/>", "<vmargs>-Dx=&quot;é&quot;</vmargs>",
                 "<string>Grüße, 東京 &amp; &lt;tag&gt;</string>", "<?xml version='1.1' encoding='UTF-8'?>"):
        assert kept in text
    assert f"<description>{spec.description}</description>" in text and "<numExecutors>2</numExecutors>" in text
    assert "    <webSocket>false</webSocket>\n  </launcher>" in text
    # the bytes between the owned elements are untouched
    assert updated.startswith(original[:original.index(b"<description/>")])
    assert updated.endswith(original[original.index(b"  <nodeProperties>"):original.index(b"</slave>")]
                            + b"  <mode>EXCLUSIVE</mode>\n  <label>" + " ".join(spec.labels).encode()
                            + b"</label>\n</slave>\n")
    assert plan_reconfig(updated, spec)[0] == []


def test_plan_reconfig_keeps_the_declared_encoding():
    spec = desired_spec(settings(), [gpu()], 1, "0.1.0")
    original = ("<?xml version='1.0' encoding='ISO-8859-1'?><slave><name>gpu1</name>"
                "<description>Café</description></slave>").encode("iso-8859-1")
    changed, updated = plan_reconfig(original, spec)
    assert "description" in changed and updated.startswith(b"<?xml version='1.0' encoding='ISO-8859-1'?><slave><name>gpu1")
    assert spec.description.encode("iso-8859-1") in updated


def test_parse_jnlp_secret():
    secret = "a" * 64
    jnlp = (f"<jnlp><application-desc><argument>{secret}</argument><argument>gpu1</argument>"
            "<argument>-url</argument><argument>http://ci/</argument></application-desc></jnlp>")
    assert parse_jnlp_secret(jnlp) == secret
    with pytest.raises(LinkError, match="not XML"):
        parse_jnlp_secret("<html>login")
    with pytest.raises(LinkError, match="no agent secret"):
        parse_jnlp_secret("<jnlp><application-desc/></jnlp>")


def test_is_jar(tmp_path):
    good = tmp_path / "good.jar"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    good.write_bytes(buffer.getvalue())
    assert is_jar(good)
    (tmp_path / "truncated.jar").write_bytes(buffer.getvalue()[:-30])
    (tmp_path / "page.jar").write_text("<html>sign in</html>")
    assert not is_jar(tmp_path / "truncated.jar") and not is_jar(tmp_path / "page.jar")
    assert not is_jar(tmp_path / "missing.jar")


@pytest.mark.parametrize("relative, expected", [
    ("job.yaml", True), ("sub/job.YML", True), ("job.yaml.tmp", False), (".job.yaml.swp", False),
    ("4913", False), ("job.yaml~", False), (".#job.yaml", False), ("#job.yaml#", False),
    (".hidden/job.yaml", False), (".job.yaml", False), ("notes.txt", False), ("job.swp", False),
])
def test_is_candidate(tmp_path, relative, expected):
    assert is_candidate(tmp_path / relative, tmp_path) is expected
