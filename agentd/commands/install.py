"""agentd install-service [--dry-run]: the systemd unit, the agentd user, and the next steps."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd install-service")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    args = p.parse_args(argv)
    from agentd.install import InstallError, install_service

    try:
        lines = install_service(Path(sys.prefix), dry_run=args.dry_run)
    except PermissionError as e:
        print(f"agentd install-service: {e} (run it as root: sudo {sys.prefix}/bin/agentd install-service)",
              file=sys.stderr)
        return 1
    except InstallError as e:
        print(f"agentd install-service: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
