"""Evaluating a finished run on demand (`lora-train eval RUN`, `agentd eval RUN`): the run's own config (its
config.yaml, every path absolute) with its `eval:` block, its LoRA as the candidate, the stage of
`trainer.training.evaluation` against what `against` names. The results replace the run's eval/ files."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from trainer import families
from trainer.checks.preflight import check_config
from trainer.config import load_config
from trainer.errors import ConfigError, Problem
from trainer.families.lora_io import read_lora_file
from trainer.runs.checkpoint import list_checkpoints
from trainer.training.evaluation import against_for, evaluate, production_release, run_lora
from trainer.training.job import pick_device


def evaluate_run(run: Path, reporter, *, against: str | None = None, device: str | None = None,
                 base_cache=None, resolve_release=None) -> dict:
    """Score the run folder `run` and decide (see the module docstring); returns the decision."""
    import torch

    from trainer.events import FanOut

    reporter = FanOut(reporter)
    source = str(run / "config.yaml")
    lora = run_lora(run)
    status = _status(run)
    if lora is None or status != "succeeded":
        raise ConfigError([Problem("run", f"is not a finished run (status {status or 'unknown'}, LoRA "
                                   f"{'found' if lora else 'missing'})", "give an output_dir or a runs/<run-id> "
                                   "folder of a run that succeeded", str(run))], source)
    cfg = load_config(run / "config.yaml")
    if cfg.eval is None:
        raise ConfigError([Problem("eval", "the run's config has no eval: block", "add an eval: block (prompts, "
                                   "seeds, clip_model, ...) to the config and train again", None)], source)
    checked = check_config(cfg, source=source)  # the eval block's models, references and files, as at training
    cfg = checked.config
    if against not in (None, "previous", "production", "base") and run_lora(Path(against)) is None:
        raise ConfigError([Problem("--against", "names no finished run with a LoRA",
                                   "give previous, production, base or a run folder", against)], source)
    release = production_release(cfg, resolve_release, against, source)
    dev = pick_device(device)
    dtype = torch.float32 if dev.type == "cpu" else {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.mixed_precision, torch.float32)
    fam = families.family(cfg.model_family)
    load = lambda: fam.load_base(cfg, dev, dtype)  # noqa: E731
    key = ("eval", cfg.model_family, str(cfg.base_model), str(cfg.base_model_config), str(dtype))
    base = base_cache.get(key, load, dev)[0] if base_cache is not None else load()
    task = fam.make_task(cfg, base, dev)
    try:
        task.load_lora_state(read_lora_file(lora)[0], str(lora))
        dataset, val_indices = None, []
        if cfg.mode == "text":  # perplexity on the held-out records, chat template from the data
            train = checked.scan.samples if checked.train_samples is None else checked.train_samples
            dataset = fam.make_dataset(cfg, list(train) + list(checked.validation_samples))
            task.prepare(dataset, contextlib.nullcontext)
            val_indices = list(range(len(train), len(dataset)))
        subsets = getattr(checked.scan, "subsets", None) or []
        return evaluate(task, cfg, run, against_for(cfg, against, release, before=_run_id(run)), reporter,
                        class_tokens=[s.class_tokens for s in subsets if not s.is_reg], dataset=dataset,
                        val_indices=val_indices, checkpoints=list_checkpoints(run / "checkpoints"))
    finally:
        task.detach()
        if base_cache is not None:
            base_cache.release(key)


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _run_id(run: Path) -> str | None:
    try:
        return json.loads((run / "run.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None
