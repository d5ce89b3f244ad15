"""agentd jobs | cancel JOB | pause JOB | resume JOB | logs JOB [--follow] | drain | undrain"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from trainer.errors import ExitCode


def main(name: str, argv: list[str]) -> int:
    from agentd.cli import add_socket_arg, socket_path
    from agentd.client import DaemonUnreachable

    p = argparse.ArgumentParser(prog=f"agentd {name}")
    if name in ("cancel", "pause", "resume", "logs"):
        p.add_argument("job_id")
    if name == "logs":
        p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
    if name == "jobs":
        p.add_argument("--limit", type=int, default=20)
        p.add_argument("--json", action="store_true")
    add_socket_arg(p)
    args = p.parse_args(argv)
    try:
        return HANDLERS[name](socket_path(args), args)
    except DaemonUnreachable as e:
        print(f"agentd {name}: {e}", file=sys.stderr)
        return ExitCode.UNREACHABLE


def refused(name: str, reply: dict) -> int:
    """Print the daemon's refusal; exit 77 when it is a permission refusal, else 1."""
    err = reply.get("error") or {}
    print(f"agentd {name}: {err.get('message')}", file=sys.stderr)
    return ExitCode.NOT_PERMITTED if err.get("code") == "not_permitted" else ExitCode.FAILED


def _jobs(sock, args) -> int:
    from agentd.client import request

    reply = request(sock, {"op": "jobs", "limit": args.limit})
    if args.json:
        print(json.dumps(reply["jobs"], indent=2))
        return 0
    for j in reply["jobs"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created"])) if j.get("created") else ""
        step = f"{j.get('step') or 0}/{j.get('total_steps') or '?'}"
        loss = f"{j['loss']:.4f}" if j.get("loss") is not None else "-"
        prio = f"prio {j['priority']}  " if j.get("priority") else ""
        owner = (j.get("submitter") or {}).get("user") or "?"
        print(f"{j['id']}  {j['state']:<11} {when}  {owner:<12} step {step:<9} loss {loss:<8} {prio}"
              f"{j.get('config')}")
    return 0


def _job_op(op: str):
    """cancel / pause / resume JOB: one request; a refusal prints the daemon's reason and exits 77 (not
    permitted) or 1."""
    def handler(sock, args) -> int:
        from agentd.client import request

        reply = request(sock, {"op": op, "job_id": args.job_id})
        if not reply.get("ok"):
            return refused(op, reply)
        print(f"{args.job_id}: {reply['state']}")
        return 0

    return handler


def _logs(sock, args) -> int:
    from agentd.client import open_request
    from agentd.events import format_event

    conn = open_request(sock, {"op": "logs", "job_id": args.job_id, "follow": args.follow})
    if not conn.reply.get("ok"):
        conn.close()
        return refused("logs", conn.reply)
    try:
        while True:
            try:
                m = conn.next_message(timeout=None)
            except socket.timeout:
                continue
            if m is None:
                return 0
            line = format_event(m.get("event", {}))
            if line:
                stamp = time.strftime("%H:%M:%S", time.localtime(m["event"].get("time", 0)))
                print(f"{stamp} {line}", flush=True)
    finally:
        conn.close()


def _drain(sock, args, on=True) -> int:
    from agentd.client import request

    name = "drain" if on else "undrain"
    reply = request(sock, {"op": name})
    if not reply.get("ok"):
        return refused(name, reply)
    print("draining: the running job finishes, no new jobs start" if on else "taking jobs again")
    return ExitCode.SUCCEEDED


HANDLERS = {"jobs": _jobs, "cancel": _job_op("cancel"), "pause": _job_op("pause"), "resume": _job_op("resume"),
            "logs": _logs, "drain": _drain,
            "undrain": lambda s, a: _drain(s, a, on=False)}
