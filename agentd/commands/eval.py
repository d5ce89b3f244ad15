"""agentd eval RUN [--against RUN|previous|production|base]: evaluate a finished run through the daemon.

The run's own config (RUN/config.yaml, with its `eval:` block) is submitted as a job that evaluates instead
of training: the daemon checks it as it checks a training job (the submitter's access to its files), queues
it, gates it on the GPU's memory, and runs the evaluation stage on the run's LoRA (`trainer.api.evaluate_run`),
streaming the events like `agentd run`. The run's eval/ files are replaced. Exit codes as `agentd run`'s:
0, 1 failed, 2 invalid (not a finished run, no eval: block, no production release), 3 cancelled,
4 unreachable, 6 decided "worse".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.errors import ExitCode


def main(name: str, argv: list[str]) -> int:
    from agentd.cli import add_socket_arg, socket_path
    from agentd.commands.run import Follower

    p = argparse.ArgumentParser(prog="agentd eval", description="Evaluate a finished run through the daemon.")
    p.add_argument("run", help="a run folder: an output_dir or runs/<run-id>")
    p.add_argument("--against", help="previous, production, base, or a run folder (default: the config's compare_with)")
    p.add_argument("--reconnect-timeout", type=float, default=600.0,
                   help="how long to keep retrying when the daemon goes away (seconds)")
    add_socket_arg(p)
    args = p.parse_args(argv)
    run = Path(args.run).resolve()
    config = run / "config.yaml"
    try:
        text = config.read_text(encoding="utf-8")
    except OSError as e:
        print(f"agentd eval: {run} is not a run folder: cannot read its config.yaml ({type(e).__name__})",
              file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    against = args.against
    if against not in (None, "previous", "production", "base"):
        against = str(Path(against).resolve())
    msg = {"op": "eval", "run": str(run), "config_path": str(config), "config_text": text}
    if against is not None:
        msg["against"] = against
    return Follower(socket_path(args), args.reconnect_timeout).submit(msg)
