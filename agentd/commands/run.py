"""agentd run CONFIG: the command a Jenkins build step runs.

It validates the config locally (exit 2 with every problem), submits it with the Jenkins variables
the run records (`trainer.api.jenkins_vars`), prints every event as one plain line (stdout is the
Jenkins console; on a terminal outside CI a live progress display instead of the step lines, `--plain`
to keep lines: `trainer.console`), and exits with the job's outcome (`trainer.errors.ExitCode`: succeeded, failed,
invalid config, cancelled, daemon unreachable, or an infrastructure failure: the GPU or driver failed
and the daemon's `max_infra_retries` re-queues are used up, so retry the build, e.g. with the
Jenkinsfile's `retry`, rather than fix the config), or 6: trained and saved, but the `eval:` stage decided
"worse" than what it compared with (its `evaluation` event), which the Jenkinsfile marks UNSTABLE.

- A daemon that is not up yet (`systemctl restart agentd`, a boot) is waited for, up to
  `--connect-timeout` (default 60 s), printing each try.
- `--priority N` overrides the config's `priority:` (higher runs first).
- `--nodes N --node-rank K --rdzv-endpoint HOST:PORT`: this box's part of one job over N boxes (the same command
  on each, K = 0 .. N-1; HOST:PORT is the first box's address and a free port every box reaches). Each box
  contributes its config's `devices:`; rank 0 on the first box reports the loss and writes everything. Boxes that
  do not all join within $AGENTD_RDZV_TIMEOUT_S (default 600 s) fail with exit 5 (README "One job over several boxes").
- An `agentd pause` of the job prints "paused" and keeps waiting until `agentd resume` continues it.

- A Jenkins abort (SIGTERM/SIGINT) forwards a cancel at once: the training is the daemon's, not this
  process's child. A build user's job is acted on only with the capability its submit reply carried
  (agentd.permissions): this process keeps it in memory only and presents it with the cancel and
  every re-attach; it is never printed nor passed on.
  The job checkpoints at its next step boundary; this command waits for that and
  exits 3.
- If this process dies (agent link lost), the job goes on; `agentd run` on the same config while that
  job is queued or running attaches to it instead of submitting a second one.
- If the daemon goes away (restart, crash), this command retries the socket with backoff, printing
  each try, and re-attaches to the same job id when the daemon is back.
- `--detach` submits and returns at once with the job id (a build user's detached job then has no
  client holding its capability: only operators can act on it).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

from trainer.errors import ExitCode

# The job's final outcome (its `finished` event) as the build's exit code.
OUTCOME_EXIT = {"succeeded": ExitCode.SUCCEEDED, "failed": ExitCode.FAILED, "cancelled": ExitCode.CANCELLED,
                "infra": ExitCode.INFRA_FAILURE}
CANCEL_GRACE_S = 10.0  # while the daemon is down, how long an aborted build keeps trying to deliver the cancel


def say(text: str) -> None:
    print(text, flush=True)


def main(name: str, argv: list[str]) -> int:
    from agentd.cli import add_socket_arg, socket_path

    p = argparse.ArgumentParser(prog="agentd run", description="Submit a training config and stream it.")
    p.add_argument("config")
    p.add_argument("--detach", action="store_true", help="submit and return the job id")
    p.add_argument("--reconnect-timeout", type=float, default=600.0,
                   help="how long to keep retrying when the daemon goes away (seconds)")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="how long to wait for a daemon that is starting (restart, boot) before exit 4 (seconds)")
    p.add_argument("--plain", action="store_true",
                   help="one line per event even on a terminal (the live progress display is off)")
    p.add_argument("--priority", type=int, default=None,
                   help="queue priority (integer, higher first); overrides the config's priority:")
    from trainer.api import add_rendezvous_args, jenkins_vars, preflight, rendezvous_from_args
    from trainer.errors import ConfigError

    add_rendezvous_args(p)
    add_socket_arg(p)
    args = p.parse_args(argv)
    sock = socket_path(args)
    rendezvous = rendezvous_from_args(p, args)  # a missing or wrong flag: exit 2

    path = Path(args.config).resolve()
    try:
        checked = preflight(path)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    for w in checked.warnings:
        say(f"WARNING: {w}")
    env = jenkins_vars(os.environ)
    msg = {"op": "submit", "config_path": str(path), "config_text": path.read_text(encoding="utf-8"),
           "env": env, "detach": args.detach}
    if args.priority is not None:
        msg["priority"] = args.priority
    if rendezvous is not None:
        msg.update(rendezvous.request())
    return Follower(sock, args.reconnect_timeout, args.connect_timeout, plain=args.plain).submit(msg)


class Follower:
    """Streams one job's events, forwards a cancel on SIGTERM/SIGINT, and survives daemon restarts."""

    def __init__(self, sock: Path, reconnect_timeout: float, connect_timeout: float = 60.0, *, plain: bool = False):
        from trainer.console import Console

        self.console = Console(plain=plain)  # the events, and this command's own lines while it follows
        self.sock = sock
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self.job_id: str | None = None
        self.last_seq = 0
        self.evaluation: str | None = None  # the overall decision of the job's evaluation event, if any
        self.cancel_wanted = False
        self.cancel_sent = False
        self.capability: str | None = None  # the submit reply's token for this job, in memory only

    def _on_signal(self, signum, _frame):
        self.cancel_wanted = True  # only a flag: the follow loop sends the cancel

    def submit(self, msg: dict) -> int:
        from agentd.client import DaemonUnreachable, open_request

        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        request = {"op": msg.get("op", "submit"), **{k: v for k, v in msg.items() if k != "op"}}
        deadline = time.monotonic() + self.connect_timeout
        delay, attempt = 1.0, 0
        while True:
            try:
                conn = open_request(self.sock, request)
                break
            except DaemonUnreachable as e:
                attempt += 1
                left = deadline - time.monotonic()
                if not e.starting or left <= 0 or self.cancel_wanted:
                    waited = f" (waited {self.connect_timeout:.0f} s for it to start)" if attempt > 1 else ""
                    print(f"agentd run: {e}{waited}", file=sys.stderr)
                    return ExitCode.CANCELLED if self.cancel_wanted else ExitCode.UNREACHABLE
                wait = min(delay, left)
                say(f"waiting for agentd to start: try {attempt}: {e}; next try in {wait:.0f} s "
                    f"(--connect-timeout {self.connect_timeout:.0f} s)")
                time.sleep(wait)
                delay = min(delay * 2, 10.0)
        reply = conn.reply
        if not reply.get("ok"):
            err = reply.get("error", {})
            print(f"agentd run: {err.get('message')}", file=sys.stderr)
            codes = {"invalid_config": ExitCode.INVALID_CONFIG, "not_permitted": ExitCode.NOT_PERMITTED}
            return codes.get(err.get("code"), ExitCode.FAILED)
        self.job_id = reply["job_id"]
        self.capability = reply.get("capability")
        if reply.get("attached"):
            say(f"attached to {self.job_id}, already queued or running for this output folder")
        else:
            say(f"submitted {self.job_id}")
        if msg.get("detach"):
            conn.close()
            return ExitCode.SUCCEEDED
        return self.follow(conn)

    def follow(self, conn) -> int:
        try:
            return self._follow(conn)
        finally:
            self.console.close()

    def _follow(self, conn) -> int:
        import agentd.events  # noqa: F401  (the daemon's event kinds, so the console knows them)

        while True:
            outcome = None
            try:
                while True:
                    if self.cancel_wanted and not self.cancel_sent:
                        self._send_cancel()
                    try:
                        m = conn.next_message(timeout=0.5)
                    except socket.timeout:
                        continue
                    if m is None:
                        break
                    ev = m.get("event")
                    if ev is None:
                        continue
                    if ev.get("seq", 0) <= self.last_seq:
                        continue  # replayed after a re-attach: already printed
                    self.last_seq = ev.get("seq", self.last_seq)
                    self.console.emit(ev)
                    if ev.get("type") == "evaluation":
                        self.evaluation = ev.get("overall")
                    if ev.get("type") == "finished":
                        outcome = "infra" if ev.get("outcome") == "failed" and ev.get("infra") else ev.get("outcome")
                        break
            except OSError:
                pass
            finally:
                conn.close()
            if outcome == "succeeded" and self.evaluation == "worse":
                return ExitCode.WORSE
            if outcome is not None:
                return OUTCOME_EXIT.get(outcome, ExitCode.FAILED)
            conn = self._reattach()
            if conn is None:
                self.console.say(f"gave up: agentd did not come back within {self.reconnect_timeout:.0f} s; the job "
                    f"{self.job_id} resumes when the daemon starts (`agentd logs {self.job_id} --follow`)")
                return ExitCode.UNREACHABLE

    def _send_cancel(self) -> None:
        from agentd.client import DaemonUnreachable, request

        self.cancel_sent = True
        try:
            reply = request(self.sock, self._job_request("cancel"))
            if not reply.get("ok"):
                self.console.say(f"cancel of {self.job_id} refused: {reply.get('error', {}).get('message')}")
                return
            self.console.say(f"cancel requested for {self.job_id} ({reply.get('state')}): "
                "it saves a checkpoint at the next step boundary")
        except DaemonUnreachable as e:
            self.console.say(f"could not forward the cancel: {e}")

    def _job_request(self, op: str, **fields) -> dict:
        """A request about this job, with its capability when the daemon handed one out."""
        msg = {"op": op, "job_id": self.job_id, **fields}
        if self.capability:
            msg["capability"] = self.capability
        return msg

    def _reattach(self):
        """Retry the socket with backoff (each try printed) and re-attach to the same job."""
        from agentd.client import DaemonUnreachable, open_request

        self.console.say(f"lost the connection to agentd while following {self.job_id}; reconnecting")
        deadline = time.monotonic() + self.reconnect_timeout
        delay, attempt = 1.0, 0
        cancel_deadline = None
        while time.monotonic() < deadline:
            if self.cancel_wanted and not self.cancel_sent:
                # Jenkins kills an aborted build soon after SIGTERM: do not wait the full reconnect window.
                cancel_deadline = cancel_deadline or time.monotonic() + CANCEL_GRACE_S
                if time.monotonic() > cancel_deadline:
                    self.console.say(f"abort: agentd is unreachable, so the cancel was not delivered; {self.job_id} will "
                        f"resume when agentd is back (`agentd cancel {self.job_id}` to stop it)")
                    raise SystemExit(ExitCode.CANCELLED)
            attempt += 1
            try:
                conn = open_request(self.sock, self._job_request("attach", after_seq=self.last_seq))
                if conn.reply.get("ok"):
                    self.console.say(f"re-attached to {self.job_id} ({conn.reply.get('state')})")
                    return conn
                conn.close()
                self.console.say(f"re-attach failed: {conn.reply.get('error', {}).get('message')}")
                return None
            except DaemonUnreachable as e:
                wait = min(delay, max(0.0, deadline - time.monotonic()), 2.0 if self.cancel_wanted else delay)
                self.console.say(f"retry {attempt}: {e}; next try in {wait:.0f} s")
                if self.cancel_wanted and not self.cancel_sent:
                    self.console.say("cancel pending: it will be sent when agentd is back")
                time.sleep(wait)
                delay = min(delay * 2, 15.0)
        return None
