"""`agentd install-service`: put the systemd unit and its snippets in place on a GPU box.

What it does, in order (every step is listed in the returned lines; `dry_run` lists without doing):

1. /etc/systemd/system/agentd.service   from systemd/agentd.service, ExecStart= rewritten to
                                        <venv>/bin/agentd (replaced on every install: change settings
                                        with `systemctl edit agentd`, which survives re-installs)
2. /etc/sysusers.d/agentd.conf          from systemd/agentd.sysusers (users agentd and agentd-build)
3. /etc/tmpfiles.d/agentd.conf          from systemd/agentd.tmpfiles (/srv/agentd, its jenkins/ and agent/)
4. runs `systemd-sysusers` and `systemd-tmpfiles --create` on those two files, when present
5. /etc/agentd/agentd.yaml              from configs/agentd.yaml, only when absent (never overwritten);
                                        mode 0640, group agentd, so the daemon can read it
6. /etc/sysusers.d/agentd-socket-group.conf, when agentd.yaml sets a socket_group other than agentd:
                                        the daemon (which must own the socket and give it to that group)
                                        and agentd-build (which submits) become members; sysusers runs on it
7. runs `systemctl daemon-reload` when systemd is running

It does not enable or start the service: the Jenkins token and the settings come first (next steps).
Before any of it (and with `--dry-run` too), it checks that user agentd can run the unit's ExecStart=:
every folder on the resolved paths of bin/agentd and of the Python interpreter it names searchable, the
interpreter executable (a venv whose python resolves into root's 0700 home, as a pyenv Python does, is
the usual trap); if not, it names the folder that blocks and the two fixes, writes nothing, and fails.

`root` makes it testable: everything is written under it, and the commands (which act on the real
system) are skipped when it is not "/".
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Optional

from agentd.access import READ, SEARCH, Denied, Identity, groups_from_database, permitted, read_acl, resolve_as

# The source checkout: `make install-service` runs from an editable install, so systemd/ and configs/
# sit next to the package.
SOURCE_DIR = Path(__file__).resolve().parent.parent

UNIT_PATH = Path("etc/systemd/system/agentd.service")
SYSUSERS_PATH = Path("etc/sysusers.d/agentd.conf")
TMPFILES_PATH = Path("etc/tmpfiles.d/agentd.conf")
SETTINGS_PATH = Path("etc/agentd/agentd.yaml")
SOCKET_GROUP_PATH = Path("etc/sysusers.d/agentd-socket-group.conf")
DAEMON_USER, BUILD_USER = "agentd", "agentd-build"
TOKEN_PATH = Path("etc/agentd/jenkins-token")


class InstallError(RuntimeError):
    """A step failed; the message says which and how to finish by hand."""


def rewrite_exec_start(unit_text: str, executable: Path) -> str:
    """Point the unit's ExecStart= (not ExecStartPre= etc.) at `executable`, keeping its arguments."""
    exe = str(executable)
    if re.search(r"\s", exe):
        exe = '"' + exe.replace("\\", "\\\\").replace('"', '\\"') + '"'  # systemd's quoting
    new, count = re.subn(r"^ExecStart=\S+", lambda _m: "ExecStart=" + exe, unit_text, flags=re.M)
    if count != 1:
        raise InstallError(f"expected exactly one ExecStart= line in the unit, found {count}")
    return new


def _write(path: Path, text: str, mode: int) -> None:
    # Write next to the target and rename: a crash never leaves a half-written unit or config.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


NOT_CREATED_UID = -1  # owns no file: the "other" permissions decide


def service_identity(user: str = DAEMON_USER) -> Identity:
    """The service user as the kernel will judge it: its uid and groups, or, before `systemd-sysusers` has
    created it, a user who owns nothing and is in no group (only the "other" permissions apply)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return Identity(NOT_CREATED_UID, frozenset(), user)
    return Identity(pw.pw_uid, frozenset(groups_from_database(pw.pw_uid, pw.pw_gid)), user)


def interpreter_of(script: Path) -> Optional[Path]:
    """The interpreter a script's `#!` line names (a venv's bin/python for bin/agentd), None without one."""
    try:
        with open(script, "rb") as f:
            first, second = f.readline(4096), f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if words == ["/bin/sh"]:  # pip's launcher when the interpreter's path has a space: '''exec' "PATH" "$0" "$@"
        m = re.match(r"""'''exec' "([^"]+)" """, second.decode(errors="replace"))
        return Path(m[1]) if m else Path("/bin/sh")
    return Path(words[0]) if words else None


def execute_problem(executable: Path, who: Identity) -> Optional[str]:
    """None when `who` can run `executable` (a script: also its interpreter, the one systemd starts), else
    what blocks and the two fixes. Every folder on each resolved path must be searchable (symlinks followed,
    as a venv's bin/python into a pyenv or a home folder), the interpreter executable and the script readable."""
    for path, want, what in ((executable, READ, "the agentd script"),
                             (interpreter_of(executable), SEARCH, "its Python interpreter")):
        if path is None:
            continue
        try:
            real, exists = resolve_as(path, who)
        except Denied as e:
            return _execute_advice(who, f"{what} {path}", str(e), e.folder)
        if not exists:
            return f"{what} {path} does not exist; the service will not start without it"
        st = os.stat(real)
        if not permitted(st.st_mode, st.st_uid, st.st_gid, read_acl(real), who, want):  # SEARCH: x, execute on a file
            return _execute_advice(who, f"{what} {path}", f"{real} is mode {stat.S_IMODE(st.st_mode):04o}", None)
    return None


def _execute_advice(who: Identity, what: str, why: str, folder: Optional[Path]) -> str:
    grant = (f"grant user {DAEMON_USER} search on that folder: setfacl -m u:{DAEMON_USER}:x {folder} (or chmod o+x "
             f"{folder})" if folder is not None else f"give user {DAEMON_USER} access to it")
    who_text = f"user {who.user}" + (" (not created yet: judged by the permissions for other users)"
                                     if who.uid == NOT_CREATED_UID else "")
    return (f"{who_text} cannot run {what}: {why}. The unit would fail at its first start "
            f"with a permission error. Fix: install agentd under /opt with a system Python (e.g. python3 -m venv "
            f"/opt/agentd/.venv && /opt/agentd/.venv/bin/pip install <this checkout>, then run that venv's "
            f"`agentd install-service`), or {grant}")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"`{' '.join(cmd)}` failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")


def socket_group_snippet(group: str) -> str:
    """sysusers.d lines that put the daemon and the build user in the configured socket group."""
    return (f"# Written by `agentd install-service` from socket_group: {group} in /{SETTINGS_PATH}.\n"
            f"# The daemon may only give its socket to a group it belongs to; the build user submits jobs.\n"
            f"m {DAEMON_USER} {group}\nm {BUILD_USER} {group}\n")


def configured_socket_group(settings_path: Path) -> Optional[str]:
    """socket_group from agentd.yaml (None when unset, the default group, or the file is unreadable)."""
    import yaml

    try:
        data = yaml.safe_load(settings_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    group = data.get("socket_group") if isinstance(data, dict) else None
    return str(group) if group and str(group) != DAEMON_USER else None


def configured_agent_user(settings_path: Path) -> Optional[str]:
    """jenkins.agent_user from agentd.yaml (None when unset or unreadable)."""
    import yaml

    try:
        data = yaml.safe_load(settings_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    jenkins = data.get("jenkins") if isinstance(data, dict) else None
    return jenkins.get("agent_user") if isinstance(jenkins, dict) else None


def next_steps() -> list[str]:
    return [
        "Next steps:",
        "  1. Put the Jenkins API token in /etc/agentd/jenkins-token, readable by root only",
        "     (systemd hands it to the service as a credential):",
        "       sudo sh -c 'umask 077 && cat > /etc/agentd/jenkins-token'   # paste the token, then Ctrl-D",
        "  2. Edit /etc/agentd/agentd.yaml (Jenkins URL and user, node name, labels, stop_timeout_s).",
        "  3. Start it now and at every boot:  sudo systemctl enable --now agentd",
        "  4. Follow its log:                  journalctl -u agentd -f",
        "  5. Check it:                        agentd status",
        "     (as root, or as a member of group agentd:  sudo usermod -aG agentd $USER, then log in again)",
    ]


def install_service(prefix_venv: Path, dry_run: bool = False, root: Path = Path("/"),
                    source: Path = SOURCE_DIR) -> list[str]:
    """Install the unit for the agentd in virtual environment `prefix_venv`.

    Returns the lines to print: what was done (or, with `dry_run`, what would be done; nothing is
    written or run), then the next steps. Raises InstallError when a step fails, PermissionError
    when a real install (root "/") is not run as root.
    """
    root = Path(root)
    live = root == Path("/")  # acting on this machine, not on a test tree
    if live and not dry_run and os.geteuid() != 0:
        raise PermissionError("install-service writes to /etc and creates a system user: run it as "
                              "root, e.g.  sudo .venv/bin/agentd install-service")
    verb = "would " if dry_run else ""
    lines: list[str] = []

    executable = Path(os.path.abspath(prefix_venv)) / "bin" / "agentd"
    if not executable.exists():
        lines.append(f"warning: {executable} does not exist (yet); the service will not start without it")
    else:
        # Before anything is written: a unit that cannot start is worse than none.
        problem = execute_problem(executable, service_identity())
        if problem is not None:
            raise InstallError(problem + ("; nothing was written" if not dry_run else ""))

    unit = rewrite_exec_start((source / "systemd/agentd.service").read_text(encoding="utf-8"), executable)
    files = [
        (UNIT_PATH, unit),
        (SYSUSERS_PATH, (source / "systemd/agentd.sysusers").read_text(encoding="utf-8")),
        (TMPFILES_PATH, (source / "systemd/agentd.tmpfiles").read_text(encoding="utf-8")),
    ]
    for rel, text in files:
        dest = root / rel
        if not dry_run:
            _write(dest, text, 0o644)
        lines.append(f"{verb}install {dest}")
    lines.append(f"  ExecStart={executable} serve --config /{SETTINGS_PATH}")

    # The user must exist before the settings file can be given to its group, and /srv/agentd
    # before the unit can start (ReadWritePaths=).
    for tool, args, dest in (("systemd-sysusers", [], SYSUSERS_PATH),
                             ("systemd-tmpfiles", ["--create"], TMPFILES_PATH)):
        cmd = [tool, *args, str(root / dest)]
        if not live:
            lines.append(f"skip `{' '.join(cmd)}` (installing under {root}, not /)")
        elif shutil.which(tool) is None:
            lines.append(f"skip `{tool}`: not installed. Do by hand what {root / dest} says "
                         f"(e.g. useradd --system --home-dir /var/lib/agentd --shell /usr/sbin/nologin "
                         f"--groups video agentd; useradd --system --home-dir /srv/agentd/jenkins "
                         f"--shell /usr/sbin/nologin --groups agentd agentd-build; "
                         f"install -d -m 2770 -o agentd -g agentd /srv/agentd; "
                         f"install -d -m 2770 -o agentd-build -g agentd /srv/agentd/jenkins; "
                         f"install -d -m 2750 -o agentd -g agentd-build /srv/agentd/agent)")
        else:
            if not dry_run:
                _run(cmd)
            lines.append(f"{verb}run `{' '.join(cmd)}`")

    settings = root / SETTINGS_PATH
    example = source / "configs/agentd.yaml"
    if settings.exists():
        lines.append(f"keep existing {settings} (never overwritten)")
        if not configured_agent_user(settings):
            lines.append(f"  note: it sets no jenkins.agent_user, so agent.jar and every build would run as "
                         f"{DAEMON_USER} and could read the daemon's files: add `agent_user: {BUILD_USER}` under jenkins:")
    elif not example.exists():
        lines.append(f"warning: no example settings at {example}; write {settings} yourself")
    else:
        lines.append(f"{verb}create {settings} from {example}")
        if not dry_run:
            settings.parent.mkdir(parents=True, exist_ok=True)
            _write(settings, example.read_text(encoding="utf-8"), 0o640)
            if live:
                try:
                    shutil.chown(settings, group="agentd")  # the daemon (user agentd) must read it
                except (LookupError, OSError):
                    os.chmod(settings, 0o644)
                    lines.append(f"  group agentd not found: made {settings} world-readable instead")

    group = configured_socket_group(settings)
    if group is not None:
        dest = root / SOCKET_GROUP_PATH
        if not dry_run:
            _write(dest, socket_group_snippet(group), 0o644)
        lines.append(f"{verb}install {dest} (users {DAEMON_USER} and {BUILD_USER} join socket_group {group})")
        cmd = ["systemd-sysusers", str(dest)]
        if not live:
            lines.append(f"skip `{' '.join(cmd)}` (installing under {root}, not /)")
        elif shutil.which("systemd-sysusers") is None:
            lines.append(f"skip `systemd-sysusers`: not installed. Do it by hand: usermod -aG {group} {DAEMON_USER}; "
                         f"usermod -aG {group} {BUILD_USER}")
        else:
            if not dry_run:
                _run(cmd)
            lines.append(f"{verb}run `{' '.join(cmd)}`")

    if not live:
        lines.append(f"skip `systemctl daemon-reload` (installing under {root}, not /)")
    elif shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        lines.append("skip `systemctl daemon-reload`: systemd is not running on this machine")
    else:
        if not dry_run:
            _run(["systemctl", "daemon-reload"])
        lines.append(f"{verb}run `systemctl daemon-reload`")

    if not (root / TOKEN_PATH).exists():
        lines.append(f"note: /{TOKEN_PATH} does not exist yet (step 1 below)")
    return lines + [""] + next_steps()
