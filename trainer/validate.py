"""`validate`: check a config without training, and say what it will need."""
from __future__ import annotations

import json
import sys


def validate_command(path: str, *, vram: str | None = None, as_json: bool = False, gpus=None) -> int:
    from trainer.errors import ConfigError
    from trainer.preflight import preflight

    try:
        checked = preflight(path)
    except ConfigError as e:
        if as_json:
            print(json.dumps({"valid": False, **e.to_dict()}, indent=2))
        else:
            print(e.render(), file=sys.stderr)
        return 2
    cfg = checked.config
    report = {"valid": True, "config": path, "mode": cfg.mode, "samples": len(checked.scan.samples),
              "warnings": checked.warnings, "output_dir": str(cfg.output_dir)}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{path}: valid ({cfg.mode} mode, {report['samples']} samples -> {cfg.output_dir})")
        for w in checked.warnings:
            print(f"WARNING: {w}")
    return 0
