"""install_service into a scratch root: files in place, ExecStart rewritten, settings never
overwritten, dry-run touches nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agentd import install
from agentd.install import install_service, rewrite_exec_start

REPO = Path(__file__).resolve().parent.parent
SETTINGS_STUB = "# settings used by test_install\nstop_timeout_s: 90\n"


@pytest.fixture
def source(tmp_path):
    """The checkout's systemd/ files, and configs/agentd.yaml (the real one when it exists)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "systemd", src / "systemd")
    (src / "configs").mkdir()
    example = REPO / "configs" / "agentd.yaml"
    (src / "configs" / "agentd.yaml").write_text(example.read_text() if example.exists() else SETTINGS_STUB)
    return src


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_install_puts_files_in_place(tmp_path, source, venv):
    root = tmp_path / "root"
    lines = install_service(venv, dry_run=False, root=root, source=source)

    unit = (root / "etc/systemd/system/agentd.service").read_text()
    shipped = (source / "systemd/agentd.service").read_text()
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [f'ExecStart="{venv}/bin/agentd" serve --config /etc/agentd/agentd.yaml']
    # Nothing else changed (ExecStartPre= included).
    assert [l for l in unit.splitlines() if not l.startswith("ExecStart=")] == \
           [l for l in shipped.splitlines() if not l.startswith("ExecStart=")]

    for installed, shipped_as in (("etc/sysusers.d/agentd.conf", "systemd/agentd.sysusers"),
                                  ("etc/tmpfiles.d/agentd.conf", "systemd/agentd.tmpfiles")):
        assert (root / installed).read_text() == (source / shipped_as).read_text()
    settings = root / "etc/agentd/agentd.yaml"
    assert settings.read_text() == (source / "configs/agentd.yaml").read_text()
    assert settings.stat().st_mode & 0o777 == 0o640  # no world access: group agentd reads it
    assert (root / "etc/systemd/system/agentd.service").stat().st_mode & 0o777 == 0o644
    assert not list(root.rglob(".*.tmp"))

    text = "\n".join(lines)
    # The commands act on the real machine: never under a scratch root.
    assert "skip `systemd-sysusers" in text and "skip `systemd-tmpfiles" in text
    assert "skip `systemctl daemon-reload`" in text
    for step in ("/etc/agentd/jenkins-token", "umask 077",
                 "/etc/agentd/agentd.yaml", "systemctl enable --now agentd",
                 "journalctl -u agentd -f", "agentd status"):
        assert step in text
    assert "warning" not in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_installed_unit_verifies(tmp_path, source, venv):
    root = tmp_path / "root"
    install_service(venv, dry_run=False, root=root, source=source)
    unit = root / "etc/systemd/system/agentd.service"
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert [l for l in proc.stderr.splitlines() if "agentd.service" in l] == []


def test_existing_settings_are_never_overwritten(tmp_path, source, venv):
    root = tmp_path / "root"
    settings = root / "etc/agentd/agentd.yaml"
    settings.parent.mkdir(parents=True)
    settings.write_text("jenkins: {url: http://mine}\n")
    settings.chmod(0o600)

    lines = install_service(venv, dry_run=False, root=root, source=source)
    assert settings.read_text() == "jenkins: {url: http://mine}\n"
    assert settings.stat().st_mode & 0o777 == 0o600
    assert any(line.startswith("keep existing") for line in lines)

    # Re-installing from another venv updates the unit, still keeps the settings.
    other = venv.parent / "venv2"  # where user agentd can reach it (a venv it cannot reach is refused)
    (other / "bin").mkdir(parents=True)
    (other / "bin" / "agentd").write_text("")
    install_service(other, dry_run=False, root=root, source=source)
    assert f"ExecStart={other}/bin/agentd serve" in (root / "etc/systemd/system/agentd.service").read_text()
    assert settings.read_text() == "jenkins: {url: http://mine}\n"


def test_dry_run_writes_nothing(tmp_path, source, venv):
    root = tmp_path / "root"
    root.mkdir()
    lines = install_service(venv, dry_run=True, root=root, source=source)
    assert files_under(root) == []
    text = "\n".join(lines)
    assert f"would install {root}/etc/systemd/system/agentd.service" in text
    assert f"would create {root}/etc/agentd/agentd.yaml" in text
    assert "systemctl enable --now agentd" in text


def test_missing_venv_is_reported(tmp_path, source):
    lines = install_service(tmp_path / "nope", dry_run=True, root=tmp_path / "root", source=source)
    assert any("does not exist" in line and "nope/bin/agentd" in line for line in lines)


def test_venv_in_a_private_folder_is_refused(tmp_path, source, venv):
    # Was a warning before the unit was written anyway; now nothing is written (issue 25).
    private = venv.parent
    private.chmod(0o700)
    root = tmp_path / "root"
    try:
        with pytest.raises(install.InstallError, match=f"may not enter {private} ") as e:
            install_service(venv, dry_run=False, root=root, source=source)
    finally:
        private.chmod(0o755)
    assert f"cannot run the agentd script {venv}/bin/agentd" in str(e.value) and "nothing was written" in str(e.value)
    assert not root.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the interpreter sits under a folder root owns "
                    "(0700), and user agentd is judged as the kernel would (as nobody, before sysusers creates it)")
def test_interpreter_under_a_private_folder_is_refused_naming_it(tmp_path, source, venv, capsys, monkeypatch):
    # The usual box set up as root: the venv's python is a symlink into root's home (a pyenv Python).
    home = Path(tempfile.mkdtemp(prefix="agentd-root-home-"))
    home.chmod(0o700)
    try:
        (home / ".pyenv/bin").mkdir(parents=True)
        python = home / ".pyenv/bin/python3.11"
        shutil.copy(sys.executable, python)
        (venv / "bin/python").symlink_to(python)
        # pip's launcher when the interpreter's path has a space (distlib's sh wrapper)
        (venv / "bin/agentd").write_text(f"#!/bin/sh\n'''exec' \"{venv}/bin/python\" \"$0\" \"$@\"\n' '''\n")
        assert install.interpreter_of(venv / "bin/agentd") == venv / "bin/python"
        who = install.service_identity()
        problem = install.execute_problem(venv / "bin/agentd", who)
        assert f"user agentd{'' if who.uid >= 0 else ' (not created yet'}" in problem
        assert f" cannot run its Python interpreter {venv}/bin/python: " in problem
        assert f"may not enter {home} (no search permission): folder {home} is mode 0700, owner root" in problem
        assert "install agentd under /opt with a system Python" in problem
        assert f"setfacl -m u:agentd:x {home} (or chmod o+x {home})" in problem
        # The command: --dry-run says so and exits non-zero; nothing written (the real / untouched).
        monkeypatch.setattr(sys, "prefix", str(venv))
        monkeypatch.setattr(install, "_write", lambda *a: pytest.fail(f"wrote {a[0]}"))
        from agentd.commands.install import main

        assert main("install-service", ["--dry-run"]) == 1
        err = capsys.readouterr().err
        assert f"may not enter {home} " in err and "setfacl" in err
        # Search granted on that folder (the second fix): it passes.
        home.chmod(0o711)
        assert install.execute_problem(venv / "bin/agentd", who) is None
    finally:
        shutil.rmtree(home)


def test_missing_example_settings(tmp_path, source, venv):
    (source / "configs/agentd.yaml").unlink()
    root = tmp_path / "root"
    lines = install_service(venv, dry_run=False, root=root, source=source)
    assert not (root / "etc/agentd/agentd.yaml").exists()
    assert any("no example settings" in line for line in lines)


def test_live_install_needs_root(monkeypatch, tmp_path, source, venv):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="as root"):
        install_service(venv, dry_run=False, root=Path("/"), source=source)


def test_live_dry_run_runs_nothing(monkeypatch, source, venv):
    """Dry-run against the real / lists the commands but neither writes nor runs anything."""
    monkeypatch.setattr(install, "_run", lambda cmd: pytest.fail(f"ran {cmd}"))
    monkeypatch.setattr(install, "_write", lambda *a: pytest.fail(f"wrote {a[0]}"))
    lines = install_service(venv, dry_run=True, root=Path("/"), source=source)
    assert "would install /etc/systemd/system/agentd.service" in lines


def test_rewrite_exec_start_only_touches_exec_start():
    unit = "[Service]\nExecStartPre=-+/usr/bin/x\nExecStart=/old/agentd serve --config /c.yaml\n"
    assert rewrite_exec_start(unit, Path("/new/bin/agentd")) == \
        "[Service]\nExecStartPre=-+/usr/bin/x\nExecStart=/new/bin/agentd serve --config /c.yaml\n"
    with pytest.raises(install.InstallError):
        rewrite_exec_start("[Service]\n", Path("/new/bin/agentd"))
