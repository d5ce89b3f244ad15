"""agentd validate CONFIG [--vram 24GiB] [--json] [--margin MiB]: the trainer's validate command
(`trainer.checks.validate_report`, the same as `lora-train validate`)."""
from __future__ import annotations


def main(name: str, argv: list[str]) -> int:
    from trainer.api import validate_main

    return validate_main(argv)
