"""The evaluation stage: after training, in the same job (same device, base already loaded), or on demand
(`lora-train eval`, `agentd eval`), score three arms on the same prompts x seeds (image) or records (text)
and decide the A/B (`trainer.eval.stats`):

    candidate    the LoRA just trained (or the run being evaluated)
    comparison   eval.compare_with: the newest earlier run's LoRA (previous; none: the base), the released
                 production LoRA (a local path the caller resolved), or a run folder's LoRA
    base         the same model with every LoRA layer bypassed (peft's disable_adapter), nothing reloaded

The comparison LoRA is loaded into the same LoRA layers (the candidate's weights are put back after), so
one base in memory serves every arm; every image comes from a CPU torch.Generator seeded per (prompt,
seed), so the arms see the same noise. Images alike in size, steps, guidance and sampler render in batches
(`render_batches`: seeds and prompts together), and the families reuse a prompt's text embeddings across
arms where no text encoder carries the LoRA. Writes `eval/metrics.json` (per-sample scores per arm),
`eval/decision.json` and the images (`eval/images/<arm>/pNN-sSEED.png`). `evaluate_or_unknown` turns any
failure into a warning and the decision "unknown": an evaluation never fails a training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import ConfigError, Problem
from trainer.eval import stats, suite, text_metrics
from trainer.events import event
from trainer.runs import history
from trainer.runs.outputs import atomic_write_json

ARMS = ("candidate", "comparison", "base")
# At most this many images per sampler call: a bound on one call's activation memory (classifier-free
# guidance doubles the UNet's batch), beyond which batching saves little more.
RENDER_BATCH = 8


@dataclass(frozen=True)
class Against:
    """What the candidate is compared with."""

    kind: str  # previous | production | run | base
    lora: Path | None = None
    release: str | None = None
    note: str = ""  # why it is not what was asked (no earlier run: the base)

    @property
    def label(self) -> str:
        return {"previous": "the previous run", "production": "production", "run": f"run {self.lora.parent if self.lora else ''}",
                "base": "the base model"}[self.kind]


def run_lora(folder: Path) -> Path | None:
    """A run folder's LoRA file (`<name>.safetensors`, the name from its run.json)."""
    try:
        name = json.loads((Path(folder) / "run.json").read_text())["name"]
    except (OSError, ValueError, KeyError):
        return None
    path = Path(folder) / f"{name}.safetensors"
    return path if path.is_file() else None


def production_release(cfg, resolve_release, want: str | None = None,
                       source: str | None = None) -> tuple[Path, str] | None:
    """The production release to compare with when `want` (default eval.compare_with) is production: its LoRA
    as a local path and its "NAME@vN", from the caller's `resolve_release(name)` (agentd's release registry,
    which alone knows what its versions are called); None when production is not asked for.
    Raises ConfigError (exit 2, before anything is written) when there is none."""
    if cfg.eval is None or (want or cfg.eval.compare_with) != "production":
        return None
    release = resolve_release(cfg.run_name) if resolve_release is not None else None
    if release is None:
        raise ConfigError([Problem("eval.compare_with", f"no production LoRA for {cfg.run_name} yet: compare_with "
                                   "previous, or release one first", "", "production")], source)
    lora, label = release
    return Path(lora), label


def against_for(cfg, want: str | None = None, release: tuple[Path, str] | None = None,
                before: str | None = None) -> Against:
    """The comparison arm for `want` (default eval.compare_with): previous, production (`release`, from
    `production_release`), base or a run folder. previous: the newest run of the history (older than run id
    `before`, when given)."""
    want = want or cfg.eval.compare_with
    if want == "base":
        return Against("base")
    if want == "production":
        return Against("production", *release)
    if want == "previous":
        runs = [r for r in history.history_runs(history.history_dir(cfg)) if before is None or r.name < before]
        previous = runs[-1] if runs else None
        lora = run_lora(previous) if previous is not None else None
        if lora is None:
            return Against("base", note="no earlier run with a LoRA: compared with the base model")
        return Against("previous", lora)
    return Against("run", run_lora(Path(want)))


def evaluate_or_unknown(task, cfg, out_dir: Path, against: Against, reporter, **kw) -> dict:
    """`evaluate`, or, when it fails, a warning and the decision "unknown" (written, so readers see why)."""
    try:
        return evaluate(task, cfg, out_dir, against, reporter, **kw)
    except Exception as e:  # an evaluation never fails a training: say why, decide nothing
        why = f"evaluation failed: {type(e).__name__}: {str(e)[:300]}"
        reporter.emit(event("warning", message=why))
        decision = {"overall": "unknown", "against": _against_dict(against), "metrics": {}, "reason": why}
        (out_dir / "eval").mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "eval" / "decision.json", decision)
        reporter.emit(event("evaluation", overall="unknown", against=against.kind, reason=why, rows=[], seconds=0.0))
        return decision


def due_checkpoints(folders: list[Path], save_steps: int, every: int | None) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints `every_n_checkpoints` asks for: every N-th save (step / save_steps a
    multiple of N), oldest first; the final save at an odd step is the candidate itself and is left out."""
    if not every:
        return []
    steps = [(int(f.name.split("-")[1]), f) for f in folders if f.name.split("-")[-1].isdigit()]
    return sorted((s, f) for s, f in steps if s % save_steps == 0 and (s // save_steps) % every == 0)


def best_checkpoint(means: dict[str, dict[str, float]], metric: str) -> str:
    """The name ("final" or "step-N") whose mean of `metric` is best (lowest for perplexity)."""
    from trainer.config import LOWER_IS_BETTER

    pick = min if metric in LOWER_IS_BETTER else max
    return pick(means, key=lambda name: means[name][metric])


def evaluate(task, cfg, out_dir: Path, against: Against, reporter, *, class_tokens: list[str] = (),
             dataset=None, val_indices: list[int] = (), autocast=contextlib.nullcontext, record=lambda *p: None,
             checkpoints: list[Path] = ()) -> dict:
    """Score the arms, decide, write eval/metrics.json and eval/decision.json; returns the decision."""
    from trainer.runs.checkpoint import isolated_rng

    t0 = time.perf_counter()
    ev = cfg.eval
    folder = Path(out_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    if against.note:
        reporter.emit(event("message", text=f"evaluation: {against.note}"))
    candidate_state = {k: v.detach().clone() for k, v in task.lora_state().items()}
    comparison_state = None
    if against.lora is not None:
        from trainer.families.lora_io import read_lora_file

        comparison_state = read_lora_file(against.lora)[0]
    measure = _ImageArms(cfg, folder, class_tokens) if cfg.mode == "image" else \
        _TextArms(cfg, dataset, list(val_indices), autocast)
    scores: dict[str, dict[str, list[float]]] = {}
    task.eval()
    try:
        with isolated_rng():
            for arm in ARMS:
                if arm == "comparison" and comparison_state is None:
                    continue  # compared with the base: the base arm is the comparison
                with _arm(task, arm, comparison_state, candidate_state):
                    scores[arm] = measure.score(task, arm)
            checkpoint_means = _score_checkpoints(task, measure, due_checkpoints(
                list(checkpoints), cfg.save_steps, ev.every_n_checkpoints), candidate_state)
    finally:
        task.train()
    scores.setdefault("comparison", scores["base"])
    metric_names = list(scores["candidate"])
    metrics = {m: {arm: {"mean": _mean(scores[arm][m]), "scores": scores[arm][m]} for arm in ARMS}
               for m in metric_names}
    seconds = round(time.perf_counter() - t0, 3)
    arms = {"candidate": {"lora": None}, "comparison": {"lora": str(against.lora) if against.lora else None,
                                                        "kind": against.kind}, "base": {"lora": None}}
    metrics_doc = {"metrics": metrics, "arms": arms, "prompts": measure.prompt_texts, "seeds": measure.seeds,
                   "models": {k: str(getattr(ev, k)) for k in ("clip_model", "dino_model", "aesthetic_head")
                              if getattr(ev, k)}, "seconds": seconds}
    if checkpoint_means and metric_names:
        by = next((m for m in ev.gate if m in metric_names), metric_names[0])
        checkpoint_means["final"] = {m: metrics[m]["candidate"]["mean"] for m in metric_names}
        best = best_checkpoint(checkpoint_means, by)
        metrics_doc["checkpoints"] = checkpoint_means
        metrics_doc["best_checkpoint"] = {"name": best, "metric": by}
        reporter.emit(event("message", text=f"evaluation: the best checkpoint by {by} is {best} "
                            f"({checkpoint_means[best][by]:.4g}; final {checkpoint_means['final'][by]:.4g})"))
    decisions = {m: stats.decide_metric(m, scores["candidate"][m], scores["comparison"][m], measure.groups(m),
                                        ev.gate[m].margin if m in ev.gate else 0.0, ev.bootstrap)
                 for m in metric_names}
    verdict = stats.overall(decisions, list(ev.gate))
    decision = {"overall": verdict, "against": _against_dict(against),
                "metrics": {m: d.to_dict() for m, d in decisions.items()},
                "reason": stats.reason(verdict, decisions, against.label, list(ev.gate))}
    atomic_write_json(folder / "metrics.json", metrics_doc)
    atomic_write_json(folder / "decision.json", decision)
    record(folder / "metrics.json", folder / "decision.json", *measure.files)
    rows = [{"metric": m, "candidate": metrics[m]["candidate"]["mean"], "comparison": metrics[m]["comparison"]["mean"],
             "base": metrics[m]["base"]["mean"], "delta": d.delta, "lo": d.ci95[0], "hi": d.ci95[1],
             "decision": d.decision} for m, d in decisions.items()]
    reporter.emit(event("evaluation", overall=verdict, against=against.kind, reason=decision["reason"], rows=rows,
                        seconds=seconds))
    return decision


def _score_checkpoints(task, measure, due: list[tuple[int, Path]], candidate_state) -> dict[str, dict[str, float]]:
    """Each due checkpoint's LoRA in the candidate's place: the mean of every metric (the candidate put back)."""
    from safetensors.torch import load_file

    out = {}
    for step, folder in due:
        task.load_lora_state(load_file(str(folder / "lora.safetensors")), str(folder))
        try:
            scores = measure.score(task, folder.name)
        finally:
            task.load_lora_state(candidate_state, "the candidate LoRA")
        out[folder.name] = {m: _mean(v) for m, v in scores.items()}
    return out


def _against_dict(against: Against) -> dict:
    return {"kind": against.kind, "lora": str(against.lora) if against.lora else None, "release": against.release}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@contextlib.contextmanager
def _arm(task, arm: str, comparison_state, candidate_state):
    """The task's model as `arm` inside the block; the candidate again after it."""
    if arm == "base":
        with task.adapters_disabled():
            yield
    elif arm == "comparison":
        task.load_lora_state(comparison_state, "the comparison LoRA")
        try:
            yield
        finally:
            task.load_lora_state(candidate_state, "the candidate LoRA")
    else:
        yield


def render_batches(prompts: list, size: int = RENDER_BATCH) -> list[list[int]]:
    """Indices of `prompts` rendered together: those alike in size, steps, guidance and sampler (one pipeline
    call's settings), at most `size` at a time, in their order."""
    groups: dict[tuple, list[int]] = {}
    for n, p in enumerate(prompts):
        groups.setdefault(p.call_settings(), []).append(n)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


class _ImageArms:
    """Images per (prompt, seed) through the family's sampler, scored by the CLIP / DINO / aesthetic models."""

    def __init__(self, cfg, folder: Path, class_tokens):
        from trainer.eval.image_metrics import ImageScorer
        from PIL import Image

        ev = cfg.eval
        prompts, problems = suite.eval_prompts(cfg, suite.trigger_of(cfg, list(class_tokens)))
        if problems:
            raise ValueError(problems[0].render())
        self.prompts = prompts
        self.prompt_texts = [p.prompt for p in prompts]
        self.seeds = list(ev.seeds)
        self.folder = folder
        refs = []
        if ev.reference_dir is not None:
            files = suite.reference_images(ev.reference_dir)[0]
            refs = [Image.open(f).convert("RGB") for f in files]
        self.scorer = ImageScorer(ev.clip_model, ev.dino_model, ev.aesthetic_head if ev.clip_model else None, refs)
        self.files: list[Path] = []
        self.encoded: dict = {}  # text embeddings by prompt, across arms where the family may reuse them

    def groups(self, metric: str) -> int:
        return len(self.prompts)

    def score(self, task, arm: str) -> dict[str, list[float]]:
        from PIL import Image

        out = self.folder / "images" / arm
        out.mkdir(parents=True, exist_ok=True)
        items = [(dataclasses.replace(p, seed=s), out / f"p{i:02d}-s{s}") for i, p in enumerate(self.prompts)
                 for s in self.seeds]
        paths: list[Path] = [None] * len(items)  # prompt-major, seed-minor: the order the scores pair on
        for batch in render_batches([p for p, _ in items]):
            rendered = task.render_batch([items[n][0] for n in batch], [items[n][1] for n in batch], self.encoded)
            for n, path in zip(batch, rendered):
                paths[n] = path
        self.files.extend(paths)
        images = [Image.open(path).convert("RGB") for path in paths]
        return self.scorer.score(images, [p.prompt for p, _ in items]) if self.scorer.metrics else {}


class _TextArms:
    """Perplexity on the held-out records, answers to eval_file's prompts, lm-eval tasks."""

    def __init__(self, cfg, dataset, val_indices: list[int], autocast):
        ev = cfg.eval
        self.cfg, self.dataset, self.val_indices, self.autocast = cfg, dataset, val_indices, autocast
        self.records = suite.eval_records(ev.eval_file)[0] if ev.eval_file else []
        self.prompt_texts = [r["prompt"] for r in self.records]
        self.seeds: list[int] = []
        self.files: list[Path] = []
        self._sizes: dict[str, int] = {}

    def groups(self, metric: str) -> int:
        return self._sizes[metric]  # every record is its own pair

    def score(self, task, arm: str) -> dict[str, list[float]]:
        import tempfile

        from trainer.data.prompts import SamplePrompt
        from trainer.training import validation_loss

        out: dict[str, list[float]] = {}
        if self.val_indices:
            out["perplexity"] = [math.exp(validation_loss.evaluate(task, self.dataset, [i], 1, self.autocast))
                                 for i in self.val_indices]
        if self.records:
            answers = []
            with tempfile.TemporaryDirectory() as tmp:
                for n, rec in enumerate(self.records):
                    written = task.render_sample(SamplePrompt(rec["prompt"]), Path(tmp) / f"{n}")
                    answers.append(written.read_text(encoding="utf-8")[len(rec["prompt"]):].strip())
            out["exact_match"] = [text_metrics.exact_match(a, r["answer"]) for a, r in zip(answers, self.records)]
            out["rouge_l"] = [text_metrics.rouge_l(a, r["answer"]) for a, r in zip(answers, self.records)]
        ev = self.cfg.eval
        if ev.lm_eval_tasks:
            per_task = text_metrics.lm_eval_scores(task.base.model, task.base.tokenizer, ev.lm_eval_tasks,
                                                   ev.lm_eval_task_dir)
            out.update({f"lm_eval.{t}": v for t, v in per_task.items()})
        self._sizes = {m: len(v) for m, v in out.items()}
        return out
