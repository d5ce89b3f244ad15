"""agentd status [--json] [--watch [SECONDS] | --once]

Collecting (one `status` request to the daemon) is separate from rendering (agentd.status_view).
No torch import: this answers in well under 0.3 s. Exits 1 when no daemon runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(name: str, argv: list[str]) -> int:
    from agentd.cli import add_socket_arg, socket_path
    from agentd.client import DaemonUnreachable, request

    p = argparse.ArgumentParser(prog="agentd status")
    p.add_argument("--json", action="store_true", help="machine-readable (schema in README)")
    p.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS", help="refresh until Ctrl-C")
    p.add_argument("--once", action="store_true", help="print once and exit (the default)")
    add_socket_arg(p)
    args = p.parse_args(argv)
    sock = socket_path(args)

    def collect() -> dict | None:
        try:
            return request(sock, {"op": "status"}, timeout=5.0)["status"]
        except DaemonUnreachable as e:
            print(f"agentd status: {e}", file=sys.stderr)
            return None

    if args.json:
        snap = collect()
        if snap is None:
            return 1
        print(json.dumps(snap, indent=2))
        return 0
    from agentd.status_view import render_plain, render_rich

    tty = sys.stdout.isatty()
    if not args.watch or args.once:
        snap = collect()
        if snap is None:
            return 1
        render_rich(snap) if tty else print(render_plain(snap))
        return 0
    try:
        if tty:
            from rich.live import Live

            from agentd.status_view import rich_renderable

            with Live(refresh_per_second=4, screen=False) as live:
                while True:
                    snap = collect()
                    if snap is None:
                        return 1
                    live.update(rich_renderable(snap))
                    time.sleep(args.watch)
        while True:
            snap = collect()
            if snap is None:
                return 1
            print(render_plain(snap), flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
