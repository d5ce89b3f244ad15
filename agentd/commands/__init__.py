"""One module per `agentd` subcommand group; each exposes main(name, argv) -> exit code."""


def load_settings_or_exit(path):
    """The daemon's settings for a CLI command; a bad file prints every problem and exits 78 (EX_CONFIG)."""
    import sys

    from agentd.settings import load_settings
    from trainer.errors import ConfigError, ExitCode

    try:
        return load_settings(path)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        raise SystemExit(ExitCode.BAD_SETTINGS) from None
