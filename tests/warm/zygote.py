"""A warm interpreter for the suite: forks `lora-train`, `agentd serve|demo` and the fake-GPU daemon from a
process that has already imported torch, diffusers, transformers and peft.

Why: on the 2-core CI machine each of those programs spends ~6 s of CPU importing the libraries before it
does anything, and the suite starts over a hundred of them; that import time, not the training, was most of
`make test`. The program itself is not changed or faked: the forked child runs the same console script with
the caller's argv, environment, working folder, umask, sys.path and standard streams (the file descriptors
themselves, passed over the socket), and its exit status and signals come back to the caller's process
(tests/warm/sitecustomize.py, the stand-in the test's Popen holds). Anything that could differ from a cold
start makes the stand-in run the program cold instead (see sitecustomize.py: another user, an rlimit, an
environment variable a library reads when it is imported, interpreter options, AGENTD_TEST_COLD=1).

Only third-party libraries are preloaded, never the project's own modules, so a test's PYTHONPATH (a
worktree, a fake module) still decides which code of ours runs.

Process tree per request: this zygote (single-threaded, so forking is safe) forks a watcher, which forks the
program. The watcher reports the program's pid, waits for it, and reports its exit; if the caller's stand-in
dies first (a test's SIGKILL of "the daemon"), the watcher SIGKILLs the program at once.

Usage: python zygote.py SOCKET_PATH (started by tests/conftest.py; exits when its parent pytest worker does).
"""
from __future__ import annotations

import array
import io
import json
import os
import select
import signal
import socket
import sys


def preload() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import importlib

        for module in ("numpy", "PIL.Image", "safetensors.torch", "torch", "peft"):
            importlib.import_module(module)
        import diffusers
        import transformers

        # The lazy modules import their classes on first use: touch the ones the tiny models use.
        for name in ("CLIPTextModel", "CLIPTokenizer", "CLIPTextModelWithProjection", "AutoModelForCausalLM",
                     "AutoTokenizer", "T5EncoderModel", "LlamaForCausalLM"):
            getattr(transformers, name, None)
        for name in ("UNet2DConditionModel", "AutoencoderKL", "StableDiffusionPipeline",
                     "StableDiffusionXLPipeline", "FluxPipeline", "FluxTransformer2DModel", "DDPMScheduler",
                     "FlowMatchEulerDiscreteScheduler"):
            getattr(diffusers, name, None)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        msg, ancdata, _flags, _addr = conn.recvmsg(1 << 20, socket.CMSG_SPACE(64 * fds.itemsize))
        if not msg:
            raise EOFError
        data += msg
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return json.loads(data), list(fds)


def reply(conn: socket.socket, msg: dict) -> None:
    try:
        conn.sendall((json.dumps(msg) + "\n").encode())
    except OSError:
        pass


def run_program(request: dict, fds: list[int]) -> None:
    """In the program's process: become the caller's program, run it, exit as the interpreter would."""
    import atexit
    import runpy
    import threading
    import traceback

    _install_fds(fds, request["fd_numbers"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update({**_set_by_imports, **request["env"]})
    sys.path[:] = request["path"]
    sys.argv[:] = request["argv"]
    sys.orig_argv[:] = request["orig_argv"]
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _standard_streams(request["env"])

    code: int = 0
    interrupted = False
    try:
        if request.get("code"):  # python -c CODE (the multiprocessing forkserver): run as CPython runs -c
            main = type(sys)("__main__")
            sys.modules["__main__"] = main
            exec(compile(request["code"], "<string>", "exec"), main.__dict__)  # noqa: S102 - the caller's -c
        else:
            runpy.run_path(request["argv"][0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:  # noqa: BLE001 - the interpreter's own behaviour: traceback, exit 1
        traceback.print_exc()
        code = 1
    # The interpreter's shutdown order: wait for non-daemon threads, run atexit callbacks, flush streams.
    try:
        threading._shutdown()  # noqa: SLF001
    except BaseException:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe at exit, as in a cold interpreter
            pass
    if interrupted:  # CPython ends an uncaught KeyboardInterrupt by dying of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _install_fds(fds: list[int], numbers: list[int]) -> None:
    """Put each received descriptor at the number it had in the caller (0-2, and e.g. a forkserver's listener
    and pipe), inheritable as there; first out of the way of every target number, so none is overwritten."""
    import fcntl

    above = max([*fds, *numbers]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]
    for fd in fds:
        os.close(fd)
    for fd, number in zip(moved, numbers):
        os.dup2(fd, number)  # dup2 clears close-on-exec: the program's children inherit them as usual
        os.close(fd)


def _taken(numbers: list[int], received: list[int]) -> bool:
    """Whether a descriptor number the program needs is one this zygote itself holds open (a library's): the
    program would lose it, so that caller runs cold instead."""
    mine = set()
    for name in os.listdir("/proc/self/fd"):  # the listing's own descriptor is closed again by fstat's turn
        try:
            os.fstat(int(name))
            mine.add(int(name))
        except OSError:
            pass
    return any(n in mine - {0, 1, 2, *received} for n in numbers)


_kept_streams: list = []
_set_by_imports: dict = {}


def _standard_streams(env: dict) -> None:
    """New sys.stdin/stdout/stderr on fds 0-2 made as CPython makes them at start-up (buffering by isatty
    and PYTHONUNBUFFERED), so the program buffers exactly as a cold start would."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    _kept_streams.extend([sys.stdin, sys.stdout, sys.stderr])  # never collected: they would close fds 0-2
    encoding = sys.stdout.encoding if sys.stdout else "utf-8"

    def writer(fd: int, errors: str, line_buffering: bool):
        raw = io.FileIO(fd, "wb", closefd=False)
        binary = raw if unbuffered else io.BufferedWriter(raw)
        return io.TextIOWrapper(binary, encoding=encoding, errors=errors, line_buffering=line_buffering,
                                write_through=unbuffered)

    try:
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "rb", closefd=False)), encoding=encoding,
                                     errors="strict")
    except OSError:
        sys.stdin = None
    sys.stdout = writer(1, "strict", os.isatty(1) and not unbuffered)
    sys.stderr = writer(2, "backslashreplace", True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def watch(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the watcher: fork the program, report its pid, then its exit; kill it if the caller dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    conn.settimeout(None)
    pid = os.fork()
    if pid == 0:
        conn.close()
        run_program(request, fds)
    for fd in fds:
        os.close(fd)
    reply(conn, {"pid": pid})
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(conn, select.POLLIN)
    caller_alive = True
    while True:
        for fd, _events in poller.poll():
            if fd == pidfd:
                _, status = os.waitpid(pid, 0)
                if os.WIFSIGNALED(status):
                    reply(conn, {"signal": os.WTERMSIG(status)})
                else:
                    reply(conn, {"exit": os.WEXITSTATUS(status)})
                os._exit(0)
            if caller_alive and not conn.recv(1):  # the stand-in is gone: so is "the program"
                caller_alive = False
                poller.unregister(conn)
                os.kill(pid, signal.SIGKILL)


def _reap_watchers() -> None:
    """Wait for finished watchers (so their CPU time counts in this process's children, like a cold start's)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def serve(path: str) -> None:
    from trainer.quiet import LIBRARY_ENV

    before = dict(os.environ)
    for name, value in LIBRARY_ENV.items():  # what our programs set before they import the libraries
        os.environ.setdefault(name, value)
    preload()
    # Variables set here (ours above; torch's TORCHINDUCTOR_CACHE_DIR): a cold program sets them the same way,
    # so a caller is compared with its environment plus these, and its program starts with them.
    global _set_by_imports
    _set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path + ".tmp"
    server.bind(tmp)
    server.listen(64)
    import resource

    from sitecustomize import interpreter_options  # beside this file (sys.path[0])

    facts = {"_executable": sys.executable, "_options": interpreter_options(sys), "_uid": str(os.getuid()), "_gid": str(os.getgid()),
             "_rlimit_as": repr(resource.getrlimit(resource.RLIMIT_AS)), "_set_here": _set_by_imports}
    with open(path + ".env", "w") as f:  # what a caller compares its own start with (sitecustomize.py)
        json.dump({**os.environ, **facts}, f)
    os.rename(tmp, path)  # callers see the socket only once the libraries are loaded
    server.settimeout(1.0)
    while os.getppid() == parent and not _stopping:
        _reap_watchers()
        try:
            conn, _ = server.accept()
        except (socket.timeout, InterruptedError):
            continue
        conn.settimeout(10)  # a caller that connects and says nothing does not hold up the others
        try:
            request, fds = receive(conn)
        except (EOFError, OSError, ValueError):
            conn.close()
            continue
        if _taken(request["fd_numbers"], [*fds, conn.fileno(), server.fileno()]):
            for fd in fds:
                os.close(fd)
            conn.close()  # no reply: the caller runs its program cold
            continue
        with open(path + ".log", "a") as log:  # which programs ran warm, for whoever wonders
            log.write(" ".join(request["orig_argv"][1:] if request.get("code") else request["argv"]) + "\n")
        if os.fork() == 0:
            server.close()
            watch(conn, request, fds)
        for fd in fds:
            os.close(fd)
        conn.close()
    _reap_watchers()
    os.unlink(path)
    os.unlink(path + ".env")


_stopping = False


def _stop(_signum, _frame) -> None:
    global _stopping
    _stopping = True


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)  # pytest_unconfigure: reap what is left, so its time counts too
    serve(sys.argv[1])
