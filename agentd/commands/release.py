"""agentd release promote RUN [--name N] [--to T,...] [--force --reason TEXT] [--candidate]
agentd release list N | rollback N [--to vK] | verify N
agentd backup [--restore N vK DIR]

The daemon does the work (it holds the targets' credentials); these only ask over the socket.
Exit codes: 0 done, 1 refused or failed (the message says why and what to do), 4 daemon unreachable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from trainer.errors import ExitCode

LONG_S = 6 * 3600  # copying gigabytes to a slow NAS or bucket: the daemon answers when it is done


def main(name: str, argv: list[str]) -> int:
    from agentd.cli import add_name_actions, add_socket_arg, add_socket_args, socket_path
    from agentd.client import DaemonUnreachable

    if name == "backup":
        p = argparse.ArgumentParser(prog="agentd backup", description="Copy released LoRAs to the backup target.")
        p.add_argument("--restore", nargs=3, metavar=("NAME", "vK", "DIR"), help="bring version vK of NAME back "
                       "into DIR (its sha256 is checked)")
        p.add_argument("--json", action="store_true")
        add_socket_arg(p)
        args = p.parse_args(argv)
        msg = {"op": "backup"}
        if args.restore:
            n, v, d = args.restore
            msg.update(restore=True, name=n, version=v, dir=os.path.abspath(d))
    else:
        p = argparse.ArgumentParser(prog="agentd release", description="Releases of trained LoRAs.")
        sub = p.add_subparsers(dest="action", required=True)
        pr = sub.add_parser("promote", help="release a finished run's LoRA (gated on its evaluation)")
        pr.add_argument("run", help="the run's output folder")
        pr.add_argument("--name", help="release name (default: the run's name)")
        pr.add_argument("--to", help="targets, comma-separated (default: release.default_to)")
        pr.add_argument("--force", action="store_true", help="release even if the gate refuses (needs --reason)")
        pr.add_argument("--reason", help="why (recorded in the registry)")
        pr.add_argument("--candidate", action="store_true", help="move the candidate alias, not production")
        named = add_name_actions(sub, {
            "list": "versions, their evaluation, who and why; the aliases",
            "rollback": "production back to the previous version (servers reload it)",
            "verify": "every copy against its manifest; servers list production"})
        named["rollback"].add_argument("--to", help="version vK (default: the previous alias)")
        for sp in sub.choices.values():
            sp.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
        add_socket_args(sub)
        args = p.parse_args(argv)
        msg = {"op": "release", "action": args.action}
        if args.action == "promote":
            msg.update(run=os.path.abspath(args.run), name=args.name, force=args.force, reason=args.reason,
                       to=[t.strip() for t in args.to.split(",") if t.strip()] if args.to else None,
                       alias="candidate" if args.candidate else "production")
        else:
            msg["name"] = args.name
            if args.action == "rollback":
                msg["to"] = args.to
    from agentd.client import request

    try:
        reply = request(socket_path(args), msg, timeout=LONG_S)
    except DaemonUnreachable as e:
        print(f"agentd {name}: {e}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    if args.json:
        print(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        print(f"agentd {name}: {reply['error']['message']}", file=sys.stderr)
        return ExitCode.NOT_PERMITTED if reply["error"].get("code") == "not_permitted" else ExitCode.FAILED
    if not args.json:
        print(render(msg, reply))
    return ExitCode.FAILED if reply.get("problems") else ExitCode.SUCCEEDED


def render(msg: dict, r: dict) -> str:
    if msg["op"] == "backup":
        if msg.get("restore"):
            return f"restored {msg['name']} {msg['version']} to {r['path']} (sha256 checked)"
        lines = [f"backup to {r['target']}: {len(r['copied'])} copied, {len(r['verified'])} already there"]
        return "\n".join(lines + [f"  copied {c}" for c in r["copied"]] + [f"  PROBLEM {p}" for p in r["problems"]])
    action = msg["action"]
    if action == "promote":
        forced = " (forced past the gate)" if r["forced"] else ""
        return (f"released {r['name']} v{r['version']} as {r['artifact']} to {', '.join(r['targets'])}{forced}\n"
                + "".join(f"repaired: {x}\n" for x in r["repaired"])
                + f"aliases: {_aliases(r['aliases'])}")
    if action == "rollback":
        return f"rolled {r['name']} back from v{r['from']} to v{r['to']}; aliases: {_aliases(r['aliases'])}"
    if action == "verify":
        head = f"{r['name']}: {'PROBLEMS' if r['problems'] else 'OK'} ({len(r['checked'])} copies checked)"
        return "\n".join([head] + [f"  {p}" for p in r["problems"]])
    lines = [f"{r['name']}: {_aliases(r['aliases'])}"]
    for v in r["versions"]:
        ev = (v.get("evaluation") or {}).get("overall") or "-"
        extra = f"  forced: {v['reason']}" if v.get("forced") else (f"  {v['error']}" if v.get("error") else "")
        lines.append(f"  v{v['version']:<3} {v['state']:<9} {v.get('artifact', '')}  eval {ev}  by {v.get('by')}  "
                     f"to {','.join(v.get('targets') or [])}{extra}")
    return "\n".join(lines)


def _aliases(a: dict) -> str:
    return ", ".join(f"{k} v{v}" if v is not None else f"{k} -" for k, v in a.items())
