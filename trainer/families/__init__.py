"""Model families: the trainer's one extension point. This package holds everything that depends on
which model is trained (detection, loading, tasks, LoRA formats, losses, caches, fp8, each family's memory
formula, the shipped configs); it imports only trainer.data, trainer.runs and the vocabulary (config, errors,
events, yaml_schema, quiet).

`FAMILIES = {name: family}` is the table (one `trainer.families.base.Family` per model family). Preflight,
the job, the VRAM estimate and the CLI ask it (through `resolve`, `family`, `family_of_lora`, `describe`) and
never branch on a mode or probe a task with hasattr.

A family module is light: importing it imports no torch (preflight and `agentd run` use it), and its
heavy half (loading, the task) lives in a sibling `<name>_task` module it imports inside `load_base` /
`make_task`; the light half hands the task what it needs (a config folder, the variant, the targets),
so the task never imports its light module.

Adding a family (the recipe):
1. Write `trainer/families/<name>.py`: a subclass of `Family` (`trainer.families.base`, which documents every
   attribute and method; `DiffusionFamily` in `diffusion.py` for a diffusers model) and its instance `FAMILY`.
   Copy `sd.py` for a diffusion model or `causal_lm.py` for a transformers one. Keep torch imports inside
   functions; put the task and the loader in `trainer/families/<name>_task.py`.
2. Its task implements every method of the `Task` Protocol (`trainer.families.base`; no optional methods: a
   task with nothing to cache or export returns early / an empty list), with `trainer.families.peft_lora`
   for the LoRA and `trainer.families.lora_io` for its file.
3. `detect` must claim only its own models: a folder by `model_index.json`'s `_class_name` (or
   `config.json`'s `architectures`), a single file by its key signature (e.g. `double_blocks.` for Flux).
   Add a row to `FAMILIES` below, before any family whose `detect` would also claim those models.
4. If a single file must load offline, ship its architecture config under `trainer/families/model_configs/`
   (`trainer.families.shipped`; a diffusion family's `shipped_config_name(probe)` picks one).
5. Its memory formula (`vram_summary`, `vram_per_sample_bytes`): `trainer.families.memory`.
6. Tests (tests/test_sdxl.py is the model): a tiny model of the family in `trainer/dev/tiny.py` (added to
   `demo_assets`), a training run from YAML, SIGKILL + rerun bit-identical, the warm cache, its LoRA loaded
   by the library users load it with with every module applied, and the bad inputs (exit 2).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.errors import ConfigError, Problem
from trainer.families import causal_lm, flux, sd, sdxl
from trainer.families.base import Family
from trainer.families.probe import Probe, probe

if TYPE_CHECKING:
    from trainer.config import TrainConfig

FAMILIES: dict[str, Family] = {
    "sd": sd.FAMILY,
    "sdxl": sdxl.FAMILY,
    "flux": flux.FAMILY,
    "causal_lm": causal_lm.FAMILY,
}


def family(name: str) -> Family:
    """The family of a (resolved) config's `model_family`."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; supported: {supported()}") from None


def supported() -> str:
    return ", ".join(f"{n} ({m.TITLE})" for n, m in FAMILIES.items())


def detect(p: Probe) -> str | None:
    """The first family in table order whose `detect` claims the model, or None."""
    return next((name for name, m in FAMILIES.items() if m.detect(p)), None)


def describe(p: Probe) -> str:
    """What a probed path is, for messages, naming only what agentd knows: the families' pipeline classes
    and causal-LM architecture endings (`Probe.describe`)."""
    return p.describe(pipeline_classes={c for m in FAMILIES.values() for c in m.PIPELINE_CLASSES},
                      architecture_suffixes=tuple(s for m in FAMILIES.values() for s in m.ARCHITECTURE_SUFFIXES))


def assumed(cfg: "TrainConfig") -> Family:
    """The family a config means before its model was looked at (the model is missing or unknown): its
    `model_family` when that is one, else the first of `mode` in the table (image: sd, text: causal_lm); a
    config without mode is an image config (the seed's format)."""
    if cfg.model_family in FAMILIES:
        return FAMILIES[cfg.model_family]
    return next(m for m in FAMILIES.values() if m.MODE == (cfg.mode or "image"))


def resolve(cfg: "TrainConfig") -> tuple["TrainConfig", Family | None, Probe, list[Problem]]:
    """Find the config's family from its model files and fill in the family's defaults.

    Returns (completed config, family or None, the probe, problems). Problems: `model_family` is no family
    of the table, the model is of no supported family (listing them), `model_family`/`mode` contradict the
    files (the config then comes back unchanged, without a family), or the config sets keys of another
    family (`key_problems`; the config comes back completed, so the other checks still run).
    """
    p = probe(cfg.base_model)
    problems: list[Problem] = []
    if cfg.model_family is not None and cfg.model_family not in FAMILIES:
        problems.append(Problem("model_family", "is not a supported model family",
                                f"use one of: {supported()} (or remove it: it is detected)", cfg.model_family))
        return cfg, None, p, problems
    found = detect(p) if p.kind in ("folder", "file") else None
    if p.kind in ("missing", "unreadable"):
        return cfg, None, p, problems  # preflight reports the path itself
    if found is None:
        if p.kind == "file" and cfg.model_family in FAMILIES and cfg.base_model_config is not None:
            found = cfg.model_family  # an unknown key layout, vouched for by the user and a config folder
        else:
            problems.append(Problem(
                "base_model", f"is {describe(p)}, which is no supported model family",
                f"train one of: {supported()}; for a single file of a supported family whose keys differ, set "
                "model_family and base_model_config (a diffusers-format folder: model_index.json, component "
                "configs, tokenizer)", str(cfg.base_model)))
            return cfg, None, p, problems
    if cfg.model_family is not None and cfg.model_family != found:
        problems.append(Problem(
            "model_family", f"says {cfg.model_family} ({FAMILIES[cfg.model_family].TITLE}) but base_model is "
            f"{describe(p)}, a {found} model ({FAMILIES[found].TITLE})",
            f"remove model_family (it is detected) or set model_family: {found}", cfg.model_family))
        return cfg, None, p, problems
    fam = FAMILIES[found]
    if cfg.mode is not None and cfg.mode != fam.MODE:
        problems.append(Problem(
            "mode", f"is {cfg.mode} but base_model is a {fam.TITLE} model ({describe(p)}), which trains "
            f"in {fam.MODE} mode", f"remove mode (it follows the model) or set mode: {fam.MODE}", cfg.mode))
        return cfg, None, p, problems
    problems += key_problems(cfg, fam, p) + network_problems(cfg, fam)
    fill = {"model_family": found, "mode": fam.MODE}
    for key, value in fam.defaults(p, cfg).items():
        # Left out, not set to a value; an empty target list means the family's targets too.
        if getattr(cfg, key) in (None, []) or key not in cfg.model_fields_set:
            fill[key] = value
    return cfg.model_copy(update=fill), fam, p, problems


def key_problems(cfg: "TrainConfig", fam: Family, p: Probe | None = None) -> list[Problem]:
    """Family-specific keys (the families' OWN_KEYS) set on a config of another family, and values a family
    does not allow (e.g. `quantization: 4bit` on Flux). A key counts as set when the config file wrote it
    (pydantic's model_fields_set) with a value other than null and its default: a default has no effect,
    which also lets the config.yaml of an output folder (every key written out) run again as it is."""
    problems = []
    what = f"a {fam.TITLE} model" + (f" ({describe(p)})" if p is not None else "")
    for key in sorted(cfg.model_fields_set):
        value = getattr(cfg, key)
        owners = [m for m in FAMILIES.values() if key in m.OWN_KEYS]
        if not owners or value is None or value == type(cfg).model_fields[key].default:
            continue
        titles = list(dict.fromkeys(m.TITLE for m in owners))
        if fam not in owners:
            fix = fam.KEY_FIXES.get(key, f"train a {' or '.join(titles)} model")
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


def network_problems(cfg: "TrainConfig", fam: Family) -> list[Problem]:
    """A `network` the family cannot train (its NETWORK_TYPES, DORA)."""
    net, problems = cfg.network, []
    why = {"flux": "Flux has no UNet convolutions, and its LoRA file (diffusers' lora_A/lora_B keys) carries "
                   "LoRA layers only", "causal_lm": "a causal LM has no convolutions for locon's conv set"}
    if net.type not in fam.NETWORK_TYPES:
        problems.append(Problem("network.type", f"{net.type} cannot be trained on {fam.TITLE} (it trains "
                                f"{', '.join(fam.NETWORK_TYPES)}; {why.get(fam.NAME, '')})".replace("; )", ")"),
                                f"use network type {' or '.join(fam.NETWORK_TYPES)}", net.type))
    if net.dora and not fam.DORA:
        problems.append(Problem("network.dora", f"DoRA cannot be trained on {fam.TITLE}",
                                "remove network.dora", True))
    return problems


def resolved(cfg: "TrainConfig") -> "TrainConfig":
    """`resolve` for code paths after preflight (estimates, loaders): the completed config (family, mode and
    the family's targets filled in); raises the problems as a ConfigError."""
    if cfg.model_family is not None and cfg.mode is not None and cfg.target_modules:
        return cfg
    done, _, _, problems = resolve(cfg)
    if problems:
        raise ConfigError(problems)
    return done


def family_of_lora(keys: set[str], metadata: dict[str, str]) -> str | None:
    """The family a LoRA file was trained for, from its metadata and tensor names (None: unknown)."""
    return next((name for name, m in FAMILIES.items() if m.lora_claims(keys, metadata)), None)
