"""Preflight of the `eval:` block: everything it names must be usable before any model loads (exit 2 with
the field and the fix, nothing written). Only config files and headers are read here, never weights."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from trainer.config import COMPARE_KINDS
from trainer.errors import Problem
from trainer.eval import image_metrics, suite


def problems(cfg, training_images: list[Path], class_tokens: list[str]) -> list[Problem]:
    """Every problem of cfg.eval (none without one). `training_images`: the files the scan found (a reference
    image among them is an error); `class_tokens`: the subsets' class tokens (the default trigger)."""
    ev = cfg.eval
    if ev is None:
        return []
    found: list[Problem] = []
    found += _model_problem("eval.clip_model", ev.clip_model, image_metrics.CLIP_TYPES, "a CLIP model (CLIPModel)")
    found += _model_problem("eval.dino_model", ev.dino_model, image_metrics.DINO_TYPES,
                            "a ViT or DINOv2 model (ViTModel, Dinov2Model)")
    found += _head_problems(ev)
    if ev.reference_dir is not None:
        refs, ref_problems = suite.reference_images(ev.reference_dir)
        found += ref_problems
        if refs and (overlap := suite.overlap_problem(refs, training_images)):
            found.append(overlap)
    prompts, prompt_problems = suite.eval_prompts(cfg, suite.trigger_of(cfg, class_tokens))
    found += prompt_problems
    if cfg.mode == "image" and ev.clip_model and not prompts and not prompt_problems:
        found.append(Problem("eval.prompts", "is empty, but image metrics are asked for",
                             "list prompts (a list or a prompt file, {trigger} for the concept)"))
    if ev.compare_with not in COMPARE_KINDS:
        from trainer.runs.history import is_run_folder

        if not is_run_folder(Path(ev.compare_with)):
            found.append(Problem("eval.compare_with", "names no run (no run.json and logs/loss.csv there)",
                                 f"use one of {', '.join(COMPARE_KINDS)} or an output_dir / runs/<run-id> folder",
                                 ev.compare_with))
    if ev.eval_file is not None:
        found += suite.eval_records(ev.eval_file)[1]
    found += _lm_eval_problems(ev)
    computed = ev.metrics(cfg.mode)
    found += [Problem(f"eval.gate.{m}", f"no model computes this metric for a {cfg.mode} model (computed: "
                      f"{', '.join(computed) or 'none'})", "remove it from gate, or give the model it needs", m)
              for m in ev.gate if m not in computed and cfg.mode]
    return found


def _model_problem(field: str, path: Path | None, types: tuple[str, ...], wanted: str) -> list[Problem]:
    if path is None:
        return []
    if not Path(path).is_dir():
        return [Problem(field, "is not a folder", "point it at a local transformers model folder "
                        "(nothing is downloaded)", str(path))]
    if image_metrics.model_type(path) not in types:
        kind = image_metrics.folder_kind(path)
        found = f"found {kind}" if kind else "no config.json: not a transformers model folder"
        return [Problem(field, f"is not {wanted} ({found})", f"point it at {wanted} folder", str(path))]
    return []


def _head_problems(ev) -> list[Problem]:
    if ev.aesthetic_head is None:
        return []
    field = "eval.aesthetic_head"
    if not Path(ev.aesthetic_head).is_file():
        return [Problem(field, "file does not exist", "point it at the head's .safetensors or .pth file",
                        str(ev.aesthetic_head))]
    if ev.clip_model is None:
        return [Problem(field, "needs clip_model (the head scores CLIP image embeddings)",
                        "set eval.clip_model to the CLIP the head was trained on", str(ev.aesthetic_head))]
    try:
        size = image_metrics.head_input_size(ev.aesthetic_head)
    except Exception as e:  # a damaged or pickled file: say so, never unpickle
        return [Problem(field, f"cannot be read as a state dict ({type(e).__name__})",
                        "give a .safetensors or a plain torch state dict", str(ev.aesthetic_head))]
    try:
        projection = json.loads((Path(ev.clip_model) / "config.json").read_text()).get("projection_dim")
    except (OSError, ValueError):
        projection = None
    if size is None or (projection and size != projection):
        return [Problem(field, f"takes {size} inputs but clip_model's embeddings have {projection}",
                        "use the head trained on this CLIP model's embeddings", str(ev.aesthetic_head))]
    return []


def lm_eval_task_names(folder: Path) -> set[str]:
    """The task names the YAMLs of an lm-evaluation-harness task folder define (its `task:` keys)."""
    names: set[str] = set()
    for f in sorted(Path(folder).rglob("*.yaml")):
        try:
            data = yaml.load(f.read_text(encoding="utf-8"), Loader=_IgnoreTags)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("task"), str):
            names.add(data["task"])
    return names


class _IgnoreTags(yaml.SafeLoader):
    """lm-eval YAMLs use `!function module.fn`: read the task name without running anything."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def _lm_eval_problems(ev) -> list[Problem]:
    if not ev.lm_eval_tasks:
        return []
    if ev.lm_eval_task_dir is None or not Path(ev.lm_eval_task_dir).is_dir():
        return [Problem("eval.lm_eval_task_dir", "is not a folder", "point it at the folder of your lm-eval task "
                        "YAMLs (tasks are never downloaded)", str(ev.lm_eval_task_dir))]
    known = lm_eval_task_names(ev.lm_eval_task_dir)
    return [Problem("eval.lm_eval_tasks", f"task {t!r} is not defined in {ev.lm_eval_task_dir} "
                    f"(found: {', '.join(sorted(known)) or 'none'})", "name a task of that folder's YAMLs", t)
            for t in ev.lm_eval_tasks if t not in known]
