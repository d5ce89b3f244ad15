"""`lora-train`: the trainer in the foreground, no daemon. It goes through the same door as the daemon
(`trainer.api`).

    lora-train --config X.yaml        train (the seed's `python train.py --config X.yaml`); on a terminal a
                                      live progress display (`--plain`: one line per event, as in CI)
    lora-train X.yaml                 same
    lora-train validate X.yaml        check the config, paths and dataset; print the VRAM estimate
    lora-train make-demo [FOLDER]     write the tiny demo model, dataset and config
    lora-train eval RUN [--against previous|production|base|RUN]   evaluate a finished run (its eval: block)
    lora-train X.yaml --nodes N --node-rank K --rdzv-endpoint HOST:PORT   this box's part of one job over N
                                      boxes, as `agentd run` takes it (README, "One job over several boxes")

Exit codes (`trainer.errors.ExitCode`): succeeded, failed, invalid config, cancelled (SIGINT/SIGTERM: the
job writes a checkpoint at the next step boundary; run the same command again to resume), worse (6: trained,
but the `eval:` stage decided "worse"), 5 (a job over several boxes whose other boxes did not all join).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from trainer import api
from trainer.errors import ConfigError, ExitCode, OutOfMemory, Problem, RendezvousFailed
from trainer.console import Console


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    api.quiet_third_party()  # before any library loads (trainer.quiet)
    if argv[:1] == ["validate"]:
        return api.validate_main(argv[1:])
    if argv[:1] == ["make-demo"]:
        return _make_demo(argv[1:])
    if argv[:1] == ["eval"]:
        return _eval(argv[1:])
    p = argparse.ArgumentParser(prog="lora-train", description="Train a LoRA from a YAML config (foreground).")
    p.add_argument("config_pos", nargs="?", metavar="CONFIG")
    p.add_argument("--config", help="training config YAML")
    p.add_argument("--plain", action="store_true",
                   help="one line per event even on a terminal (the live progress display is off)")
    p.add_argument("--device", help="torch device, e.g. cuda:1 or cpu; overrides the config's device: "
                   "(default: the config's device:, else cuda if available, else cpu)")
    api.add_rendezvous_args(p)
    args = p.parse_args(argv)
    path = args.config or args.config_pos
    if not path:
        p.error("give a config: lora-train --config X.yaml (or: lora-train validate X.yaml)")
    return train(path, args.device, plain=args.plain, rendezvous=api.rendezvous_from_args(p, args))


def train(path: str, device: str | None = None, *, plain: bool = False, rendezvous: api.Rendezvous | None = None
          ) -> int:
    """`rendezvous`: this box's part of one job over several boxes (`--nodes`), as `agentd run` takes it."""
    try:
        checked = api.preflight(path)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    try:
        device, why = _device(device, checked)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    if why:
        print(why, flush=True)

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

    console = Console(plain=plain)
    try:
        result = api.run_job(checked, console, stop, device=device, rendezvous=rendezvous)
    except ConfigError as e:
        console.close()
        print(e.render(), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    except RendezvousFailed as e:  # another box never came: not this job's fault, retry the build
        console.close()
        print(f"FAILED (infrastructure): {e}", file=sys.stderr)
        return ExitCode.INFRA_FAILURE
    except Exception as e:  # the job already wrote run.json; the console gets the reason
        console.close()
        # Out of memory: the error as the device reported it (the advice quotes the daemon's admission estimate).
        reason = e.__cause__ if isinstance(e, OutOfMemory) else e
        print(f"FAILED: {type(reason).__name__}: {reason}", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        console.close()
    if result.outcome == "cancelled":
        return ExitCode.CANCELLED
    return ExitCode.WORSE if result.evaluation == "worse" else ExitCode.SUCCEEDED


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lora-train eval", description="Evaluate a finished run with its config's "
                                "eval: block (the results replace its eval/ files).")
    p.add_argument("run", help="a run folder: an output_dir or runs/<run-id>")
    p.add_argument("--against", help="previous, base, production, or a run folder (default: the block's compare_with)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    console = Console()
    try:
        decision = api.evaluate_run(args.run, console, against=args.against, device=args.device)
    except ConfigError as e:
        console.close()
        print(e.render(), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    except Exception as e:  # on demand, a failed evaluation is the command's failure
        console.close()
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        console.close()
    return ExitCode.WORSE if decision["overall"] == "worse" else ExitCode.SUCCEEDED


def _device(override: str | None, checked) -> tuple[str | None, str | None]:
    """--device, else the config's device: as the daemon reads it (trainer.gpus.foreground_device)."""
    from trainer.gpus import NoSuchDevice, default_probe, foreground_device

    spec = checked.config.device
    if override is None and spec is None:
        return None, None
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # "cuda:N" is NVML's N, as in the daemon
    try:
        return foreground_device(override, spec, default_probe().list_gpus() if override is None else [])
    except NoSuchDevice as e:
        raise ConfigError([Problem("device", str(e), "set device: to one of the GPUs listed, remove it, or "
                                   "give lora-train --device", spec)], checked.source) from None


def _make_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lora-train make-demo")
    p.add_argument("folder", nargs="?", default="demo-output")
    args = p.parse_args(argv)
    from trainer.dev.demo import write_demo_config

    print(write_demo_config(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
