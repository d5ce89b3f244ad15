"""The stand-in half of the suite's warm interpreter (see zygote.py beside it).

tests/conftest.py puts this folder on PYTHONPATH for the programs the tests start. At start-up of such a
program, if it is one worth warming (`lora-train` training, `agentd serve`/`demo`, the fake-GPU daemon, the
multiprocessing forkserver that starts data-parallel ranks) and nothing about this process could make a forked
one behave differently, this process hands its argv, environment, working folder, umask, sys.path and file
descriptors (0-2 and any others it inherited, at their numbers) to the zygote, forwards every signal it
receives to the forked program, and exits with the program's status (or dies of its signal). Otherwise it
returns and the program runs here, cold, as it always did.
"""
from __future__ import annotations


def _warm_worth(sys) -> bool:
    import os

    argv = sys.argv
    if _forkserver(sys):
        return True
    name = os.path.basename(argv[0]) if argv else ""
    if name == "lora-train":
        return argv[1:2] not in (["validate"], ["-h"], ["--help"])
    if name == "agentd":
        return argv[1:2] in (["serve"], ["demo"])
    return name == "fake_gpu_daemon.py"


def _forkserver(sys) -> str | None:
    """The code of `python -c 'from multiprocessing.forkserver import main; main(...)'`: the forkserver that
    starts data-parallel ranks (trainer.training.distributed), which imports the training stack first."""
    orig = sys.orig_argv
    if sys.argv == ["-c"] and orig[-2:-1] == ["-c"] and orig[-1].startswith("from multiprocessing.forkserver import main;"):
        return orig[-1]  # after the interpreter options multiprocessing passes on (compared in _same_start)
    return None


# Environment variables that libraries read when they are imported (the zygote imported them under its own
# environment): a difference in any of them means a cold start.
_IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "TORCH", "PYTORCH", "OMP_", "MKL",
                         "OPENBLAS", "KMP_", "GOMP", "CUDA", "NVIDIA", "TOKENIZERS", "BNB", "MPL", "LANG", "LC_",
                         "LD_", "XDG_", "HOME", "PYTHON", "TMPDIR", "NUMEXPR", "AGENTD_TEST_COLD")
# Read later, not at import: PYTHONDONTWRITEBYTECODE and -B are compared as sys.flags; CUDA_DEVICE_ORDER when CUDA
# initializes, at a program's first GPU use (agentd serve sets it, so the forkserver its W-device jobs start has it).
_NOT_IMPORT_TIME = {"PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "CUDA_DEVICE_ORDER"}


def interpreter_options(sys) -> str:
    """What options (or the variables that set them) did to this interpreter: the zygote's must be the same."""
    return repr((tuple(sys.flags), sys.warnoptions, sorted(sys._xoptions.items())))  # noqa: SLF001


def _same_start(os, sys, zygote_env: dict) -> bool:
    import resource

    if os.environ.get("AGENTD_TEST_COLD") or os.environ.get("NOTIFY_SOCKET"):
        return False  # asked for; or systemd's protocol, which names the service by its pid: the real one
    if interpreter_options(sys) != zygote_env.get("_options") or sys.executable != zygote_env.get("_executable"):
        return False  # other interpreter options (-X, -W, -u, -B or their variables) or another interpreter
    if str(os.getuid()) != zygote_env.get("_uid") or str(os.getgid()) != zygote_env.get("_gid"):
        return False
    if repr(resource.getrlimit(resource.RLIMIT_AS)) != zygote_env.get("_rlimit_as"):
        return False
    mine = {**zygote_env["_set_here"], **os.environ}  # what this program's start would add, it adds there too
    keys = {k for k in (*mine, *zygote_env) if k.startswith(_IMPORT_TIME_PREFIXES)} - _NOT_IMPORT_TIME
    return all(mine.get(k) == zygote_env.get(k) for k in keys)


def _open_fds(os) -> list[int]:
    names = os.listdir("/proc/self/fd")  # includes the descriptor of the listing itself, closed by now
    out = []
    for name in names:
        try:
            os.fstat(int(name))
            out.append(int(name))
        except OSError:
            pass
    return out


def _hand_over() -> None:
    import os
    import sys

    path = os.environ.get("AGENTD_TEST_WARM_SOCKET")
    if not path or not _warm_worth(sys):
        return
    import json

    try:
        with open(path + ".env") as f:
            zygote_env = json.load(f)
    except (OSError, ValueError):
        return
    if not _same_start(os, sys, zygote_env):
        return
    import array
    import signal
    import socket

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        return  # the zygote is still importing (or gone): run cold
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:  # a closed standard stream: the program gets /dev/null, as CPython gives it
            opened.append(os.open(os.devnull, os.O_RDWR))
            fds.append(opened[-1])
    # Every other descriptor this process inherited (a forkserver's listener and "alive" pipe), at its number.
    inherited = sorted(fd for fd in _open_fds(os) if fd > 2 and fd not in (conn.fileno(), *opened))
    fds += inherited
    request = {"argv": sys.argv, "orig_argv": sys.orig_argv, "code": _forkserver(sys), "env": dict(os.environ),
               "cwd": os.getcwd(), "umask": os.umask(0o022), "path": sys.path, "fd_numbers": [0, 1, 2, *inherited]}
    os.umask(request["umask"])
    conn.sendmsg([(json.dumps(request) + "\n").encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    for fd in opened:
        os.close(fd)
    reader = conn.makefile("r")
    first = reader.readline()
    if not first:
        return  # the zygote refused before forking: nothing ran, run cold
    pid = json.loads(first)["pid"]

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}:
        try:
            signal.signal(sig, forward)
        except (OSError, ValueError):
            pass
    line = ""
    while not line:
        try:
            line = reader.readline()
            break
        except InterruptedError:
            continue
    end = json.loads(line) if line else {"signal": signal.SIGKILL}
    if "signal" in end:
        signal.signal(end["signal"], signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [end["signal"]])
        os.kill(os.getpid(), end["signal"])
    os._exit(end["exit"])


_hand_over()
