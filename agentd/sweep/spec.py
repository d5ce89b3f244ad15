"""The sweep file (YAML): a base training config and the search over some of its keys.

    name: lr-rank                       # one sweep of a name at a time per daemon
    base_config: train.yaml             # relative to this file
    parameters:
      learning_rate: {range: [1.0e-4, 1.0e-2], log: true}   # ints in both ends: an int range
      lora_rank: {choices: [4, 8, 16]}
      lora_alpha: {grid: [4, 8]}
    sampler: tpe                        # tpe | random | grid (grid: only choices/grid parameters)
    seed: 7
    trials: 12
    objective: val_loss                 # or eval.<metric> (issue 21's eval/metrics.json, candidate mean)
    direction: minimize                 # default: minimize for val_loss and perplexity, else maximize
    pruner: median                      # median | none: reads the validation loss at each validation
    pruner_warmup_steps: 2              # no pruning before this step
    pruner_startup_trials: 2            # nor before this many trials finished
    parallel: 1                         # trials at once on this box (more than its GPUs: they queue)
    storage: journal                    # a journal file under the sweep folder, or postgresql://user@host/db
    folder: sweeps/lr-rank              # default: <this file's folder>/<name>; trials in folder/trials/NNN

`load_sweep` reads and checks it all before anything starts: every problem with file, line, field and
fix (`trainer.errors.ConfigError`, exit 2). Each trial's config is the base config with the trial's
values (`trial_config_text`); the corners of the search space are validated as full training configs
up front (`corners`), so a value the trainer refuses is found before the first trial, not at the tenth.
"""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.config import IMAGE_METRICS, METRIC_NEEDS, TEXT_METRICS, TrainConfig, parse_config
from trainer.errors import ConfigError, Problem
from trainer.yaml_schema import read_yaml_mapping, unknown_key_fix, validate_model

LOWER_IS_BETTER = ("val_loss", "perplexity")
NOT_SEARCHABLE = ("output_dir", "name", "resume", "device", "priority")  # the sweep sets or owns these
MAX_CORNERS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Parameter(_Strict):
    """One searched key: exactly one of choices, range, grid."""

    choices: Optional[list[Any]] = None
    """Values the sampler picks among (categorical)."""
    range: Optional[list[Union[int, float]]] = None
    """[low, high]: an int range when both are whole numbers written without a point, else a float range."""
    log: bool = False
    """Sample the range on a log scale (learning rates); needs low > 0."""
    grid: Optional[list[Any]] = None
    """Values to try each once (sampler: grid), or picked among like choices by tpe/random."""

    def values(self) -> list[Any] | None:
        """The finite values (choices or grid), None for a range."""
        return self.choices if self.choices is not None else self.grid


class SweepFile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """The sweep's name: `agentd sweep status NAME`, `SWEEP:best`; one sweep of a name at a time."""
    base_config: Path
    """The training config every trial starts from (relative to the sweep file)."""
    parameters: dict[str, Parameter] = Field(min_length=1)
    """Training-config keys to search, each with choices, range (log) or grid."""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    """How the next trial's values are chosen (Optuna's TPESampler, RandomSampler, GridSampler)."""
    seed: int = 0
    """The sampler's seed: the same sweep file proposes the same trials."""
    trials: int = Field(gt=0)
    """How many trials the study runs in all (over every box sharing it)."""
    objective: str = "val_loss"
    """val_loss (the last validation loss) or eval.<metric> (the evaluation's candidate mean)."""
    direction: Optional[Literal["minimize", "maximize"]] = None
    """Default: minimize for val_loss and eval.perplexity, maximize for the other metrics."""
    pruner: Literal["median", "none"] = "median"
    """median: stop a trial whose validation loss is worse than the median of earlier trials at that step."""
    pruner_warmup_steps: int = Field(0, ge=0)
    """No trial is pruned before this step."""
    pruner_startup_trials: int = Field(1, ge=0)
    """No trial is pruned before this many trials finished."""
    parallel: int = Field(1, gt=0)
    """Trials this box runs at once (more than its GPUs: the extra ones queue)."""
    storage: str = "journal"
    """journal (a file under the sweep folder, one box) or postgresql://USER@HOST[:PORT]/DB (several boxes;
    the password comes from the daemon's `sweep_db_password_file`, never from this file)."""
    folder: Optional[Path] = None
    """Where the study journal, the report and trials/NNN go (default: <sweep file's folder>/<name>)."""

    @model_validator(mode="after")
    def _defaults(self) -> "SweepFile":
        if self.direction is None:
            self.direction = "minimize" if self.objective.split(".")[-1] in LOWER_IS_BETTER else "maximize"
        return self

    def metric(self) -> str | None:
        """The evaluation metric of an `eval.<metric>` objective (None for val_loss)."""
        return self.objective[len("eval."):] if self.objective.startswith("eval.") else None


class Sweep:
    """A checked sweep file: its spec, the base config's text and the folder it works in."""

    def __init__(self, spec: SweepFile, source: str, base_text: str, base_path: Path, folder: Path):
        self.spec, self.source, self.base_text = spec, source, base_text
        self.base_path, self.folder = base_path, folder

    def trial_folder(self, number: int) -> Path:
        return self.folder / "trials" / f"{number:03d}"

    def trial_overrides(self, number: int, params: dict) -> dict:
        return {**params, "output_dir": str(self.trial_folder(number))}

    def trial_config_text(self, number: int, params: dict) -> str:
        """The base config's YAML with the trial's values and output folder (what the trial job runs)."""
        raw = yaml.safe_load(self.base_text)
        raw.update(self.trial_overrides(number, params))
        return yaml.safe_dump(raw, sort_keys=False)

    def trial_config(self, number: int, params: dict) -> TrainConfig:
        return parse_config(self.base_text, base_dir=self.base_path.parent, source=str(self.base_path),
                            overrides=self.trial_overrides(number, params))

    def is_postgres(self) -> bool:
        return self.spec.storage.startswith(("postgresql://", "postgresql+psycopg2://"))


def load_sweep(path: Path, text: str | None = None, base_text: str | None = None) -> Sweep:
    """Read and check a sweep file and its base config; ConfigError with every problem (nothing started).
    `text`, `base_text`: the files' contents as the sweep started (a resumed sweep keeps its search space
    and base config even if the files changed since)."""
    path = Path(path).resolve()
    source = str(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([Problem("<file>", f"cannot read the sweep file: {e}", "check the path")], source)
    raw, lines = read_yaml_mapping(text, source, empty_fix="write name, base_config, parameters and trials")
    spec = validate_model(SweepFile, raw, lines, source)
    base_path = spec.base_config if spec.base_config.is_absolute() else (path.parent / spec.base_config).resolve()
    folder = spec.folder or Path(spec.name)
    folder = folder if folder.is_absolute() else (path.parent / folder).resolve()
    try:
        base_text = base_path.read_text(encoding="utf-8") if base_text is None else base_text
    except OSError as e:
        raise ConfigError([Problem("base_config", f"cannot read the base config: {e}", "name a training config "
                                   "file (relative to the sweep file)", str(spec.base_config),
                                   lines.get(("base_config",)))], source) from None
    sweep = Sweep(spec, source, base_text, base_path, folder)
    problems = spec_problems(spec, lines)
    if problems:
        raise ConfigError(problems, source)
    base = parse_config(base_text, base_dir=base_path.parent, source=str(base_path))  # its own errors, its own file
    problems = objective_problems(spec, base, lines) + corner_problems(sweep, lines)
    if problems:
        raise ConfigError(problems, source)
    return sweep


def spec_problems(spec: SweepFile, lines: dict) -> list[Problem]:
    """What is wrong in the sweep file itself (the parameters, the sampler, the storage)."""
    problems = []
    keys = list(TrainConfig.model_fields)
    for name, p in spec.parameters.items():
        field = f"parameters.{name}"
        line = lines.get(("parameters", name))
        given = [k for k in ("choices", "range", "grid") if getattr(p, k) is not None]
        if name not in keys:
            problems.append(Problem(field, "not a training config key", unknown_key_fix(name, keys), name, line))
            continue
        if name in NOT_SEARCHABLE:
            problems.append(Problem(field, "the sweep sets this key itself", "remove it from parameters", name, line))
        if len(given) != 1:
            problems.append(Problem(field, f"needs exactly one of choices, range, grid (got {given or 'none'})",
                                    "e.g. {range: [1.0e-4, 1.0e-2], log: true} or {choices: [4, 8]}", None, line))
            continue
        kind = given[0]
        at = lines.get(("parameters", name, kind), line)
        if kind == "range":
            r = p.range
            if len(r) != 2:
                problems.append(Problem(f"{field}.range", "a range is [low, high]", "write two numbers",
                                        r, at))
            elif r[0] >= r[1]:
                problems.append(Problem(f"{field}.range", "low must be below high", "write [low, high] with "
                                        "low < high", r, at))
            elif p.log and r[0] <= 0:
                problems.append(Problem(f"{field}.range", "a log range needs low > 0", "use a positive low, "
                                        "e.g. 1.0e-5, or remove log: true", r, at))
        elif not p.values():
            problems.append(Problem(f"{field}.{kind}", f"a {kind} of zero points", "list at least one value",
                                    p.values(), at))
        if p.log and kind != "range":
            problems.append(Problem(f"{field}.log", "log applies to a range only", "remove log: true", True,
                                    lines.get(("parameters", name, "log"), line)))
        if spec.sampler == "grid" and kind == "range":
            problems.append(Problem(f"{field}.range", "sampler: grid needs finite values",
                                    "use grid: [..] or choices: [..], or sampler: tpe", p.range, at))
    if spec.sampler == "grid" and not problems and all(p.values() for p in spec.parameters.values()):
        points = math.prod(len(p.values()) for p in spec.parameters.values())
        if spec.trials > points:
            problems.append(Problem("trials", f"sampler: grid has {points} points, fewer than the trials asked",
                                    f"set trials: {points}, or add grid values", spec.trials, lines.get(("trials",))))
    if not (spec.storage == "journal" or spec.storage.startswith(("postgresql://", "postgresql+psycopg2://"))):
        problems.append(Problem("storage", "unknown storage", "write journal, or postgresql://USER@HOST/DB",
                                redact_url(spec.storage), lines.get(("storage",))))
    elif _url_password(spec.storage):
        problems.append(Problem("storage", "the URL holds a password", "remove it: the daemon reads the password "
                                "from its sweep_db_password_file (agentd.yaml)", redact_url(spec.storage),
                                lines.get(("storage",))))
    return problems


def objective_problems(spec: SweepFile, base: TrainConfig, lines: dict) -> list[Problem]:
    """Whether the base config produces the objective: a validation set for val_loss; for eval.<metric>, a
    metric of the model's mode that the base config's `eval:` block computes (EvalConfig.metrics)."""
    line = lines.get(("objective",))
    if spec.objective == "val_loss":
        if base.validation_split is None and base.validation_data_dir is None and base.validation_file is None:
            return [Problem("objective", "val_loss needs a validation set in the base config",
                            "set validation_split, validation_data_dir or validation_file in "
                            f"{spec.base_config}", spec.objective, line)]
        return []
    metric = spec.metric()
    mode = base.mode or ("text" if base.validation_file is not None else "image")
    known = TEXT_METRICS if mode == "text" else IMAGE_METRICS
    if metric is None or not (metric in known or (mode == "text" and re.fullmatch(r"lm_eval\.\w+", metric))):
        return [Problem("objective", f"the evaluation stage produces no {spec.objective!r} for a {mode} model",
                        "use val_loss or eval.<metric> with one of: " + ", ".join(known)
                        + (", lm_eval.<task>" if mode == "text" else ""), spec.objective, line)]
    if base.eval is None:
        return [Problem("objective", f"the base config has no eval: block, so nothing computes {metric}",
                        f"add an eval: block that computes it to {spec.base_config} ({METRIC_NEEDS}), or use val_loss",
                        spec.objective, line)]
    computed = base.eval.metrics(mode)
    if metric not in computed:
        return [Problem("objective", f"the base config's eval: block does not compute {metric} (it computes: "
                        f"{', '.join(computed) or 'nothing'})", f"give its eval: block in {spec.base_config} what "
                        f"{metric} needs ({METRIC_NEEDS}), or choose one it computes", spec.objective, line)]
    return []


def parallel_warning(parallel: int, slots: int) -> str | None:
    """`parallel` above the box's slots is allowed (the extra trials queue), but said."""
    if parallel <= slots:
        return None
    return (f"parallel: {parallel} is more than this box's {slots} slot(s): {parallel - slots} of the trials "
            "at a time wait in the queue")


def corners(spec: SweepFile) -> list[dict]:
    """Every combination of each parameter's extremes (a range's ends, a numeric list's min and max,
    every value of a non-numeric list), at most MAX_CORNERS of them."""
    axes = []
    for name, p in spec.parameters.items():
        values = p.values()
        if values is None:
            low, high = p.range
            ends = [int(low), int(high)] if _int_range(p) else [low, high]
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ends = sorted({min(values), max(values)})
        else:
            ends = list(values)
        axes.append([(name, v) for v in ends])
    return [dict(c) for c in itertools.islice(itertools.product(*axes), MAX_CORNERS)]


def corner_problems(sweep: Sweep, lines: dict) -> list[Problem]:
    """Each corner as a full training config: the first one the trainer refuses, named with its values."""
    for corner in corners(sweep.spec):
        try:
            sweep.trial_config(0, corner)
        except ConfigError as e:
            bad = e.problems[0]
            name = bad.field if bad.field in corner else next(iter(corner))
            return [Problem(f"parameters.{name}", f"the trial config with {corner} is invalid: {bad.message}",
                            bad.fix or "narrow the search space", None,
                            lines.get(("parameters", name)))]
    return []


def _int_range(p: Parameter) -> bool:
    return p.range is not None and all(isinstance(v, int) for v in p.range)


def suggest(trial, name: str, p: Parameter):
    """The trial's value for `name` (Optuna's define-by-run suggest_* on an asked trial)."""
    values = p.values()
    if values is not None:
        return trial.suggest_categorical(name, values)
    low, high = p.range
    if _int_range(p):
        return trial.suggest_int(name, int(low), int(high), log=p.log)
    return trial.suggest_float(name, float(low), float(high), log=p.log)


def _url_password(url: str) -> str | None:
    m = re.match(r"^[a-z0-9+]+://[^:/@]*:([^@]*)@", url)
    return m.group(1) if m else None


def redact_url(url: str) -> str:
    """The URL without its password (for every message)."""
    return re.sub(r"^([a-z0-9+]+://[^:/@]*):[^@]*@", r"\1:***@", url)
