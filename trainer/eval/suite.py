"""What an evaluation runs on: its prompts (kohya's syntax, `{trigger}` expanded), the reference images,
and the text records of `eval_file`. Each reader returns what it read and the problems it found (with
file and line), so preflight reports them all and the stage reads the same things the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.data.images import IMAGE_EXTENSIONS
from trainer.data.prompts import SamplePrompt, parse_prompt
from trainer.errors import Problem


def trigger_of(cfg, class_tokens: list[str]) -> str | None:
    """eval.trigger, else the class tokens of the first training subset that has some."""
    return cfg.eval.trigger or next((t for t in class_tokens if t), None)


def eval_prompts(cfg, trigger: str | None) -> tuple[list[SamplePrompt], list[Problem]]:
    """The eval prompts, parsed with the sampler's parser (its defaults: the config's resolution and sampler)."""
    src = cfg.eval.prompts
    if isinstance(src, list):
        lines = [(f"eval.prompts[{i}]", t) for i, t in enumerate(src)]
    else:
        try:
            text = Path(src).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return [], [Problem("eval.prompts", f"cannot read the prompt file ({type(e).__name__})",
                                "point eval.prompts at a readable text file (one prompt per line) or give a list",
                                str(src))]
        lines = [(f"{src}:{n}", t) for n, t in enumerate(text.splitlines(), 1)
                 if t.strip() and not t.lstrip().startswith("#")]
    prompts, problems = [], []
    for where, line in lines:
        if "{trigger}" in line and not trigger:
            problems.append(Problem("eval.prompts", f"{where}: uses {{trigger}} but there is no trigger",
                                    "set eval.trigger (or class_tokens on the first subset)"))
            continue
        try:
            prompts.append(parse_prompt(line.strip().replace("{trigger}", trigger or ""), len(prompts),
                                        resolution=cfg.resolution or 512, seed=0, sampler=cfg.sample_sampler,
                                        where=where))
        except ValueError as e:
            problems.append(Problem("eval.prompts", str(e), "fix the prompt line: options are --n --w --h --s --l "
                                    "--ss, each followed by a value (seeds come from eval.seeds)"))
    return prompts, problems


def reference_images(folder: Path) -> tuple[list[Path], list[Problem]]:
    """The image files of reference_dir (sorted), or why there are none."""
    try:
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    except OSError as e:
        return [], [Problem("eval.reference_dir", f"cannot be read ({type(e).__name__})",
                            "point it at a readable folder of held-out images of the concept", str(folder))]
    if not files:
        return [], [Problem("eval.reference_dir", f"holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                            "put held-out images of the concept in it", str(folder))]
    return files, []


def overlap_problem(references: list[Path], training: list[Path]) -> Problem | None:
    """Reference images that are training images (same bytes): they reward copying, not learning."""
    from trainer.data.files import file_sha256

    train_hashes = {file_sha256(p): p for p in training}
    same = [(r, train_hashes[h]) for r in references if (h := file_sha256(r)) in train_hashes]
    if not same:
        return None
    named = "; ".join(f"{r.name} = {t}" for r, t in same[:5]) + (f" (and {len(same) - 5} more)" if len(same) > 5 else "")
    return Problem("eval.reference_dir", f"{len(same)} reference image(s) are training images: {named}",
                   "use held-out images of the concept that are not in the training data")


def eval_records(path: Path) -> tuple[list[dict], list[Problem]]:
    """eval_file: one JSON object per line with a "prompt" and an "answer" (strings); file:line per bad record."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [Problem("eval.eval_file", f"cannot be read ({type(e).__name__})",
                            "point it at a UTF-8 JSONL file", str(path))]
    records, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            problems.append(Problem("eval.eval_file", f"{path}:{n}: not JSON ({e.msg})",
                                    'write one object per line: {"prompt": "...", "answer": "..."}'))
            continue
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "answer")):
            problems.append(Problem("eval.eval_file", f"{path}:{n}: a record needs string fields prompt and answer",
                                    'write {"prompt": "...", "answer": "..."}'))
            continue
        records.append({"prompt": rec["prompt"], "answer": rec["answer"]})
    if not records and not problems:
        problems.append(Problem("eval.eval_file", "holds no records", 'add {"prompt": ..., "answer": ...} lines',
                                str(path)))
    return records, problems
