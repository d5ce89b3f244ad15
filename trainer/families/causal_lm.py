"""Family `causal_lm`: a LoRA on a transformers causal language model (Llama, Mistral, Qwen, GPT-2 ...).

Detected from a folder whose `config.json` lists an `architectures` entry ending in `ForCausalLM` (or
`LMHeadModel`, GPT-2's name). Trains on raw text, alpaca, sharegpt or OpenAI-messages records rendered
with the model's chat template (`trainer.data.text`); no separate text encoder. Light (no torch at
import): the loader and the task are in `trainer.families.causal_lm_task`.
"""
from __future__ import annotations

from pathlib import Path

from trainer.errors import Problem
import trainer.families.memory as memory
from trainer.families.base import Family
from trainer.families.probe import Probe


class CausalLmFamily(Family):
    NAME = "causal_lm"
    TITLE = "causal language model (transformers)"
    MODE = "text"
    LORA_VERSIONS = ("causal_lm",)
    LORA_KEY_PREFIXES = ("lora_lm_",)
    ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
    # Llama-style attention projections (also Mistral, Qwen2, Gemma, Phi-3 ...); models without them get peft's
    # targets for their model_type (`defaults`: GPT-2 [c_attn], Falcon [query_key_value] ...).
    DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
    VRAM_SHAPE_FIELDS = ("max_seq_length", "quantization")  # the settings besides the model that shape its memory
    # Family-specific keys it reads (families.key_problems); quantization: bitsandbytes' 4bit/8bit (QLoRA) or no.
    OWN_KEYS = {**dict.fromkeys(("max_seq_length", "dataset_format", "chat_template", "train_on_prompt", "truncation",
                                 "packing", "validation_file", "export_merged")),
                "quantization": ("4bit", "8bit", "no")}
    ACT_FACTOR = 0.67  # activations under mixed precision, as a fraction of fp32 (see trainer.checks.vram)
    # Linear layers only (no convolutions: no locon); the PEFT folder and the merged export carry each type.
    NETWORK_TYPES = ("lora", "loha", "lokr")
    DORA = True

    def detect(self, p: Probe) -> bool:
        return p.kind == "folder" and any(a.endswith(self.ARCHITECTURE_SUFFIXES) for a in p.architectures)

    def defaults(self, p: Probe, cfg) -> dict:
        """Defaults that fit the model: the Llama-style targets, or, for a model without q_proj (GPT-2: c_attn,
        Falcon and GPT-NeoX: query_key_value ...), peft's targets for its model_type; a max_seq_length of 512,
        or the model's positions when fewer."""
        config = _model_config(cfg)
        out = super().defaults(p, cfg)
        model_type = config.get("model_type")
        if model_type:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

            theirs = PEFT_TARGETS.get(model_type)
            if theirs and not set(self.DEFAULT_TARGETS) & set(theirs):
                out["target_modules"] = list(theirs)
        limit = _position_limit(config)
        if limit is not None:
            out["max_seq_length"] = min(type(cfg).model_fields["max_seq_length"].default, limit)
        return out

    def check(self, cfg, p: Probe, describe) -> list[Problem]:
        problems = []
        if cfg.train_text_encoder:
            problems.append(Problem("train_text_encoder", f"a {self.TITLE} has no separate text encoder",
                                    "remove train_text_encoder (the LoRA already adapts the whole model's "
                                    "target_modules)", True))
        if cfg.base_quantization in ("4bit", "8bit") and (cfg.network.type != "lora" or cfg.network.dora):
            problems.append(Problem("network.type", f"{cfg.network.title} on a {cfg.base_quantization} base is not "
                                    "supported (QLoRA trains plain LoRA on bitsandbytes layers)",
                                    "use network type lora, or quantization: no", cfg.network.type))
        if cfg.base_model_config is not None:
            problems.append(Problem("base_model_config", f"does not apply to a {self.TITLE} (its folder holds its "
                                    "config.json)", "remove base_model_config", str(cfg.base_model_config)))
        problems += _length_problems(cfg)
        problems += quantization_problems(cfg)
        if not problems:  # target modules are checked against the model's config (meta device, no weights)
            from trainer.families.causal_lm_task import check_text_targets

            problems += check_text_targets(cfg)
        return problems

    def config_dir(self, cfg) -> Path:
        """The folder with config.json (the model folder itself)."""
        return cfg.base_model

    def scan_dataset(self, cfg):
        from trainer.data.text import scan_text

        return scan_text(cfg)

    def make_dataset(self, cfg, samples):
        from trainer.families.causal_lm_task import TextDataset

        return TextDataset(samples)

    def load_base(self, cfg, device, dtype):
        from trainer.families.causal_lm_task import load_text_base

        return load_text_base(cfg, device, dtype)

    def make_task(self, cfg, base, device):
        from trainer.families.causal_lm_task import TextTask

        return TextTask(cfg, base, device)

    def vram_summary(self, model_dir: Path, targets: tuple[str, ...], te_targets: tuple[str, ...]):
        return memory.causal_lm_model_summary(model_dir, targets)

    def vram_network_counts(self, model_dir: Path, targets, te_targets, network, rank: int,
                            alpha: float) -> dict[str, int]:
        return memory.text_network_counts(model_dir, targets, network, rank, alpha)

    def vram_per_sample_bytes(self, summary, shape: dict) -> float:
        return memory.causal_lm_per_sample_bytes(summary, shape)

    def preload(self) -> None:
        from trainer.quiet import quiet_libraries

        quiet_libraries()
        from peft import LoraConfig, inject_adapter_in_model  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


FAMILY = CausalLmFamily()


def _model_config(cfg) -> dict:
    """The model's config.json ({} when unreadable: the checks that need it say so)."""
    import json

    try:
        config = json.loads((Path(cfg.base_model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _position_limit(config: dict) -> int | None:
    """The model's positions (config.json's max_position_embeddings / n_positions)."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    return limit if isinstance(limit, int) else None


def _length_problems(cfg) -> list[Problem]:
    """A max_seq_length the config wrote must fit the model's positions (left out, it is made to fit: `defaults`)."""
    limit = _position_limit(_model_config(cfg))
    if limit is not None and cfg.max_seq_length > limit:
        return [Problem("max_seq_length", f"is larger than the model's maximum position embeddings ({limit}, "
                        "config.json): positions beyond it were never trained (or do not exist)",
                        f"set max_seq_length to at most {limit}", cfg.max_seq_length)]
    return []


def quantization_problems(cfg) -> list[Problem]:
    """QLoRA needs CUDA and bitsandbytes: said here, before any weight loads."""
    if cfg.base_quantization is None:
        return []
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return [Problem("quantization", f"{cfg.quantization} (bitsandbytes) needs a CUDA GPU and this machine has "
                        "none (torch.cuda.is_available() is False)",
                        "remove quantization to train the full-precision base here, or run the job on a GPU box "
                        "(agentd run)", cfg.quantization)]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [Problem("quantization", "needs the bitsandbytes package, which is not installed",
                        "pip install bitsandbytes (make setup installs it), or remove quantization",
                        cfg.quantization)]
    return []
