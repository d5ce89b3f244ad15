"""agentd gc [--dry-run] [--config agentd.yaml]"""
from __future__ import annotations

import argparse


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd gc", description="Remove old journal entries, caches, checkpoints.")
    p.add_argument("--config", help="settings file (the daemon's)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    args = p.parse_args(argv)
    from agentd.commands import load_settings_or_exit
    from agentd.gc import collect
    from agentd.journal import Journal

    settings = load_settings_or_exit(args.config)
    journal = Journal(settings.journal_path)
    try:
        actions = collect(settings, journal, dry_run=args.dry_run)
    finally:
        journal.close()
    verb = "would remove" if args.dry_run else "removed"
    for kind, target in actions:
        print(f"{verb} {kind} {target}")
    print(f"{len(actions)} item(s) {verb}")
    return 0
