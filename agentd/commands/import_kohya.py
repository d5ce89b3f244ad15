"""agentd import-kohya FILE [--dataset-config FILE] [-o OUT.yaml] [--force]

A kohya sd-scripts / lora-scripts training TOML (or a kohya dataset TOML) as an agentd YAML config
(`trainer.data.kohya_import`). Exit 2 with every problem when the TOML is bad; nothing is written then.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd import-kohya",
                                description="Convert a kohya/lora-scripts TOML into an agentd training config.")
    p.add_argument("file", help="training TOML (kohya sectioned or lora-scripts flat) or a kohya dataset TOML")
    p.add_argument("--dataset-config", help="kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    p.add_argument("-o", "--output", help="YAML to write (default: FILE with a .yaml suffix; - for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    args = p.parse_args(argv)
    from trainer.api import atomic_write_text, import_kohya
    from trainer.errors import ConfigError

    source = Path(args.file)
    try:
        text = import_kohya(source, Path(args.dataset_config) if args.dataset_config else None)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.output) if args.output else source.with_suffix(".yaml")
    if out.exists() and not args.force:
        print(f"{out} exists: pass --force to overwrite it, or -o another file", file=sys.stderr)
        return 2
    atomic_write_text(out, text)
    skipped = sum(1 for line in text.splitlines() if line.startswith("#   "))
    print(f"wrote {out} ({skipped} kohya key(s) not converted: listed at its end); "
          f"check it with: agentd validate {out}")
    return 0
