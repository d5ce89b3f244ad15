"""Start a real `agentd serve` process on a private socket and state folder, for tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from agentd.client import DaemonUnreachable, request
from tests.conftest import BIN


class DaemonProc:
    """A daemon of one test. Its run folder (the socket's, under /tmp) lives as long as the test, not the
    process: a test that restarts the daemon on the same state (d.kill(); d.start()) keeps its socket path
    and finds the socket a crash leaves behind; `close_created_since` (conftest's autouse fixture, at the end
    of each test) stops what still runs and removes the folder."""

    created: list["DaemonProc"] = []  # in this process, in order; see close_created_since

    def __init__(self, root: Path, extra_settings: str = "", env: dict | None = None,
                 memory_limit_bytes: int | None = None, fake_gpus: list[dict] | None = None):
        self.memory_limit_bytes = memory_limit_bytes
        self.fake_gpus = fake_gpus  # run tests/fake_gpu_daemon.py: these fake GPUs, slots on the CPU
        self.root = root
        # Socket paths are limited to 107 bytes: keep it short, under /tmp.
        self.rundir = Path(tempfile.mkdtemp(prefix="agd-"))
        self.socket = self.rundir / "s"
        self.state = root / "state"
        self.settings = root / "agentd.yaml"
        self.settings.write_text(f"socket: {self.socket}\nstate_dir: {self.state}\ncache_dir: {root / 'cache'}\n"
                                 f"idle_client_timeout_s: 2\nstop_timeout_s: 60\n{extra_settings}")
        self.log = root / "daemon.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        DaemonProc.created.append(self)

    def start(self, timeout: float = 60) -> "DaemonProc":
        limit = self.memory_limit_bytes

        def limit_memory():  # a real address-space limit: allocations past it fail like a full machine's
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        argv = [str(BIN / "agentd"), "serve", "--config", str(self.settings)]
        if self.fake_gpus is not None:
            argv = [str(BIN / "python"), str(Path(__file__).parent / "fake_gpu_daemon.py"), str(self.settings),
                    json.dumps(self.fake_gpus)]
        self.proc = subprocess.Popen(argv,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "a"), env=self.env,
                                     preexec_fn=limit_memory if limit else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.request({"op": "ping"}).get("ok"):
                    return self
            except DaemonUnreachable:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not answer:\n{self.log.read_text()}")

    def request(self, msg: dict, timeout: float = 10) -> dict:
        """The daemon's reply to one message, through the client every `agentd` command uses."""
        return request(self.socket, msg, timeout)

    def status(self) -> dict:
        return self.request({"op": "status"})["status"]

    def agentd(self, *args, **kw) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "agentd"), *args, "--socket", str(self.socket)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env, **kw)

    def run(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "agentd"), *args, "--socket", str(self.socket)], capture_output=True,
                              text=True, env=self.env, timeout=timeout)

    def journal_rows(self, sql: str, args=()) -> list[dict]:
        import sqlite3

        db = sqlite3.connect(str(self.state / "journal.sqlite3"))
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(sql, args).fetchall()]
        finally:
            db.close()

    def wait_for(self, predicate, timeout: float = 120, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 90) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        """Stop the daemon if it still runs and remove the run folder this harness made."""
        self.stop()
        shutil.rmtree(self.rundir, ignore_errors=True)

    @classmethod
    def close_created_since(cls, count: int) -> None:
        """Close the daemons created after the first `count` (those of the test that just ended)."""
        while len(cls.created) > count:
            cls.created.pop().close()


class Tail:
    """Collects a child's stdout lines in a thread, so tests can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen):
        import queue
        import threading

        self.proc = proc
        self.lines: list[str] = []
        self._q: "queue.Queue[str | None]" = queue.Queue()

        def pump():
            for line in proc.stdout:
                self._q.put(line.rstrip("\n"))
            self._q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self._eof = False

    def until(self, needle: str, timeout: float = 120) -> list[str]:
        import queue

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._eof:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
                break
            self.lines.append(line)
            if needle in line:
                return self.lines
        raise AssertionError(f"never saw {needle!r}; got:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 300) -> tuple[int, list[str]]:
        code = self.proc.wait(timeout)
        while not self._eof:
            line = self._q.get(timeout=10)
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)
        return code, self.lines
