"""The systemd unit and its snippets: `systemd-analyze verify` accepts them, they hold what the daemon
relies on, and the sysusers/tmpfiles snippets do what the unit expects (checked with the real tools
against a scratch root, since this machine runs no systemd)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "agentd.service"
SYSUSERS = REPO / "systemd" / "agentd.sysusers"
TMPFILES = REPO / "systemd" / "agentd.tmpfiles"
DOCUMENTED_STOP_TIMEOUT_S = 90.0  # the settings default the unit's comments promise


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat); enough for this unit (no line continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(timespan: str) -> float:
    """systemd time span ("120", "90s", "2min 30s") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


def settings_stop_timeout() -> float:
    """The daemon's own default for stop_timeout_s when its settings model exists, else the
    documented 90 s."""
    try:
        from agentd import settings
    except ImportError:
        return DOCUMENTED_STOP_TIMEOUT_S
    for obj in vars(settings).values():
        fields = getattr(obj, "model_fields", None)
        if isinstance(fields, dict) and "stop_timeout_s" in fields:
            return float(fields["stop_timeout_s"].default)
    return DOCUMENTED_STOP_TIMEOUT_S


def find_key(tree, key):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from find_key(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from find_key(item, key)


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT.read_text())


def one(unit, key, section="Service"):
    values = unit[section].get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once in [{section}], found {values}"
    return values[0]


def test_required_directives(unit):
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert seconds(one(unit, "WatchdogSec")) == 60
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "KillSignal") == "SIGTERM"
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "RuntimeDirectory") == "agentd"
    assert one(unit, "StateDirectory") == "agentd"
    assert "jenkins-token:/etc/agentd/jenkins-token" in unit["Service"]["LoadCredential"]
    assert one(unit, "User") == "agentd"
    assert one(unit, "Group") == "agentd"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert "/srv/agentd" in " ".join(unit["Service"]["ReadWritePaths"]).split()
    assert one(unit, "PrivateTmp") == "yes"
    assert one(unit, "DevicePolicy") == "closed"  # keeps /dev/null & co.; "strict" would not
    assert any(v.startswith("char-nvidia") for v in unit["Service"]["DeviceAllow"])
    assert one(unit, "ExecStart").endswith("/bin/agentd serve --config /etc/agentd/agentd.yaml")
    assert "multi-user.target" in one(unit, "WantedBy", "Install")


def test_no_write_xor_execute(unit):
    # torch.compile/Triton and the JVM need W+X memory.
    assert "MemoryDenyWriteExecute" not in unit["Service"]


def test_stop_timeout_leaves_room_for_the_daemons_own_deadline(unit):
    stop = seconds(one(unit, "TimeoutStopSec"))
    assert stop == 120
    assert settings_stop_timeout() < stop
    example = REPO / "configs" / "agentd.yaml"
    if example.exists():
        for value in find_key(yaml.safe_load(example.read_text()) or {}, "stop_timeout_s"):
            assert float(value) < stop, f"configs/agentd.yaml: stop_timeout_s={value} >= TimeoutStopSec"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart='s binary exists; everything else is the unit as shipped.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(), flags=re.M)
    unit_file = tmp_path / "agentd.service"
    unit_file.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit_file)],
                          capture_output=True, text=True, cwd=tmp_path)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "agentd.service" in line]
    assert ours == [], f"systemd-analyze verify (rc {proc.returncode}):\n" + "\n".join(ours)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_verify_would_catch_a_bad_directive(tmp_path):
    # Guards the test above: the check really reads our file.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(), flags=re.M)
    unit_file = tmp_path / "agentd.service"
    unit_file.write_text(text.replace("KillMode=mixed", "KillMode=mixed\nKilMode=typo"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit_file)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert "KilMode" in proc.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed on this machine")
def test_sysusers_creates_the_service_user(tmp_path):
    (tmp_path / "etc").mkdir()
    snippet = tmp_path / "agentd.conf"
    shutil.copy(SYSUSERS, snippet)
    proc = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(snippet)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    passwd, groups = (
        {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / name).read_text().splitlines()}
        for name in ("passwd", "group"))
    assert passwd["agentd"][5] == "/var/lib/agentd"  # = StateDirectory=agentd
    assert "agentd" in groups
    unit = parse_unit(UNIT.read_text())
    for group in " ".join(unit["Service"].get("SupplementaryGroups", [])).split():
        assert "agentd" in groups[group][3].split(","), f"agentd not in group {group}"


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None or shutil.which("systemd-sysusers") is None,
                    reason="systemd-tmpfiles/systemd-sysusers are not installed on this machine")
@pytest.mark.skipif(os.geteuid() != 0, reason="creating a folder owned by agentd needs root")
def test_tmpfiles_creates_every_read_write_path(tmp_path):
    (tmp_path / "etc").mkdir()
    for src, name in ((SYSUSERS, "users.conf"), (TMPFILES, "files.conf")):
        shutil.copy(src, tmp_path / name)
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(tmp_path / "users.conf")],
                   check=True, capture_output=True)
    proc = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(tmp_path / "files.conf")],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # ReadWritePaths= without "-" must exist before the service starts, or it fails (226/NAMESPACE).
    agentd_uid = next(int(line.split(":")[2]) for line in (tmp_path / "etc/passwd").read_text().splitlines()
                      if line.startswith("agentd:"))
    unit = parse_unit(UNIT.read_text())
    for path in " ".join(unit["Service"]["ReadWritePaths"]).split():
        if path.startswith("-"):
            continue
        made = tmp_path / path.lstrip("/")
        assert made.is_dir(), f"{path} is not created by agentd.tmpfiles"
        assert oct(made.stat().st_mode & 0o777) == "0o770"
        assert made.stat().st_uid == agentd_uid
