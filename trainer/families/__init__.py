"""Model families: the trainer's one extension point.

`FAMILIES = {name: module}` is the table. job.py, preflight.py, config.py, vram.py and the CLI ask it
(through `resolve`, `family`, `family_of_lora`) and never branch on a mode or probe a task with hasattr.

A family module is light: importing it imports no torch (preflight and `agentd run` use it), and its
heavy half (loading, the task) lives in a sibling module it imports inside `load_base`/`make_task`.
Each family module provides (see `Family` below for the exact signatures):

    NAME, TITLE, MODE          table key; human name for messages; the data it trains on ("image"|"text")
    LORA_VERSIONS              the `ss_base_model_version` values its LoRA files carry
    HAS_TEXT_ENCODER           whether `train_text_encoder` means anything for it
    detect(probe) -> bool      is this model (a `trainer.families.probe.Probe`) of this family?
    defaults(probe, cfg)       config values it fills in when the config leaves them out
                               (resolution, target_modules, text_encoder_target_modules)
    check(cfg, probe)          preflight problems, from config files only (no weights, no torch)
    scan_dataset(cfg)          find and check the samples (a `trainer.data.images.Scan`)
    make_dataset(cfg, samples) what `Task.loss` reads samples from
    load_base(cfg, device, dtype)  the frozen base, offline (the daemon may keep it warm)
    make_task(cfg, base, device)   a `Task` (below) on that base, for one job
    lora_claims(keys, metadata)    is this LoRA file (tensor names, safetensors metadata) for this family?
    vram_summary(model_dir, targets, te_targets)   parameter counts and activation terms (meta device)
    vram_per_sample_bytes(summary, shape)          activation bytes of one sample (shape: resolution,
                               max_seq_length, gradient_checkpointing, train_text_encoder, act_bytes)
    VRAM_SHAPE_FIELDS          which of those settings (besides the model) shape its memory
    OWN_KEYS                   the family-specific config keys it reads: {key: allowed values, or None for
                               any}. A key some family owns and this one does not is refused when the user
                               set it (`key_problems`); keys no family lists are common to all
    KEY_FIXES                  optional {key: fix}: what to use instead of another family's key
    ACT_FACTOR                 activation bytes under mixed precision, as a fraction of fp32
    config_dir(cfg)            the folder holding the model's config files (for estimates)
    preload()                  import what load_base needs (the daemon warms up with it)

Adding a family (the recipe):
1. Write `trainer/families/<name>.py` with the attributes above (copy `sd.py` for a diffusion model or
   `causal_lm.py` for a transformers one). Keep torch imports inside functions; put the task and the
   loader in `trainer/families/<name>_task.py` and import it inside `load_base`/`make_task`.
2. Its task implements every method of the `Task` Protocol below (no optional methods: a task with
   nothing to cache or export returns early / an empty list).
3. `detect` must claim only its own models: a folder by `model_index.json`'s `_class_name` (or
   `config.json`'s `architectures`), a single file by its key signature (e.g. `double_blocks.` for Flux).
   Add a row to `FAMILIES` below, before any family whose `detect` would also claim those models.
4. If a single file must load offline, ship its architecture config under `trainer/families/model_configs/`
   (`trainer.families.shipped`; the diffusion families' `shipped_config_name(probe)` picks one).
5. Tests (tests/test_sdxl.py is the model): a tiny model of the family in `trainer/dev/tiny.py` (added to
   `demo_assets`), a training run from YAML, SIGKILL + rerun bit-identical, the warm cache, its LoRA loaded
   by the library users load it with with every module applied, and the bad inputs (exit 2).
"""
from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

from trainer.errors import Problem
from trainer.families import causal_lm, flux, sd, sdxl
from trainer.families.probe import Probe, probe

if TYPE_CHECKING:
    import torch

    from trainer.config import TrainConfig
    from trainer.training.sampling import SamplePrompt

FAMILIES: dict[str, ModuleType] = {
    "sd": sd,
    "sdxl": sdxl,
    "flux": flux,
    "causal_lm": causal_lm,
}


class Task(Protocol):
    """What the training loop (`trainer.training.job`) needs from one job's LoRA on a frozen base.

    Randomness: every random draw of a step comes from the `generator` passed to `loss` (its state is
    checkpointed), which is what makes a resumed run bit-identical on the CPU.
    """

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (trainable LoRA weights, fp32), each with its own "lr"."""

    def train(self) -> None:
        """Put the trainable parts in training mode."""

    def prepare(self, dataset: Any, autocast: Callable[[], ContextManager]) -> None:
        """Called once before the first step, after the LoRA state is in place: build caches the config
        asks for (latents with `cache_latents`; frozen text-encoder outputs with `cache_text_embeddings`),
        computing under `autocast` as the loss would. Nothing to do: return."""

    def loss(self, indices: list[int], dataset: Any, generator: "torch.Generator",
             autocast: Callable[[], ContextManager]) -> "torch.Tensor":
        """The scalar loss of one micro-batch (the samples at `indices`)."""

    def lora_state(self) -> dict[str, "torch.Tensor"]:
        """The LoRA as the family's main file format (checkpoints and <name>.safetensors)."""

    def load_lora_state(self, tensors: dict[str, "torch.Tensor"], source: str) -> None:
        """Load what `lora_state` wrote (resume, init_lora_weights); every layer must match."""

    def lora_metadata(self) -> dict[str, str]:
        """Family-specific safetensors metadata (ss_base_model_version, ...)."""

    def eval(self) -> None:
        """Put the trainable parts in evaluation mode (validation and samples; `train` undoes it)."""

    def render_sample(self, prompt: "SamplePrompt", path: Path) -> Path:
        """One sample of the LoRA as trained so far for `prompt` (`trainer.training.sampling.SamplePrompt`: the
        text, negative, size, steps, guidance, seed, sampler), written to `path` plus the family's suffix
        (.png, .txt); returns the file. May raise: the caller turns a failure into a warning."""

    def export_extra(self, output_dir: Path) -> list[Path]:
        """Other formats written at the end (a PEFT folder, ...); [] when none."""

    def detach(self) -> None:
        """Remove this job's LoRA and caches, leaving the base as loaded (the warm cache reuses it)."""


class Family(Protocol):
    """The module interface of a family (a module, checked structurally; see the module docstring)."""

    NAME: str
    TITLE: str
    MODE: str
    LORA_VERSIONS: tuple[str, ...]
    HAS_TEXT_ENCODER: bool
    ACT_FACTOR: float
    VRAM_SHAPE_FIELDS: tuple[str, ...]
    DEFAULT_TARGETS: list[str]
    DEFAULT_TE_TARGETS: list[str]
    OWN_KEYS: dict[str, tuple | None]

    def detect(self, probe: Probe) -> bool: ...
    def defaults(self, probe: Probe, cfg: "TrainConfig") -> dict: ...
    def check(self, cfg: "TrainConfig", probe: Probe) -> list[Problem]: ...
    def scan_dataset(self, cfg: "TrainConfig"): ...
    def make_dataset(self, cfg: "TrainConfig", samples: list): ...
    def load_base(self, cfg: "TrainConfig", device, dtype): ...
    def make_task(self, cfg: "TrainConfig", base, device) -> Task: ...
    def lora_claims(self, keys: set[str], metadata: dict[str, str]) -> bool: ...
    def vram_summary(self, model_dir: Path, targets: tuple[str, ...], te_targets: tuple[str, ...]): ...
    def vram_per_sample_bytes(self, summary, shape: dict) -> float: ...
    def preload(self) -> None: ...


def family(name: str) -> ModuleType:
    """The family module for a (resolved) config's `model_family`."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; supported: {supported()}") from None


def supported() -> str:
    return ", ".join(f"{n} ({m.TITLE})" for n, m in FAMILIES.items())


def detect(p: Probe) -> str | None:
    """The first family in table order whose `detect` claims the model, or None."""
    return next((name for name, m in FAMILIES.items() if m.detect(p)), None)


def resolve(cfg: "TrainConfig") -> tuple["TrainConfig", ModuleType | None, Probe, list[Problem]]:
    """Find the config's family from its model files and fill in the family's defaults.

    Returns (completed config, family module or None, the probe, problems). Problems: the model is
    of no supported family (listing them), `model_family`/`mode` contradict the files (the config then comes
    back unchanged, without a family), or the config sets keys of another family (`key_problems`; the
    config comes back completed, so the other checks still run).
    """
    p = probe(cfg.base_model)
    problems: list[Problem] = []
    found = detect(p) if p.kind in ("folder", "file") else None
    if p.kind in ("missing", "unreadable"):
        return cfg, None, p, problems  # preflight reports the path itself
    if found is None:
        if p.kind == "file" and cfg.model_family in FAMILIES and cfg.base_model_config is not None:
            found = cfg.model_family  # an unknown key layout, vouched for by the user and a config folder
        else:
            problems.append(Problem(
                "base_model", f"is {p.describe()}, which is no supported model family",
                f"train one of: {supported()}; for a single file of a supported family whose keys differ, set "
                "model_family and base_model_config (a diffusers-format folder: model_index.json, component "
                "configs, tokenizer)", str(cfg.base_model)))
            return cfg, None, p, problems
    if cfg.model_family is not None and cfg.model_family != found:
        problems.append(Problem(
            "model_family", f"says {cfg.model_family} ({FAMILIES[cfg.model_family].TITLE}) but base_model is "
            f"{p.describe()}, a {found} model ({FAMILIES[found].TITLE})",
            f"remove model_family (it is detected) or set model_family: {found}", cfg.model_family))
        return cfg, None, p, problems
    fam = FAMILIES[found]
    if cfg.mode is not None and cfg.mode != fam.MODE:
        problems.append(Problem(
            "mode", f"is {cfg.mode} but base_model is a {fam.TITLE} model ({p.describe()}), which trains "
            f"in {fam.MODE} mode", f"remove mode (it follows the model) or set mode: {fam.MODE}", cfg.mode))
        return cfg, None, p, problems
    problems += key_problems(cfg, fam, p)
    fill = {"model_family": found, "mode": fam.MODE}
    for key, value in fam.defaults(p, cfg).items():
        if getattr(cfg, key) is None or key not in cfg.model_fields_set:  # left out, not set to a value
            fill[key] = value
    return cfg.model_copy(update=fill), fam, p, problems


def key_problems(cfg: "TrainConfig", fam: ModuleType, p: Probe | None = None) -> list[Problem]:
    """Family-specific keys (the families' OWN_KEYS) set on a config of another family, and values a family
    does not allow (e.g. `quantization: 4bit` on Flux). A key counts as set when the config file wrote it
    (pydantic's model_fields_set) with a value other than null and its default: a default has no effect,
    which also lets the config.yaml of an output folder (every key written out) run again as it is."""
    from trainer.config import TrainConfig

    problems = []
    what = f"a {fam.TITLE} model" + (f" ({p.describe()})" if p is not None else "")
    for key in sorted(cfg.model_fields_set):
        value = getattr(cfg, key)
        owners = [m for m in FAMILIES.values() if key in m.OWN_KEYS]
        if not owners or value is None or value == TrainConfig.model_fields[key].default:
            continue
        titles = list(dict.fromkeys(m.TITLE for m in owners))
        if fam not in owners:
            fix = getattr(fam, "KEY_FIXES", {}).get(key, f"train a {' or '.join(titles)} model")
            problems.append(Problem(key, f"applies only to {' and '.join(titles)}; base_model is {what}",
                                    f"remove it, or {fix}", value))
            continue
        allowed = fam.OWN_KEYS[key]
        if allowed is not None and value not in allowed:
            elsewhere = [m.TITLE for m in owners if m is not fam and value in (m.OWN_KEYS[key] or ())]
            problems.append(Problem(
                key, f"{value} is not an option for {fam.TITLE}" + (f" (it is for {' and '.join(elsewhere)})"
                                                                    if elsewhere else ""),
                f"use one of: {', '.join(allowed)} (or remove it: the default)", value))
    return problems


def resolved(cfg: "TrainConfig") -> "TrainConfig":
    """`resolve` for code paths after preflight (estimates, loaders): the completed config; raises the
    problems as a ConfigError."""
    from trainer.errors import ConfigError

    if cfg.model_family is not None and cfg.mode is not None:
        return cfg
    done, _, _, problems = resolve(cfg)
    if problems:
        raise ConfigError(problems)
    return done


def family_of_lora(keys: set[str], metadata: dict[str, str]) -> str | None:
    """The family a LoRA file was trained for, from its metadata and tensor names (None: unknown)."""
    return next((name for name, m in FAMILIES.items() if m.lora_claims(keys, metadata)), None)


_preload_lock = threading.Lock()


def preload_all() -> None:
    """Import the whole training stack: every family's loading stack and the report's matplotlib.

    The daemon does this once in the background, so the first job starts warm, and each job thread calls
    it before training. The lock makes the job wait for a preload in progress: two threads importing the
    same packages for the first time can meet in a cross-thread import cycle, where Python hands one of
    them a half-initialised module (seen: sympy's optional matplotlib probe under diffusers vs. the
    report's `import matplotlib`, "module 'matplotlib' has no attribute 'get_data_path'")."""
    with _preload_lock:
        import trainer.training.job  # noqa: F401  (torch)
        from trainer.runs.report import use_headless_matplotlib

        use_headless_matplotlib()
        for m in FAMILIES.values():
            m.preload()


def default_family(mode: str | None) -> str:
    """The family a config means before its model was looked at: the first of `mode` in the table
    (image: sd, text: causal_lm); a config without mode is an image config (the seed's format)."""
    return next(name for name, m in FAMILIES.items() if m.MODE == (mode or "image"))
