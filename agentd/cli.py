"""The `agentd` command line. Subcommands are a table of handlers, imported only when used,
so `agentd --help` and `agentd status` stay fast and never import torch.

Exit codes: `trainer.errors.ExitCode` (one table for `agentd` and `lora-train`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name: (module under agentd.commands, one-line help)
COMMANDS = {
    "serve": ("serve", "run the daemon (systemd runs this)"),
    "run": ("run", "submit a training config and stream it (what a Jenkins step runs)"),
    "status": ("status", "daemon, Jenkins link, GPUs, running job, queue, recent jobs"),
    "jobs": ("jobs", "list jobs"),
    "cancel": ("jobs", "cancel a job"),
    "pause": ("jobs", "checkpoint a running job at its next step and park it (frees the GPU)"),
    "resume": ("jobs", "queue a paused job again; it continues from its checkpoint"),
    "logs": ("jobs", "print a job's events (--follow to stream)"),
    "drain": ("jobs", "finish the running job, take no new ones (node offline in Jenkins)"),
    "undrain": ("jobs", "take jobs again"),
    "validate": ("validate", "check a training config; VRAM estimate and batch-size advice"),
    "demo": ("demo", "run the tiny demo job through an embedded daemon"),
    "compare": ("compare", "compare two runs (config diff, loss figures, verdict; --html for the page)"),
    "sweep": ("sweep", "hyperparameter sweep: run FILE | status NAME | report NAME [--html] | stop NAME"),
    "eval": ("eval", "evaluate a finished run through the daemon (its eval: block; --against RUN|previous|production|base)"),
    "ab": ("ab", "a blind A/B page of two runs' evaluation images (--html), or the votes' win rate (--votes)"),
    "release": ("release", "promote a run's LoRA to the release targets; list, rollback, verify releases"),
    "backup": ("release", "copy released LoRAs to the backup target; --restore NAME vK DIR brings one back"),
    "gc": ("gc", "remove old journal entries, caches and surplus checkpoints"),
    "import-kohya": ("import_kohya", "convert a kohya/lora-scripts TOML (training or dataset) into a training config"),
    "install-service": ("install", "install the systemd unit and the agentd user"),
}

# The commands that load the trainer's libraries (the others, e.g. status, stay light).
LOAD_THE_TRAINER = ("serve", "run", "validate", "demo", "compare", "import-kohya")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="agentd", description="GPU training agent for Jenkins.")
    parser.add_argument("--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from agentd import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}")
    if name in LOAD_THE_TRAINER:
        # Third-party import noise filtered before any library loads (trainer.quiet, the one place).
        from trainer.api import quiet_third_party

        quiet_third_party()
    module = importlib.import_module(f"agentd.commands.{COMMANDS[name][0]}")
    return int(module.main(name, argv[1:]) or 0)


def add_socket_arg(p: argparse.ArgumentParser) -> None:
    """Every client command takes --socket (default: $AGENTD_SOCKET, else /run/agentd/agentd.sock)."""
    from agentd.paths import default_socket

    p.add_argument("--socket", type=str, default=None,
                   help=f"control socket (default: $AGENTD_SOCKET or {default_socket()})")


def add_name_actions(sub, actions: dict[str, str]) -> dict[str, argparse.ArgumentParser]:
    """A subcommand per action (name: help) that takes one positional NAME (a release's, a sweep's)."""
    parsers = {}
    for action, help_text in actions.items():
        parsers[action] = sub.add_parser(action, help=help_text)
        parsers[action].add_argument("name")
    return parsers


def add_socket_args(sub) -> None:
    """--socket on every subcommand of `sub` (see add_socket_arg)."""
    for p in sub.choices.values():
        add_socket_arg(p)


def socket_path(args):
    from pathlib import Path

    from agentd.paths import default_socket

    return Path(args.socket) if args.socket else default_socket()


if __name__ == "__main__":
    sys.exit(main())
