"""`lora-train`: the trainer in the foreground, no daemon.

    lora-train --config X.yaml        train (the seed's `python train.py --config X.yaml`)
    lora-train X.yaml                 same
    lora-train validate X.yaml        check the config, paths and dataset; print the VRAM estimate
    lora-train make-demo [FOLDER]     write the tiny demo model, dataset and config

Exit codes: 0 succeeded, 1 failed, 2 invalid config, 3 cancelled (SIGINT/SIGTERM: the job writes a
checkpoint at the next step boundary; run the same command again to resume).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["validate"]:
        return _validate(argv[1:])
    if argv[:1] == ["make-demo"]:
        return _make_demo(argv[1:])
    p = argparse.ArgumentParser(prog="lora-train", description="Train a LoRA from a YAML config (foreground).")
    p.add_argument("config_pos", nargs="?", metavar="CONFIG")
    p.add_argument("--config", help="training config YAML")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    path = args.config or args.config_pos
    if not path:
        p.error("give a config: lora-train --config X.yaml (or: lora-train validate X.yaml)")
    return train(path, args.device)


def train(path: str, device: str | None = None) -> int:
    from trainer.errors import ConfigError
    from trainer.checks.preflight import preflight

    try:
        checked = preflight(path)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_INVALID

    stop = threading.Event()

    def request_stop(signum, _frame):
        # Only set a flag: the loop checkpoints at the next step boundary and returns.
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"received {signal.Signals(signum).name}: stopping after this step (again to abort now)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    from trainer.events import ConsoleReporter
    from trainer.training.job import LoraTrainingJob

    try:
        result = LoraTrainingJob(checked, ConsoleReporter(), stop, device=device).run()
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # the job already wrote run.json; the console gets the reason
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_CANCELLED if result.outcome == "cancelled" else EXIT_OK


def _validate(argv: list[str]) -> int:
    from agentd.commands.validate import main as validate_main

    return validate_main("validate", argv)


def _make_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lora-train make-demo")
    p.add_argument("folder", nargs="?", default="demo-output")
    args = p.parse_args(argv)
    from trainer.dev.demo import write_demo_config

    print(write_demo_config(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
