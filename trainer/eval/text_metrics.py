"""Text metrics: exact match and ROUGE-L of generated answers, and lm-evaluation-harness tasks.

- `exact_match`: 1.0 when the answer equals the expected one after normalising both the way SQuAD's
  evaluation script does (lower case, punctuation and the articles a/an/the removed, whitespace collapsed).
- `rouge_l`: ROUGE-L F1 from Google's `rouge-score` package (with its stemmer), 0..1.
- `lm_eval.<task>`: the task's first metric per document, from `lm_eval.simple_evaluate` over the live
  model (the adapter switched as the arm needs, so no second copy is loaded) with the tasks of a local
  folder (`TaskManager(include_path=...)`); offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set.
- `perplexity` (per held-out record: exp of its mean token loss) is computed by the stage from the
  validation loss it already has.
"""
from __future__ import annotations

import os
import re
import string
from pathlib import Path

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, expected: str) -> float:
    return float(normalise(answer) == normalise(expected))


def rouge_l(answer: str, expected: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(expected, answer)["rougeL"].fmeasure)


def lm_eval_scores(model, tokenizer, tasks: list[str], task_dir: Path, batch_size: int = 1) -> dict[str, list[float]]:
    """Per-document scores of each task (its first numeric metric, in document order), on `model` as it is."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(task_dir)),
                                      log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
    out = {}
    for task in tasks:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        metric = results["configs"][task]["metric_list"][0]["metric"]
        out[task] = [float(s[metric]) for s in samples]
    return out
