"""`validate`: check a config without training, and say what it will need.

    agentd validate CONFIG [--vram 24GiB] [--json] [--margin MiB]   (also `lora-train validate`)

Prints every problem (exit 2), or: a summary, the warnings, the VRAM estimate with its parts, each
GPU's free memory with the largest batch that fits there (`recommended_batch_size`, with the
gradient_accumulation_steps that keeps the effective batch), or — without a GPU, or with
`--vram 24GiB` — the same advice for the card sizes asked about.

No daemon needed: the GPUs are probed here (NVML, no torch); the estimate reads model configs only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from trainer.config import parse_config
from trainer.errors import ConfigError, ExitCode, Problem
from trainer.gpus import VRAM_MARGIN_MIB, NoSuchDevice, default_probe, match_device


def main(argv: list[str]) -> int:
    """The command: the config's `device:` against this box's GPUs, then the report (`validate_command`)."""
    p = argparse.ArgumentParser(prog="agentd validate", description="Check a training config and plan its memory.")
    p.add_argument("config")
    p.add_argument("--vram", help="plan for a card of this size (e.g. 24GiB) instead of this box's GPUs")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--margin", type=int, default=VRAM_MARGIN_MIB,
                   help=f"safety margin in MiB (default {VRAM_MARGIN_MIB})")
    args = p.parse_args(argv)
    facts = []
    if not args.vram:
        facts = default_probe().list_gpus()
        problem = device_problem(args.config, facts)
        if problem:
            print(problem, file=sys.stderr)
            return ExitCode.INVALID_CONFIG
    return validate_command(args.config, vram=args.vram, as_json=args.json,
                            gpus=None if args.vram else local_gpus(facts), margin_mib=args.margin)


def local_gpus(facts) -> list[dict]:
    return [{"index": g.index, "name": g.name, "free_mib": g.memory_free_mib} for g in facts if g.healthy]


def device_problem(config: str, gpus) -> str | None:
    """The config's `device:` against this box's GPUs (checked only on a box that has GPUs: elsewhere the
    target box is not known here; the daemon checks again at submit)."""
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


def parse_vram(text: str) -> int:
    """'24GiB', '24G', '24', '16384MiB' -> MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not m:
        raise ValueError(f"--vram {text!r}: write a size like 24GiB or 16384MiB")
    value, unit = float(m.group(1)), (m.group(2) or "gib")
    return int(value * 1024) if unit.startswith("g") else int(value)


def plan(checked, *, gpus: list[dict] | None, vram_mib: int | None, margin_mib: int = VRAM_MARGIN_MIB) -> dict:
    """The validate report as data: estimate, and per GPU (or card size) the batch advice."""
    from trainer.checks.devices import batch_sharers
    from trainer.checks.vram import VramEstimateError, common_card_sizes_gib, estimate_for_config, recommend_batch_size

    cfg = checked.config
    report = {"valid": True, "config": checked.source, "mode": cfg.mode, "model_family": cfg.model_family,
              "samples": len(checked.scan.samples),
              "output_dir": str(cfg.output_dir), "warnings": list(checked.warnings), "margin_mib": margin_mib,
              "notes": list(checked.scan.notes), "from_model": dict(checked.derived)}
    try:
        est = estimate_for_config(cfg)
    except (VramEstimateError, OSError, ValueError) as e:
        report["estimate"] = None
        report["warnings"].append(f"no VRAM estimate: {e}")
        return report
    report["estimate"] = est.to_dict()
    accum = cfg.gradient_accumulation_steps
    sharers = batch_sharers(cfg.devices, cfg.batch_size_per_device)  # one device trains est.batch_size of them

    def advice(free_mib: int) -> dict:
        fit = recommend_batch_size(est, free_mib, margin_mib, est.batch_size, accum)
        return {"fits_as_configured": est.total_mib + margin_mib <= free_mib,
                "recommended_batch_size": fit[0] * sharers if fit else None,  # the config's value
                "gradient_accumulation_steps": fit[1] if fit else None}

    if vram_mib is not None:
        report["targets"] = [{"name": f"planned card ({vram_mib} MiB)", "free_mib": vram_mib, **advice(vram_mib)}]
    elif gpus:
        report["targets"] = [{"name": f"GPU {g['index']} {g.get('name') or ''}".strip(),
                              "free_mib": g.get("free_mib"), **(advice(g["free_mib"]) if g.get("free_mib") is not None
                                                               else {"recommended_batch_size": None})}
                             for g in gpus]
    else:
        report["targets"] = [{"name": f"{gib} GiB card", "free_mib": gib * 1024, **advice(gib * 1024)}
                             for gib in common_card_sizes_gib]
    return report


def validate_command(path: str, *, vram: str | None = None, as_json: bool = False, gpus=None,
                     margin_mib: int = VRAM_MARGIN_MIB) -> int:
    from trainer.checks.preflight import preflight

    try:
        vram_mib = parse_vram(vram) if vram else None
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    try:
        checked = preflight(path)
    except ConfigError as e:
        if as_json:
            print(json.dumps({"valid": False, **e.to_dict()}, indent=2))
        else:
            print(e.render(), file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    report = plan(checked, gpus=gpus, vram_mib=vram_mib, margin_mib=margin_mib)
    from trainer.data.lint import lint, render

    report["dataset"] = dataset = lint(checked)  # image datasets: the kohya-user mistakes (trainer.data.lint)
    if dataset and dataset["errors"]:
        report["valid"] = False
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            print(f"{len(dataset['errors'])} dataset problem(s) in {path}:", file=sys.stderr)
            for err in dataset["errors"]:
                print(f"  ERROR: {err}", file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = checked.config
    print(f"{path}: valid ({cfg.model_family}, {cfg.mode} mode, {report['samples']} samples, batch {cfg.batch_size} x "
          f"{cfg.gradient_accumulation_steps} -> {cfg.output_dir})")
    for w in report["warnings"] + (dataset["warnings"] if dataset else []):
        print(f"WARNING: {w}")
    for line in render(dataset) if dataset else []:
        print(line)
    if checked.derived:  # the defaults that follow the model (e.g. max_seq_length within its positions)
        print("from the model: " + ", ".join(f"{k} {_shown(v)}" for k, v in checked.derived.items()))
    for note in report["notes"]:  # what the data scan decided (text mode: format, lengths, the first example)
        print(note)
    est = report.get("estimate")
    if est:
        parts = " + ".join(f"{k} {v}" for k, v in est["breakdown"].items())
        each = " per device" if cfg.devices is not None else ""  # data parallel: one rank's share of the batch
        print(f"VRAM estimate: {est['total_mib']} MiB at batch {est['batch_size']}{each} ({parts} MiB; "
              f"{est['per_sample_mib']:.0f} MiB per sample); margin {margin_mib} MiB")
        for note in est["notes"]:  # what the estimate assumes (8-bit base, freed encoders, checkpointing...)
            print(f"  assumes: {note}")
        for t in report["targets"]:
            free = "N/A" if t.get("free_mib") is None else f"{t['free_mib']} MiB"
            if t.get("recommended_batch_size") is None:
                verdict = "does not fit even at batch 1" if t.get("free_mib") is not None else "free memory N/A"
            elif t["fits_as_configured"]:
                verdict = "fits as configured"
            else:
                verdict = "too small as configured"
            knob = "batch_size_per_device" if cfg.batch_size_per_device is not None else "batch_size"
            rec = (f"recommended {knob} {t['recommended_batch_size']} with gradient_accumulation_steps "
                   f"{t['gradient_accumulation_steps']}" if t.get("recommended_batch_size") else "")
            print(f"  {t['name']:<28} free {free:<10} {verdict}{'; ' + rec if rec else ''}")
    return 0


def _shown(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
