"""agentd gc [--dry-run] [--config agentd.yaml]"""
from __future__ import annotations

import argparse
import sys

from trainer.errors import ExitCode


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd gc", description="Remove old journal entries, caches, checkpoints.")
    p.add_argument("--config", help="settings file (the daemon's)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    args = p.parse_args(argv)
    from agentd.commands import load_settings_or_exit
    from agentd.gc import collect
    from agentd.journal import Journal

    settings = load_settings_or_exit(args.config)
    releases = None
    if settings.gc_user_outputs and settings.release.backup:
        # checkpoints of released runs go only when their LoRA's backup copy verifies: that needs the targets
        from agentd.release.credentials import CredentialError
        from agentd.release.service import Releases

        try:
            releases = Releases(settings.release, settings.state_dir, settings.cache_dir)
        except CredentialError as e:
            print(f"agentd gc: {e} (run it as the service's user, or under systemd-run with the unit's "
                  "credentials)", file=sys.stderr)
            return ExitCode.BAD_SETTINGS
    journal = Journal(settings.journal_path)
    try:
        actions = collect(settings, journal, dry_run=args.dry_run, releases=releases)
    finally:
        journal.close()
    verb = "would remove" if args.dry_run else "removed"
    for kind, target in actions:
        print(f"{verb} {kind} {target}")
    print(f"{len(actions)} item(s) {verb}")
    return 0
