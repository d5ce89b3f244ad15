"""agentd validate CONFIG [--vram 24GiB] [--json] [--margin MiB] (also `lora-train validate`)

No daemon needed: the GPUs are probed here (NVML, no torch); the estimate reads model configs only.
"""
from __future__ import annotations

import argparse


def local_gpus(facts) -> list[dict]:
    return [{"index": g.index, "name": g.name, "free_mib": g.memory_free_mib} for g in facts if g.healthy]


def device_problem(config: str, gpus) -> str | None:
    """The config's `device:` against this box's GPUs (checked only on a box that has GPUs: elsewhere the
    target box is not known here; the daemon checks again at submit)."""
    from pathlib import Path

    from agentd.gate import NoSuchDevice, match_device
    from trainer.config import parse_config
    from trainer.errors import ConfigError, Problem

    if not gpus:
        return None
    path = Path(config)
    try:
        cfg = parse_config(path.read_text(encoding="utf-8"), base_dir=path.resolve().parent, source=str(path))
        if cfg.device is not None:
            match_device(cfg.device, gpus)
    except NoSuchDevice as e:
        return ConfigError([Problem("device", str(e), "set device: to one of the GPUs listed, or remove it",
                                    cfg.device)], str(path)).render()
    except (OSError, ConfigError):
        return None  # validate_command reports those with every other problem
    return None


def main(name: str, argv: list[str]) -> int:
    from trainer.checks.validate_report import DEFAULT_MARGIN_MIB, validate_command

    p = argparse.ArgumentParser(prog="agentd validate", description="Check a training config and plan its memory.")
    p.add_argument("config")
    p.add_argument("--vram", help="plan for a card of this size (e.g. 24GiB) instead of this box's GPUs")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--margin", type=int, default=DEFAULT_MARGIN_MIB, help="safety margin in MiB (default 1024)")
    args = p.parse_args(argv)
    facts = []
    if not args.vram:
        import sys

        from agentd.gpu import default_probe

        facts = default_probe().list_gpus()
        problem = device_problem(args.config, facts)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    return validate_command(args.config, vram=args.vram, as_json=args.json,
                            gpus=None if args.vram else local_gpus(facts), margin_mib=args.margin)
