"""Who agent.jar (and so every Jenkins build on this node) runs as, and with which environment.

The daemon holds the Jenkins API token, the journal, the caches and the GPU slots. Builds run whatever a
Jenkinsfile says, so they must hold none of it: agent.jar is started as a separate unprivileged user
(`jenkins.agent_user`, `agentd-build` in the shipped unit and settings) with an environment built from
an allow-list, never copied from the daemon's (which holds `CREDENTIALS_DIRECTORY`, `NOTIFY_SOCKET`,
`WATCHDOG_*`, maybe a `token_env` variable).

Switching user needs CAP_SETUID and CAP_SETGID, which the unit grants the daemon (and nothing else). At
start the daemon clears its ambient and inheritable capability sets (`keep_capabilities_to_self`): a
capability in those sets would survive the execve of agent.jar, while the effective/permitted ones
that the daemon itself uses to switch do not survive an execve as a non-root user.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

CAP_SETGID, CAP_SETUID = 6, 7

# What agent.jar may inherit from the daemon's environment: locale, time zone, the search path, Java and
# proxy settings. Everything else (credentials, systemd's notify/watchdog variables, tokens) stays behind.
INHERITED_VARIABLES = frozenset({
    "PATH", "LANG", "LANGUAGE", "TZ", "JAVA_HOME", "JAVA_OPTS", "JDK_JAVA_OPTIONS",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
})
INHERITED_PREFIXES = ("LC_",)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class BuildUser:
    """The account agent.jar runs as: its uid, primary gid, supplementary groups, home and shell."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    @classmethod
    def lookup(cls, name: str) -> "BuildUser":
        """Raises LookupError with the fix when the user does not exist."""
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise LookupError(f"jenkins.agent_user {name!r} does not exist: run `agentd install-service` "
                              f"(it creates agentd-build) or create the user") from None
        groups = tuple(sorted(set(os.getgrouplist(name, pw.pw_gid)) - {pw.pw_gid}))
        return cls(name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, pw.pw_shell)


def agent_environment(environ: Mapping[str, str], user: Optional[BuildUser],
                      extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """agent.jar's environment: the allow-listed variables of `environ`, the user's identity
    (HOME, USER, LOGNAME, SHELL) and `extra` (explicit additions, e.g. from tests or the caller)."""
    env = {k: v for k, v in environ.items() if k in INHERITED_VARIABLES or k.startswith(INHERITED_PREFIXES)}
    env.setdefault("PATH", DEFAULT_PATH)
    # Builds run `agentd run`: the folder of this agentd (its venv's bin) comes first on their PATH.
    own_bin = os.path.dirname(os.path.abspath(sys.executable))
    if own_bin not in env["PATH"].split(os.pathsep):
        env["PATH"] = own_bin + os.pathsep + env["PATH"]
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell or "/bin/sh")
    env.update(extra or {})
    return env


def capabilities_from_status(status_text: str, which: str = "CapEff") -> int:
    """A capability set from /proc/PID/status (the hex mask on its `CapEff:`/`CapAmb:`/... line)."""
    for line in status_text.splitlines():
        if line.startswith(which + ":"):
            return int(line.split()[1], 16)
    return 0


def may_switch_to(user: BuildUser, euid: int, effective_caps: int) -> Optional[str]:
    """None when a process with this euid and effective capability mask can start processes as `user`."""
    if euid == user.uid or euid == 0:
        return None
    needed = (1 << CAP_SETUID) | (1 << CAP_SETGID)
    if effective_caps & needed == needed:
        return None
    return (f"jenkins.agent_user {user.name}: the daemon (uid {euid}) may not start processes as that user: it "
            f"needs CAP_SETUID and CAP_SETGID (the shipped unit grants them with AmbientCapabilities=); "
            f"run it as the service, or unset agent_user to run agent.jar as the daemon's user (then builds "
            f"can read the daemon's files)")


def own_effective_capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            return capabilities_from_status(f.read())
    except OSError:
        return 0


def keep_capabilities_to_self() -> None:
    """Clear this process's ambient and inheritable capabilities, so that no child keeps one across execve.

    The effective and permitted sets stay: the daemon needs CAP_SETUID/CAP_SETGID to start agent.jar as
    the build user, and an execve by a non-root user drops them from the child (no ambient, no file caps).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on kernels < 4.3: nothing to clear

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
    data = (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return
    if data[0].inheritable or data[1].inheritable:
        data[0].inheritable = data[1].inheritable = 0
        libc.capset(ctypes.byref(header), data)


def agent_files_problem(user: BuildUser, jar, secret_file, work_dir) -> Optional[str]:
    """Why `user` could not run agent.jar with these files (read the jar and the secret, write the work
    folder), with the fix; None when it can."""
    from pathlib import Path

    from agentd.access import READ, WRITE, Identity, access_problem

    who = Identity(user.uid, frozenset({user.gid, *user.groups}), user.name)
    for path, want, fix in (
            (Path(jar), READ, "keep agent.jar in a folder the build user may read"),
            (Path(secret_file), READ,
             f"make its folder group {user.name} with the setgid bit, e.g. "
             f"install -d -m 2750 -o $DAEMON_USER -g {user.name} {Path(secret_file).parent} "
             "(the shipped tmpfiles snippet does)"),
            (Path(work_dir), WRITE,
             f"give the folder to the build user, e.g. install -d -m 2770 -o {user.name} -g $SOCKET_GROUP "
             f"{work_dir}")):
        problem = access_problem(path, who, want)
        if problem:
            return f"{path}: {problem}; {fix}"
    return None


def drop_all_capabilities() -> None:
    """Give up every capability (effective, permitted, inheritable, ambient): for a daemon that starts no
    agent.jar as another user, holding CAP_SETUID/CAP_SETGID would only be a risk."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    if os.geteuid() != 0:  # root keeps root's powers: it is not the service's way to run
        libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)())


def settle_capabilities(agent_user: Optional[str]) -> None:
    """At daemon start: keep CAP_SETUID/CAP_SETGID (effective/permitted only) when agent.jar must be
    started as `agent_user`, else drop every capability."""
    if agent_user:
        keep_capabilities_to_self()
    else:
        drop_all_capabilities()


_KILLPG = ("import os, sys\n"
           "try:\n"
           "    os.killpg(int(sys.argv[1]), int(sys.argv[2]))\n"
           "except ProcessLookupError:\n"
           "    sys.exit(3)\n")


def signal_group_as(user: BuildUser, pgid: int, sig: int) -> None:
    """Send `sig` to process group `pgid` as `user`.

    The daemon may not signal agent.jar (another user) itself, and CAP_KILL would let it signal every
    process on the box; so a short-lived helper does it as the build user, with the CAP_SETUID/CAP_SETGID
    the daemon already holds. Raises ProcessLookupError when the group is gone.
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-I", "-c", _KILLPG, str(pgid), str(int(sig))], env={},
                          user=user.uid, group=user.gid, extra_groups=[], capture_output=True, timeout=30)
    if done.returncode == 3:
        raise ProcessLookupError(pgid)
    if done.returncode != 0:
        raise PermissionError(f"cannot signal agent.jar (process group {pgid}) as {user.name}: "
                              f"{done.stderr.decode(errors='replace').strip()[-200:]}")
