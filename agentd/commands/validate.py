"""agentd validate CONFIG [--vram 24GiB] [--json] [--margin MiB] (also `lora-train validate`)

No daemon needed: the GPUs are probed here (NVML, no torch); the estimate reads model configs only.
"""
from __future__ import annotations

import argparse


def local_gpus() -> list[dict]:
    from agentd.gpu import default_probe

    return [{"index": g.index, "name": g.name, "free_mib": g.memory_free_mib}
            for g in default_probe().list_gpus() if g.healthy]


def main(name: str, argv: list[str]) -> int:
    from trainer.validate import DEFAULT_MARGIN_MIB, validate_command

    p = argparse.ArgumentParser(prog="agentd validate", description="Check a training config and plan its memory.")
    p.add_argument("config")
    p.add_argument("--vram", help="plan for a card of this size (e.g. 24GiB) instead of this box's GPUs")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--margin", type=int, default=DEFAULT_MARGIN_MIB, help="safety margin in MiB (default 1024)")
    args = p.parse_args(argv)
    return validate_command(args.config, vram=args.vram, as_json=args.json,
                            gpus=None if args.vram else local_gpus(), margin_mib=args.margin)
