"""agentd serve [--config agentd.yaml]"""
from __future__ import annotations

import argparse
import sys


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd serve", description="Run the agentd daemon in the foreground.")
    p.add_argument("--config", help="settings file (see configs/agentd.yaml); default: built-in defaults")
    p.add_argument("--socket", help="override the settings' control socket path")
    args = p.parse_args(argv)
    from agentd.commands import load_settings_or_exit
    from agentd.release.credentials import CredentialError
    from agentd.server import SocketGroupError, SocketInUse

    settings = load_settings_or_exit(args.config)
    if args.socket:
        from pathlib import Path

        settings.socket = Path(args.socket).resolve()
    import os

    # Jobs keep their on-disk latent/text-embedding caches in the daemon's cache folder (trainer.families.latent_cache),
    # where `agentd gc` prunes them.
    os.environ.setdefault("AGENTD_CACHE_DIR", str(settings.cache_dir))
    from agentd.daemon import serve

    try:
        return serve(settings)
    except SocketInUse as e:
        print(f"agentd: {e}", file=sys.stderr)
        return 1
    except (SocketGroupError, CredentialError) as e:
        from trainer.errors import ExitCode

        print(f"agentd: {e}", file=sys.stderr)
        return ExitCode.BAD_SETTINGS  # restarting cannot fix it (the unit does not restart on 78)
    except PermissionError as e:
        print(f"agentd: permission denied on {e.filename}: run it as the service (systemctl start agentd) or set "
              "socket, state_dir and cache_dir in agentd.yaml to folders you can write", file=sys.stderr)
        return 1
