"""`agentd import-kohya FILE`: a kohya sd-scripts / lora-scripts TOML as an agentd training config.

Reads (with the standard library's `tomllib`):
- a training TOML in kohya's sectioned layout (`[model_arguments]`, `[dataset_arguments]`,
  `[training_arguments]`, ...; lora-scripts' `[model]`, `[dataset]`, `[optimizer]`, ...) or lora-scripts'
  flat layout (every key at the top). Its `dataset_config = "file"` is read too;
- a kohya dataset TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`), alone or beside a
  training TOML (`--dataset-config`).

Writes YAML where every line that came from a kohya key says so in a comment (`# kohya: [section] key =
value`), then lists every key it did not convert with the reason: nothing is dropped silently. kohya's
`sample_prompts` file (`--n --w --h --s --l --d`) is read by agentd as it is (`trainer.training.sampling`).

`MAPPED` is the table of converted keys (the test covers each), including sd-scripts' Flux keys where agentd
has the feature (`timestep_sampling = sigmoid` is the logit-normal density); `SAME_AS_AGENTD` lists keys whose
value may already be agentd's behaviour; `UNSUPPORTED` says why the others are not. A lora-scripts preset's
`[metadata]` (name, description, usually Chinese) becomes the header comment; the YAML is UTF-8 as written.
Bad input raises `ConfigError`: a file that is not TOML (its line and column), a value of the wrong type
(the key, the value, what it should be). Nothing is written then.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from trainer.errors import ConfigError, Problem

OPTIMIZER_NAMES = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor"}
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "linear": "linear",
              "cosine": "cosine", "cosine_with_restarts": "cosine_with_restarts", "polynomial": "polynomial"}
FAMILIES = {"sd-lora": "sd", "sdxl-lora": "sdxl", "flux-lora": "flux"}  # lora-scripts' model_train_type


class WrongType(Exception):
    """A kohya value of the wrong type: what it should be."""


class NotConverted(Exception):
    """A kohya value agentd has no equivalent for (the key converts for other values): why."""


def _int(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise WrongType("an integer")
    return v


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WrongType("a number")
    return float(v)


def _bool(v):
    if not isinstance(v, bool):
        raise WrongType("true or false")
    return v


def _str(v):
    if not isinstance(v, str):
        raise WrongType("a string")
    return v


def _resolution(v):
    """kohya: 512, "512", "512,512" or [512, 512]; agentd's resolution is a square's side."""
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",")]
        if not all(p.isdigit() for p in parts) or len(parts) not in (1, 2):
            raise WrongType('a size such as 512 or "512,512"')
        v = [int(p) for p in parts]
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, list) and len(v) in (1, 2) and all(isinstance(x, int) for x in v):
        if len(v) == 2 and v[0] != v[1]:
            raise WrongType(f"a square size: agentd trains within a {int(math.sqrt(v[0] * v[1]))}^2 area "
                            "(set resolution to that and enable_bucket for other shapes)")
        return v[0]
    raise WrongType('a size such as 512 or "512,512"')


def _optimizer(v):
    name = OPTIMIZER_NAMES.get(_str(v).lower())
    if name is None:
        raise WrongType(f"one of {', '.join(['AdamW', 'AdamW8bit', 'Prodigy', 'Adafactor'])} (agentd's optimizers)")
    return name


def _scheduler(v):
    name = SCHEDULERS.get(_str(v).lower())
    if name is None:
        raise WrongType(f"one of {', '.join(SCHEDULERS)}")
    return name


def _optimizer_args(v):
    """kohya's optimizer_args: ["weight_decay=0.1", "betas=0.9,0.99", "d_coef=2"] -> a mapping."""
    if not isinstance(v, list) or not all(isinstance(x, str) and "=" in x for x in v):
        raise WrongType('a list of "name=value" strings')
    out = {}
    for item in v:
        key, _, text = item.partition("=")
        out[key.strip()] = _literal(text.strip())
    return out


def _literal(text: str):
    values = [t.strip() for t in text.split(",")]
    parsed = [yaml.safe_load(t) if t else t for t in values]
    return parsed[0] if len(parsed) == 1 else parsed


def _family(v):
    name = FAMILIES.get(_str(v))
    if name is None:
        raise WrongType(f"one of {', '.join(FAMILIES)}")
    return name


def _not(v):
    return not _bool(v)


def _timestep_sampling(v):
    """sd-scripts' flux branch draws t by `timestep_sampling`; agentd's `timestep_density` is the density of t
    before the model's scheduler shift (trainer.families.flux_task)."""
    value = _str(v)
    if value in ("sigmoid", "flux_shift"):
        # sigmoid(sigmoid_scale x N(0, 1)) is the logit-normal density (mean 0, std sigmoid_scale).
        return "logit_normal"
    if value == "uniform":
        return "uniform"
    if value == "shift":
        raise NotConverted("a fixed discrete_flow_shift is not supported: agentd shifts the logit-normal draw "
                           "as the model's scheduler does (dev: by resolution, as timestep_sampling = flux_shift)")
    raise NotConverted(f"{value!r}: agentd draws t as timestep_density says (uniform, logit_normal, mode)")


def _guidance(v):
    value = _float(v)
    if value <= 0:
        raise NotConverted("0 means a model without a guidance embedding (Chroma, FLUX.1 schnell): agentd reads "
                           "that from the model; leave guidance_scale out")
    return value


# kohya key -> (agentd key, converter). A dotted agentd key is nested (optimizer.name).
MAPPED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "pretrained_model_name_or_path": ("base_model", _str),
    "model_train_type": ("model_family", _family),
    "train_data_dir": ("train_data_dir", _str),
    "resolution": ("resolution", _resolution),
    "prior_loss_weight": ("prior_loss_weight", _float),
    "cache_latents": ("cache_latents", _bool),
    "cache_latents_to_disk": ("cache_latents_to_disk", _bool),
    "cache_text_encoder_outputs": ("cache_text_embeddings", _bool),
    "cache_text_encoder_outputs_to_disk": ("cache_text_embeddings_to_disk", _bool),
    "enable_bucket": ("enable_bucket", _bool),
    "min_bucket_reso": ("min_bucket_reso", _int),
    "max_bucket_reso": ("max_bucket_reso", _int),
    "bucket_reso_steps": ("bucket_reso_steps", _int),
    "bucket_no_upscale": ("bucket_no_upscale", _bool),
    "caption_extension": ("caption_extension", _str),
    "shuffle_caption": ("shuffle_caption", _bool),
    "caption_separator": ("caption_separator", _str),
    "keep_tokens": ("keep_tokens", _int),
    "keep_tokens_separator": ("keep_tokens_separator", _str),
    "caption_dropout_rate": ("caption_dropout_rate", _float),
    "caption_tag_dropout_rate": ("caption_tag_dropout_rate", _float),
    "caption_prefix": ("caption_prefix", _str),
    "caption_suffix": ("caption_suffix", _str),
    "flip_aug": ("random_flip", _bool),
    "random_crop": ("center_crop", _not),
    "masked_loss": ("masked_loss", _bool),
    "alpha_mask": ("alpha_mask", _bool),
    "network_dim": ("lora_rank", _int),
    "network_alpha": ("lora_alpha", _float),
    "network_weights": ("init_lora_weights", _str),
    "network_train_unet_only": ("train_text_encoder", _not),
    "unet_lr": ("learning_rate", _float),
    "learning_rate": ("learning_rate", _float),
    "text_encoder_lr": ("text_encoder_lr", _float),
    "optimizer_type": ("optimizer.name", _optimizer),
    "optimizer_args": ("optimizer.args", _optimizer_args),
    "lr_scheduler": ("lr_scheduler", _scheduler),
    "lr_warmup_steps": ("lr_warmup_steps", _int),
    "lr_restart_cycles": ("lr_restart_cycles", _int),
    "lr_scheduler_num_cycles": ("lr_restart_cycles", _int),
    "lr_scheduler_power": ("lr_scheduler_power", _float),
    "train_batch_size": ("batch_size", _int),
    "batch_size": ("batch_size", _int),
    "max_train_epochs": ("epochs", _int),
    "max_train_steps": ("max_train_steps", _int),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", _int),
    "gradient_checkpointing": ("gradient_checkpointing", _bool),
    "max_grad_norm": ("max_grad_norm", _float),
    "mixed_precision": ("mixed_precision", _str),
    "seed": ("seed", _int),
    "noise_offset": ("noise_offset", _float),
    "multires_noise_iterations": ("multires_noise_iterations", _int),
    "multires_noise_discount": ("multires_noise_discount", _float),
    "min_snr_gamma": ("min_snr_gamma", _float),
    "clip_skip": ("clip_skip", _int),
    "output_dir": ("output_dir", _str),
    "output_name": ("name", _str),
    "save_every_n_steps": ("save_steps", _int),
    "sample_prompts": ("sample_prompts", _str),
    "sample_sampler": ("sample_sampler", _str),
    "sample_every_n_steps": ("sample_every_n_steps", _int),
    "sample_every_n_epochs": ("sample_every_n_epochs", _int),
    "sample_at_first": ("sample_at_start", _bool),
    # sd-scripts' flux branch (flux_train_network.py)
    "timestep_sampling": ("timestep_density", _timestep_sampling),
    "sigmoid_scale": ("logit_std", _float),
    "guidance_scale": ("guidance_scale", _guidance),
    "t5xxl_max_token_length": ("max_sequence_length", _int),
}

# Keys whose value may already be what agentd does (no key needed then): key -> (those values, why they need
# no key, why the other values are not supported).
SAME_AS_AGENTD: dict[str, tuple[tuple, str, str]] = {
    "model_type": (("flux",), "the model family is detected from the model files",
                   "another architecture (Chroma: Flux-based, without the guidance embedding and with its own "
                   "modulation layers); agentd trains FLUX.1 dev and schnell"),
    "model_prediction_type": (("raw",), "agentd's Flux loss is on the transformer's raw output (noise - latents)",
                              "agentd trains on the raw prediction (model_prediction_type = raw) only"),
    "apply_t5_attn_mask": ((False,), "agentd encodes captions as diffusers' FluxPipeline does, without the T5 "
                           "attention mask", "agentd encodes captions as diffusers' FluxPipeline does, without the "
                           "T5 attention mask (as FLUX.1 was trained)"),
}

# Keys of a [[datasets.subsets]] entry -> agentd's `datasets:` entry keys.
SUBSET_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "image_dir": ("image_dir", _str), "num_repeats": ("num_repeats", _int), "class_tokens": ("class_tokens", _str),
    "is_reg": ("is_reg", _bool), "caption_extension": ("caption_extension", _str),
    "conditioning_data_dir": ("mask_dir", _str),
    **{k: (k, conv) for k, conv in (("shuffle_caption", _bool), ("keep_tokens", _int),
                                     ("keep_tokens_separator", _str), ("caption_separator", _str),
                                     ("caption_dropout_rate", _float), ("caption_tag_dropout_rate", _float),
                                     ("caption_prefix", _str), ("caption_suffix", _str))},
}
# Dataset-level keys ([general] / [[datasets]]) that are agentd top-level keys.
DATASET_LEVEL = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                 "bucket_reso_steps", "bucket_no_upscale")

# Keys agentd does not convert, and why (anything else unknown: "not supported by agentd").
UNSUPPORTED = {
    "xformers": "PyTorch SDPA (scaled_dot_product_attention) is used instead",
    "sdpa": "PyTorch SDPA is what agentd always uses",
    "mem_eff_attn": "PyTorch SDPA is used instead",
    "v2": "not needed: the model family (SD 2.x) is detected from the model files",
    "v_parameterization": "not needed: v-prediction is read from the model's scheduler config",
    "lowram": "not needed: agentd loads the base once per job (the daemon keeps it warm)",
    "lowvram": "not needed: see `agentd validate` for the batch size that fits",
    "save_precision": "the LoRA is saved in its training precision (fp32)",
    "save_model_as": "agentd writes safetensors (kohya key names), the format A1111/ComfyUI/diffusers load",
    "save_state": "always on: every checkpoint is a full resumable state (see README: Resume)",
    "save_every_n_epochs": "agentd checkpoints by optimizer steps: set save_steps",
    "save_n_epoch_ratio": "agentd checkpoints by optimizer steps: set save_steps",
    "save_last_n_epochs": "agentd keeps the newest keep_checkpoints checkpoints",
    "save_last_n_steps": "agentd keeps the newest keep_checkpoints checkpoints",
    "logging_dir": "agentd writes its logs under output_dir/logs",
    "log_prefix": "agentd writes its logs under output_dir/logs",
    "log_with": "agentd writes logs/loss.csv and events.jsonl (no tensorboard/wandb)",
    "max_token_length": "captions are cut at the text encoder's limit (75 tokens); `agentd validate` counts them",
    "network_module": "agentd trains networks.lora and lycoris.kohya (lora/locon, loha, lokr) only",
    "network_train_text_encoder_only": "training only the text encoder is not supported",
    "network_dropout": "use lora_dropout",
    "full_fp16": "agentd keeps LoRA weights in fp32 under mixed precision",
    "full_bf16": "agentd keeps LoRA weights in fp32 under mixed precision",
    "persistent_data_loader_workers": "images load in the training process",
    "max_data_loader_n_workers": "images load in the training process",
    "color_aug": "colour augmentation is not supported",
    "face_crop_aug_range": "face-crop augmentation is not supported",
    "vae": "a separate VAE file is not supported: the base model's VAE is used",
    "in_json": "kohya's JSON metadata: write a metadata.csv (file_name,text) and set metadata_path",
    "metadata_file": "kohya's JSON metadata: write a metadata.csv (file_name,text) and set metadata_path",
    "reg_data_dir": "its N_name folders could not be listed (missing): list them under datasets: with is_reg: true",
    "dataset_config": "read with the training config (its subsets are under datasets:)",
    "ddp_timeout": "one GPU per job", "ddp_gradient_as_bucket_view": "one GPU per job",
    "weighted_captions": "caption weighting is not supported",
    "debug_dataset": "use `agentd validate` (the dataset lint)",
    "lr_warmup_ratio": "set lr_warmup_steps",
    "discrete_flow_shift": "agentd shifts t as the model's scheduler does (dev: by resolution, as sd-scripts' "
                           "timestep_sampling = flux_shift)",
}


@dataclass
class Conversion:
    """The converted config: top-level values with the kohya line each came from, subsets, what is left."""

    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    subsets: list[list[tuple[str, Any, str]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("[section] key = value", why)
    problems: list[Problem] = field(default_factory=list)
    preset: dict[str, Any] = field(default_factory=dict)  # lora-scripts' [metadata] (name, description...)


def read_toml(path: Path) -> dict:
    """The parsed TOML; a ConfigError with the line and column when it is not TOML."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("<file>", "file not found", "check the path", str(path))], str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem("<file>", f"cannot read it: {e}", "save it as UTF-8 TOML", str(path))], str(path))
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        import re

        at = re.search(r"at line (\d+)", str(e))
        line = int(at.group(1)) if at else None
        raise ConfigError([Problem("<toml>", f"is not valid TOML: {e}", "fix the TOML syntax at that line and "
                                   "column (strings need quotes, tables [name], arrays [a, b])", None, line)],
                          str(path)) from None


def is_dataset_toml(data: dict) -> bool:
    return "datasets" in data and isinstance(data["datasets"], list) or "general" in data and \
        isinstance(data["general"], dict) and not any(k in data for k in MAPPED)


def flatten(data: dict) -> list[tuple[str, str, Any]]:
    """(section, key, value) of a training TOML: sections merged (kohya's and lora-scripts' layouts) or flat."""
    rows = []
    for key, value in data.items():
        if isinstance(value, dict) and key not in MAPPED:
            rows += [(f"[{key}] ", k, v) for k, v in value.items()]
        else:
            rows.append(("", key, value))
    return rows


def _show(value) -> str:
    return _scalar(value) if not isinstance(value, (list, dict)) else yaml.safe_dump(
        value, default_flow_style=True, width=1000, allow_unicode=True).strip()


def _scalar(value) -> str:
    # allow_unicode: a caption, a path or a preset's Chinese name stays as written, not \u8BAD escapes.
    return yaml.safe_dump([value], default_flow_style=True, width=1000, allow_unicode=True).strip()[1:-1]


def convert(path: Path, dataset_path: Path | None = None) -> Conversion:
    """Read kohya TOML(s) and map them (see the module docstring); problems are collected, not raised."""
    conv = Conversion()
    data = read_toml(path)
    if isinstance(data.get("metadata"), dict):  # a lora-scripts preset (config/presets/*.toml): its header
        conv.preset = data.pop("metadata")
    if is_dataset_toml(data):
        _convert_dataset(data, conv, path.name)
    else:
        rows = flatten(data)
        for section, key, value in rows:
            _convert_key(section, key, value, conv, path)
        linked = next((v for _, k, v in rows if k == "dataset_config" and isinstance(v, str) and v), None)
        if dataset_path is None and linked:
            candidate = Path(linked) if Path(linked).is_absolute() else path.parent / linked
            dataset_path = candidate if candidate.is_file() else None
            if dataset_path is None:
                conv.skipped.append((f"dataset_config = {_show(linked)}", "file not found: pass it with "
                                     "--dataset-config FILE"))
    if dataset_path is not None:
        _convert_dataset(read_toml(dataset_path), conv, dataset_path.name)
        if conv.subsets and "train_data_dir" in conv.values:
            conv.skipped.append((conv.origin.pop("train_data_dir"), "kohya ignores it when a dataset config is "
                                 "given: the dataset config's subsets are under datasets:"))
            del conv.values["train_data_dir"]
    _settle(conv, str(path))
    return conv


def _convert_key(section: str, key: str, value, conv: Conversion, path: Path) -> None:
    where = f"{section}{key} = {_show(value)}"
    if key == "reg_data_dir":
        if value in ("", None):
            conv.skipped.append((where, "empty: no regularization images"))
        else:
            _reg_folders(conv, key, value, path, where)
        return
    if key in ("network_module", "network_args"):
        _network(key, value, conv, where)
        return
    if key in SAME_AS_AGENTD:
        same, why_same, why_not = SAME_AS_AGENTD[key]
        conv.skipped.append((where, f"needs no key: {why_same}" if value in same else why_not))
        return
    if key not in MAPPED:
        conv.skipped.append((where, UNSUPPORTED.get(key, "not supported by agentd")))
        return
    target, converter = MAPPED[key]
    try:
        converted = converter(value)
    except NotConverted as e:
        conv.skipped.append((where, str(e)))
        return
    except WrongType as e:
        conv.problems.append(Problem(key, f"is {value!r} ({type(value).__name__}); agentd's {target} needs {e}",
                                     f"write {key} as {e} in {path.name}", value))
        return
    if target == "learning_rate" and key == "learning_rate" and "learning_rate" in conv.values:
        conv.skipped.append((where, "unet_lr is used as agentd's learning_rate"))
        return
    conv.values[target] = converted
    conv.origin[target] = where


# network_module values agentd trains, and LyCORIS's/sd-scripts' network_args -> (network key, converter).
NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
NETWORK_ARGS = {"algo": ("type", lambda v: {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr"}[v]),
                "conv_dim": ("conv_rank", _int), "conv_alpha": ("conv_alpha", _float), "factor": ("factor", _int),
                "decompose_both": ("decompose_both", _bool), "dora_wd": ("dora", _bool)}


def _network(key: str, value, conv: Conversion, where: str) -> None:
    """network_module and network_args (["algo=lokr", "factor=8"], ["conv_dim=8", "conv_alpha=4", "dora_wd=True"])
    -> `network:`; kohya's LoRA with conv_dim (and LyCORIS's algo lora) is LoCon when conv_dim is given."""
    if key == "network_module":
        if value not in NETWORK_MODULES:
            conv.skipped.append((where, UNSUPPORTED["network_module"]))
        elif value == "networks.lora":
            conv.skipped.append((where, "agentd's default network (LoRA; network_args conv_dim makes it LoCon)"))
        elif "network.type" not in conv.values:  # lycoris.kohya: its default algo, unless network_args said one
            conv.values["network.type"] = "lora"
            conv.origin["network.type"] = where
        return
    if value in ([], ""):
        conv.skipped.append((where, "empty: no network arguments"))
    for arg in (value if isinstance(value, list) else [value]) if value not in ([], "") else []:
        name, _, text = str(arg).partition("=")
        name, text = name.strip(), text.strip().strip("\"'")
        if name not in NETWORK_ARGS:
            conv.skipped.append((f"{where} ({name})", "this network argument is not supported by agentd"))
            continue
        target, converter = NETWORK_ARGS[name]
        try:
            converted = converter(_literal(text) if name != "algo" else text.lower())
        except (WrongType, KeyError):
            conv.skipped.append((f"{where} ({name}={text})", "not a value agentd trains (algo: lora, locon, loha, "
                                 "lokr)"))
            continue
        conv.values[f"network.{target}"] = converted
        conv.origin[f"network.{target}"] = f"{where} ({name})"
    if conv.values.get("network.type", "lora") == "lora" and "network.conv_rank" in conv.values:
        conv.values["network.type"] = "locon"
        conv.origin["network.type"] = f"{where} (conv_dim: LoCon)"


def _reg_folders(conv: Conversion, key: str, value, path: Path, where: str) -> None:
    """reg_data_dir's N_name folders as is_reg subsets (listed now: agentd marks reg by subset)."""
    from trainer.data.images import REPEAT_FOLDER

    folder = _existing_dir(value, path)
    if folder is None:
        conv.skipped.append((where, UNSUPPORTED["reg_data_dir"]))
        return
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = REPEAT_FOLDER.match(sub.name)
        if m:
            conv.subsets.append([("image_dir", str(Path(value) / sub.name), where),
                                 ("num_repeats", int(m.group(1)), where),
                                 ("class_tokens", m.group(2), where), ("is_reg", True, where)])


def _existing_dir(value: str, toml: Path) -> Path | None:
    """kohya resolves relative paths against its working folder; failing that, try the TOML's folder."""
    for folder in (Path(value), toml.parent / value):
        if folder.is_dir():
            return folder
    return None


def _convert_dataset(data: dict, conv: Conversion, name: str) -> None:
    general = data.get("general", {})
    for key, value in general.items():
        _dataset_level(f"[general] {key}", key, value, conv, name)
    for n, ds in enumerate(data.get("datasets", [])):
        differs = [k for k, v in ds.items() if n > 0 and k in DATASET_LEVEL and conv.values.get(MAPPED[k][0]) != _try(k, v)]
        if differs:  # one resolution and batch size per job: this dataset is another job
            for key, value in ds.items():
                what = f"{len(value)} subset(s)" if key == "subsets" else _show(value)
                conv.skipped.append((f"[[datasets]] #{n + 1} {key} = {what}", f"this dataset's {', '.join(differs)} "
                                     "differ from the first dataset's, and an agentd job trains one: train it as a "
                                     "second job (a copy of this TOML holding only that dataset)"))
            continue
        for key, value in ds.items():
            if key == "subsets":
                continue
            where = f"[[datasets]] #{n + 1} {key}"
            _dataset_level(where, key, value, conv, name, own_subsets=ds.get("subsets", []))
        for m, sub in enumerate(ds.get("subsets", [])):
            entry = []
            for key, value in sub.items():
                where = f"[[datasets.subsets]] #{n + 1}.{m + 1} {key} = {_show(value)}"
                if key not in SUBSET_KEYS:
                    conv.skipped.append((where, UNSUPPORTED.get(key, "not supported by agentd for a subset")))
                    continue
                target, converter = SUBSET_KEYS[key]
                try:
                    entry.append((target, converter(value), where))
                except WrongType as e:
                    conv.problems.append(Problem(key, f"is {value!r} ({type(value).__name__}) in subset {m + 1} of "
                                                 f"dataset {n + 1}; it should be {e}", f"fix it in {name}", value))
            for key, value in ds.items():  # a dataset's caption options apply to its subsets
                if key in SUBSET_KEYS and key not in sub and key not in ("image_dir", "is_reg", "class_tokens"):
                    entry.append((SUBSET_KEYS[key][0], SUBSET_KEYS[key][1](value), f"[[datasets]] #{n + 1} {key} = "
                                  f"{_show(value)}"))
            conv.subsets.append(entry)


def _try(key, value):
    try:
        return MAPPED[key][1](value)
    except WrongType:
        return None


def _dataset_level(where: str, key: str, value, conv: Conversion, name: str, own_subsets=()) -> None:
    if key in SUBSET_KEYS and key not in DATASET_LEVEL and own_subsets:
        return  # applied to the dataset's subsets
    if key in MAPPED:
        _convert_key("", key, value, conv, Path(name))
        target = MAPPED[key][0]
        if target in conv.origin:
            conv.origin[target] = f"{where} = {_show(value)}"
    else:
        conv.skipped.append((f"{where} = {_show(value)}", UNSUPPORTED.get(key, "not supported by agentd")))


def _settle(conv: Conversion, source: str) -> None:
    """kohya's precedence and defaults that differ from agentd's."""
    v = conv.values
    if "epochs" in v and "max_train_steps" in v:
        conv.skipped.append((conv.origin.pop("max_train_steps"), "max_train_epochs wins in kohya; kept as epochs"))
        del v["max_train_steps"]
    if conv.subsets and "train_data_dir" in v:
        # reg_data_dir folders became subsets: train_data_dir's N_name folders join them.
        from trainer.data.images import REPEAT_FOLDER

        where = conv.origin.pop("train_data_dir")
        train = v.pop("train_data_dir")
        found = _existing_dir(train, Path(source))
        folders = sorted(p.name for p in found.iterdir() if p.is_dir() and REPEAT_FOLDER.match(p.name)) if found else []
        if found and not folders:  # a plain folder of images: one subset, seen once per epoch
            conv.subsets.insert(0, [("image_dir", train, where)])
        conv.subsets[:0] = [[("image_dir", str(Path(train) / f), where),
                             ("num_repeats", int(REPEAT_FOLDER.match(f).group(1)), where),
                             ("class_tokens", REPEAT_FOLDER.match(f).group(2), where)] for f in folders]
        if not found:
            conv.skipped.append((where, "not found, so its N_name folders could not be listed beside reg_data_dir's: "
                                 "list them under datasets:"))
    if "sample_prompts" not in v:
        for key in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_start", "sample_sampler"):
            if key in v:
                conv.skipped.append((conv.origin.pop(key), "no sample_prompts: kohya samples nothing without them"))
                del v[key]
    if "output_dir" not in v:
        v["output_dir"] = "./output"
        conv.origin["output_dir"] = "kohya's default (agentd needs an output_dir)"


def to_yaml(conv: Conversion, source: str) -> str:
    """The YAML text: each converted line with its kohya origin; then what was not converted, and why."""
    out = [f"# Converted from {source} by `agentd import-kohya`.", *_preset_header(conv.preset),
           "# Run: agentd validate THIS.yaml && agentd run THIS.yaml (lora-train --config THIS.yaml in the foreground).",
           "# Relative paths resolve against this file's folder (kohya resolved them against its working folder).", ""]
    nested: dict[str, dict] = {}
    for key, value in conv.values.items():
        if "." in key:
            head, _, tail = key.partition(".")
            nested.setdefault(head, {})[tail] = (value, conv.origin[key])
            continue
        out.append(f"{key}: {_show(value)}  # kohya: {conv.origin[key]}")
    for head, fields in nested.items():
        out.append(f"{head}:")
        out += [f"  {k}: {_show(v)}  # kohya: {o}" for k, (v, o) in fields.items()]
    if conv.subsets:
        out.append("datasets:")
        for entry in conv.subsets:
            for i, (k, v, o) in enumerate(entry):
                out.append(f"  {'- ' if i == 0 else '  '}{k}: {_show(v)}  # kohya: {o}")
    if conv.skipped:
        out += ["", "# Not converted (kohya key = value: why):"]
        out += [f"#   {where}: {why}" for where, why in conv.skipped]
    return "\n".join(out) + "\n"


def _preset_header(meta: dict[str, Any]) -> list[str]:
    """A lora-scripts preset's [metadata] as comment lines, in its own words and script: name (version, author,
    the train_type it is shown for), then the description."""
    if not meta:
        return []
    about = [f"version {meta['version']}" if meta.get("version") else "", f"by {meta['author']}" if meta.get("author")
             else "", f"for {meta['train_type']}" if meta.get("train_type") else ""]
    about = ", ".join(a for a in about if a)
    lines = [f"# Preset: {meta.get('name') or '(unnamed)'}" + (f" ({about})" if about else "")]
    lines += [f"#   {line}" for line in str(meta.get("description") or "").splitlines()]
    lines += [f"#   {k}: {_show(v)}" for k, v in meta.items() if k not in ("name", "version", "author", "train_type",
                                                                            "description")]
    return lines


def import_kohya(path: Path, dataset_path: Path | None = None) -> str:
    """The YAML for kohya TOML(s); raises ConfigError with every problem (nothing to write then)."""
    conv = convert(path, dataset_path)
    if conv.problems:
        raise ConfigError(conv.problems, str(path))
    return to_yaml(conv, str(path) + (f" + {dataset_path}" if dataset_path else ""))
