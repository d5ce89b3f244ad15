"""agentd sweep run FILE | status NAME | report NAME [--html] | stop NAME: hyperparameter sweeps.

`run` checks the sweep file here first (exit 2 with every problem: file, line, field, fix; nothing
started), then asks the daemon to run it and prints every trial's lines prefixed by the trial's
number, `[003] step 4/8 ...`, until the sweep ends on this box. Exit 0 when it finished with at least
one complete trial, 1 when none completed, 3 when stopped (`agentd sweep stop`), 4 when the daemon is
unreachable. Several boxes running the same file with a postgresql:// storage share the study: each
takes trials until the study has `trials` of them.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from trainer.errors import ExitCode


def say(text: str) -> None:
    print(text, flush=True)


def main(name: str, argv: list[str]) -> int:
    from agentd.cli import add_name_actions, add_socket_args, socket_path

    p = argparse.ArgumentParser(prog="agentd sweep", description="Hyperparameter sweeps (Optuna) as agentd jobs.")
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="check a sweep file, run it, stream its trials")
    r.add_argument("file")
    r.add_argument("--detach", action="store_true", help="start it and return")
    named = add_name_actions(sub, {
        "status": "trials, their states and the best one",
        "report": "write summary.csv (and report.html with --html) in the sweep folder",
        "stop": "ask no more trials; running trials stop at their next step"})
    named["status"].add_argument("--json", action="store_true")
    named["report"].add_argument("--html", action="store_true")
    add_socket_args(sub)
    args = p.parse_args(argv)
    sock = socket_path(args)
    if args.action == "run":
        return run(sock, Path(args.file), args.detach)
    from agentd.client import DaemonUnreachable, request

    msg = {"status": {"op": "sweep_status"}, "report": {"op": "sweep_report", "html": getattr(args, "html", False)},
           "stop": {"op": "sweep_stop"}}[args.action]
    try:
        reply = request(sock, {**msg, "name": args.name}, timeout=120)
    except DaemonUnreachable as e:
        print(f"agentd sweep: {e}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    if not reply.get("ok"):
        print(f"agentd sweep: {reply.get('error', {}).get('message')}", file=sys.stderr)
        return ExitCode.FAILED
    if args.action == "status":
        from agentd.sweep.report import table

        s = reply["sweep"]
        if args.json:
            say(json.dumps(s, indent=2))
        else:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(s["counts"].items()))
            say(f"sweep {s['name']} ({s['state']}): {counts} of {s['trials_wanted']} trials; folder {s['folder']}")
            names = sorted({k for t in s["trials"] for k in t["params"]})
            say(table(s, names))
    elif args.action == "report":
        say(reply["table"])
        say(f"summary: {reply['csv']}")
        if reply.get("html"):
            say(f"report: {reply['html']}")
    else:
        say(f"sweep {args.name}: {reply['state']}")
    return ExitCode.SUCCEEDED


def run(sock: Path, path: Path, detach: bool) -> int:
    from agentd.client import DaemonUnreachable, open_request
    from agentd.events import format_event
    from agentd.sweep.spec import load_sweep
    from trainer.api import jenkins_vars
    from trainer.errors import ConfigError

    path = path.resolve()
    try:
        sweep = load_sweep(path)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    msg = {"op": "sweep_run", "sweep_path": str(path), "sweep_text": path.read_text(encoding="utf-8"),
           "base_text": sweep.base_text, "env": jenkins_vars(os.environ), "detach": detach}
    try:
        conn = open_request(sock, msg, timeout=300)  # a PostgreSQL study is opened before the reply
    except DaemonUnreachable as e:
        print(f"agentd sweep: {e}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    reply = conn.reply
    if not reply.get("ok"):
        err = reply.get("error", {})
        print(err.get("message"), file=sys.stderr)
        conn.close()
        return ExitCode.INVALID_CONFIG if err.get("code") == "invalid_config" else ExitCode.FAILED
    for w in reply.get("warnings") or []:
        say(f"WARNING: {w}")
    verb = "already running here: following it" if reply.get("attached") else "started"
    say(f"sweep {sweep.spec.name} {verb}: {sweep.spec.trials} trials, folder {reply['folder']}")
    if detach:
        conn.close()
        return ExitCode.SUCCEEDED
    end = None
    try:
        while end is None:
            try:
                m = conn.next_message(timeout=5.0)
            except socket.timeout:
                continue
            if m is None:
                break
            ev = m.get("event") or {}
            line = format_event(ev)
            if line:
                say(f"[{m['trial']:03d}] {line}" if "trial" in m else line)
            if ev.get("type") == "sweep_finished":
                end = ev
    except OSError:
        pass
    finally:
        conn.close()
    if end is None:
        say(f"lost the connection to agentd; the sweep goes on there (`agentd sweep status {sweep.spec.name}`)")
        return ExitCode.UNREACHABLE
    if end["outcome"].startswith("stopped"):
        return ExitCode.CANCELLED
    return ExitCode.SUCCEEDED if end["counts"].get("complete") else ExitCode.FAILED
