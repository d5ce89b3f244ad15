"""Everything checked before a model loads: the config, the paths it names, and the dataset.

`preflight(path)` is what `lora-train validate`, `agentd validate`, `agentd run` and the daemon call.
It raises one `ConfigError` holding every problem, so nothing is written when the input is bad.
"""
from __future__ import annotations

import importlib.util
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from trainer import families
from trainer.config import OPTIMIZER_LIBRARIES, TrainConfig, load_config, readable_part
from trainer.data import holdout, prompts
from trainer.data.images import Scan, fingerprint
from trainer.errors import ConfigError, Problem, content_free
from trainer.families.lora_io import network_of
from trainer.eval import checks as eval_checks
from trainer.families.probe import Probe, safetensors_header
from trainer.runs import history


@dataclass
class Checked:
    config: TrainConfig
    scan: Scan
    warnings: list[str] = field(default_factory=list)
    source: str | None = None
    train_samples: list | None = None  # None: all of scan.samples (no validation split)
    validation_samples: list = field(default_factory=list)
    derived: dict = field(default_factory=dict)  # values the model decided (the config left them out)

    @cached_property
    def data_fingerprint(self) -> str:
        """Computed once (a stat of every sample), then reused by resume checks, checkpoints and run.json."""
        return fingerprint(self.scan.samples)


def preflight(config_path: str | Path, overrides: dict | None = None) -> Checked:
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        raise _with_path_problems(e, config_path, overrides) from None
    return check_config(cfg, source=str(config_path))


def _with_path_problems(schema: ConfigError, config_path, overrides) -> ConfigError:
    """Schema problems, and the path and data problems of the rest of the config (`readable_part`), in one
    error sorted by line: a user fixes the file in one edit."""
    rest = readable_part(config_path, schema, overrides)
    if rest is None:
        return schema
    try:
        check_config(rest, source=str(config_path))
        return schema
    except ConfigError as e:
        top = lambda p: re.split(r"[.\[]", p.field)[0]  # noqa: E731
        bad = {top(p) for p in schema.problems}
        more = [p for p in e.problems if top(p) not in bad]
    problems = sorted(schema.problems + more, key=lambda p: (p.line is None, p.line or 0))
    return ConfigError(problems, schema.source)


def check_config(cfg: TrainConfig, source: str | None = None) -> Checked:
    """Every problem of `cfg` at once (ConfigError), or the checked config completed with its model
    family and the family's defaults (`trainer.families.resolve`)."""
    written = set(cfg.model_fields_set)
    cfg, fam, model_probe, problems = families.resolve(cfg)
    derived = {k: getattr(cfg, k) for k in sorted(cfg.model_fields_set - written)}
    problems = _base_model_problems(cfg, model_probe) + problems
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        problems.append(Problem("output_dir", "exists and is a file", "point output_dir at a folder", str(out)))
    elif _nearest_existing(out) is not None and not _nearest_existing(out).is_dir():
        problems.append(Problem("output_dir", f"a parent path is a file: {_nearest_existing(out)}",
                                "choose a folder path", str(out)))
    if cfg.init_lora_weights is not None and not cfg.init_lora_weights.is_file():
        problems.append(Problem("init_lora_weights", "file does not exist",
                                "point it at a .safetensors LoRA, or remove the key", str(cfg.init_lora_weights)))
    if cfg.resume not in ("auto", "never", "strict") and not Path(cfg.resume).is_dir():
        problems.append(Problem("resume", "checkpoint folder does not exist",
                                "use auto, never, strict, or an existing checkpoints/step-N folder", cfg.resume))
    problems += optimizer_problems(cfg)  # a missing optimizer library (the device is checked when the job starts)
    if fam is not None:
        problems += fam.check(cfg, model_probe, families.describe)
        problems += _init_lora_problems(cfg, fam)
    # Without a family (the model is missing or unknown) the data is still checked, as `mode` says.
    data_family = fam or families.assumed(cfg)
    scan = data_family.scan_dataset(cfg)
    problems += scan.problems
    # The held-out validation set, sample prompts and compare_with (trainer.data.holdout/prompts, trainer.runs).
    scan_dir = lambda d: data_family.scan_dataset(holdout.as_train_dir(cfg, d))  # noqa: E731
    train_samples, held_out, val_problems = holdout.validation_set(cfg, scan.samples, scan_dir)
    problems += val_problems + prompts.problems(cfg) + history.problems(cfg)
    images = [s.path for s in scan.samples if isinstance(getattr(s, "path", None), Path)]
    problems += eval_checks.problems(cfg, images, [s.class_tokens for s in getattr(scan, "subsets", None) or [] if not s.is_reg])
    if problems:
        raise ConfigError(cfg.located(problems), source)
    warnings = list(scan.warnings)
    if cfg.recommended_batch_size is not None and cfg.batch_size > cfg.recommended_batch_size:
        warnings.append(f"batch_size {cfg.batch_size} is larger than recommended_batch_size "
                        f"{cfg.recommended_batch_size}: it may not fit in GPU memory")
    return Checked(cfg, scan, warnings, source, train_samples, held_out, derived)


def _nearest_existing(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return None


def _base_model_problems(cfg: TrainConfig, p: Probe) -> list[Problem]:
    """The path itself (exists, a folder or a readable checkpoint; `p`: its probe); what it is,
    `families.resolve` says."""
    if p.kind == "missing":
        return [Problem("base_model", "does not exist", "point base_model at a model folder (diffusers: "
                        "model_index.json; transformers: config.json) or a .safetensors/.ckpt file",
                        str(cfg.base_model))]
    if p.kind == "unreadable":
        return [Problem("base_model", p.error or "is not a model checkpoint",
                        "use a diffusers or transformers folder, or a .safetensors/.ckpt checkpoint",
                        str(cfg.base_model))]
    return []


def _init_lora_problems(cfg: TrainConfig, fam) -> list[Problem]:
    """A starting LoRA must be for this family (read from its header: no weights, no torch)."""
    path = cfg.init_lora_weights
    if path is None or not path.is_file() or path.suffix.lower() != ".safetensors":
        return []
    try:
        shapes, metadata = safetensors_header(path)
    except (OSError, ValueError, struct.error) as e:
        return [Problem("init_lora_weights", f"is not a readable safetensors LoRA ({content_free(e)})",
                        "point it at a .safetensors LoRA", str(path))]
    problems = _init_network_problems(cfg, set(shapes), metadata)
    other = families.family_of_lora(set(shapes), metadata)
    if other is not None and other != fam.NAME:
        what = metadata.get("ss_base_model_version") or "its key names"
        return [Problem("init_lora_weights", f"is a LoRA for {other} ({families.family(other).TITLE}; "
                        f"{what}), but base_model is a {fam.NAME} model ({fam.TITLE})",
                        f"start from a LoRA trained on a {fam.TITLE} model, or remove init_lora_weights",
                        str(path))]
    return problems


def _init_network_problems(cfg: TrainConfig, keys: set[str], metadata: dict[str, str]) -> list[Problem]:
    """A starting network must be of the config's network type (and DoRA or not): its tensors are that type's."""
    kind, dora = network_of(keys)
    net = cfg.network
    if (kind, dora) == (net.type, net.dora):
        return []
    title = lambda t, d: t + (" + DoRA" if d else "")  # noqa: E731
    return [Problem("init_lora_weights", f"is a {title(kind, dora)} network (its tensor names; "
                    f"{metadata.get('ss_network_module', 'no ss_network_module')}), but network.type is "
                    f"{title(net.type, net.dora)}", f"set network: {{type: {kind}{', dora: true' if dora else ''}}} "
                    "to continue it, or start from a file of this type", str(cfg.init_lora_weights))]


def optimizer_problems(cfg, device_type: str | None = None) -> list[Problem]:
    """What stops the optimizer from being built here: a missing library, or AdamW8bit without CUDA.
    No torch import: preflight (validate) calls it with device_type None, the job with its device."""
    name = cfg.optimizer.name
    module, cls, package = OPTIMIZER_LIBRARIES[name]
    problems = []
    if importlib.util.find_spec(module) is None:
        problems.append(Problem("optimizer.name", f"{name} needs the {package} package, which is not installed",
                                f"pip install {package} (into agentd's venv), or use optimizer name adamw", name))
    if name == "adamw8bit" and device_type is not None and device_type != "cuda":
        problems.append(Problem("optimizer.name", f"adamw8bit (bitsandbytes) runs on CUDA GPUs only, and this job's "
                                f"device is {device_type}", "use optimizer name adamw (or adafactor for less memory) "
                                "on this machine, or run the job on a GPU box", name))
    return problems
