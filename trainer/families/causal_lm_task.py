"""Family `causal_lm`, the heavy half: a LoRA on a causal language model (transformers + peft), a
`trainer.families.Task`.

The frozen base (`TextBase`: model + tokenizer) is loaded once, offline, and may be kept warm by the
daemon between jobs; the task injects LoRA layers for one job and removes them in `detach()`.

Data: each sample is one text (`trainer.data.scan_text_dataset`: a `.txt` file, or one `{"text": ...}`
line of a `.jsonl` file). A micro-batch is tokenized with the model's tokenizer (its BOS when it adds
one) and cut to `max_seq_length` tokens; an EOS is appended to each text that fits (so the model learns
where a sample ends; a text cut at the limit gets none), and the batch is right-padded. Padding is the
tokenizer's pad token, or EOS when it has none (Llama).

Loss: next-token cross-entropy, in fp32, averaged over the real (non-padding) target tokens of the
micro-batch; padding positions carry label -100. The loss draws no randomness from the step generator
(dropout, if any, uses the global RNG, which the checkpoint also captures).

Target modules: peft's rule (a module whose full name equals a target or ends with `.<target>`). Every
target must match at least one module, else `TargetModulesError` (a `ConfigError`: exit code 2) names
the model's adaptable layer names. The default targets are Llama-style `q_proj/k_proj/v_proj/o_proj`
(also Mistral, Qwen2, Gemma, Phi-3 ...); GPT-2-style models need e.g. `[c_attn, c_proj]`.
`target_modules: [all-linear]` is passed to peft as its "all-linear" preset (every linear layer but the
output head).

Outputs: `<name>.safetensors` (written by the job, from `lora_state()`: kohya-style names under the
`lora_lm_` prefix, used for checkpoints and `init_lora_weights`) and, from `export_extra`, the PEFT
adapter folder `<output_dir>/<name>-peft/` (adapter_config.json + adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(base_model, folder)` and `model.load_adapter(folder)` read.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import lora_io
from trainer.config import TrainConfig
from trainer.data import Sample
from trainer.errors import ConfigError, Problem
from trainer.quiet import quiet_libraries

log = logging.getLogger(__name__)

MODEL_KEY = "model"  # the models dict key; lora_io.PREFIXES maps it to the "lora_lm" key prefix
ALL_LINEAR = "all-linear"
SAMPLE_MAX_NEW_TOKENS = 64


class TargetModulesError(ConfigError):
    """target_modules names layers the model does not have (found after the model's structure is known)."""


@dataclass
class TextBase:
    """The frozen parts of a causal LM."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    architecture: str = ""


def load_text_base(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> TextBase:
    """Load a transformers causal LM and its tokenizer from a local folder, offline, frozen, on `device`."""
    quiet_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.base_model
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=weight_dtype)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    return TextBase(model, tokenizer, str(path), arch)


class TextDataset:
    """The texts of a text-mode dataset (each `Sample.caption` is one training text)."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def text(self, index: int) -> str:
        return self.samples[index].caption


# ------------------------------------------------------------------------------------------------
# Target modules


def _adaptable(module: torch.nn.Module) -> bool:
    """Layer types peft's LoRA wraps in a language model."""
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)) \
        or type(module).__name__ == "Conv1D"  # transformers' GPT-2 projection layer


def adaptable_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last-component names of the model's adaptable layers, in model order (for messages)."""
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _adaptable(m)]
    return list(dict.fromkeys(names))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def target_problems(model: torch.nn.Module, targets: list[str], where: str = "") -> list[Problem]:
    """Problems with `targets` for `model`: each target must name at least one adaptable layer."""
    if targets == [ALL_LINEAR]:
        return []
    names = [n for n, m in model.named_modules() if n]
    layer_names = adaptable_layer_names(model)
    problems = []
    unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
    not_layers = [t for t in targets if t not in unmatched
                  and not any(_matches(n, t) and _adaptable(m) for n, m in model.named_modules() if n)]
    arch = type(model).__name__ + (f" at {where}" if where else "")
    suggestion = [n for n in layer_names if n not in ("lm_head", "embed_tokens", "wte", "wpe")]
    if unmatched:
        problems.append(Problem(
            "target_modules",
            f"{unmatched} match no module of the base model ({arch}); its adaptable layers are: "
            f"{', '.join(layer_names)}",
            f"set target_modules to some of {suggestion[:8]} (attention projections are the usual choice), "
            f"or [{ALL_LINEAR}]", targets))
    if not_layers:
        problems.append(Problem(
            "target_modules", f"{not_layers} name containers, not linear layers, in {arch}",
            f"name the layers inside them, e.g. {suggestion[:4]}", targets))
    return problems


def check_text_targets(cfg: TrainConfig) -> list[Problem]:
    """The target-module check from the model's config.json alone (a meta model; no weights are read).

    Cheap enough for preflight/validate: nothing is allocated."""
    quiet_libraries()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.base_model, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return target_problems(model, cfg.effective_targets, str(cfg.base_model))


# ------------------------------------------------------------------------------------------------


class TextTask:
    """One job's LoRA on a `TextBase`: trainable parameters, the loss, and the LoRA's file formats."""

    def __init__(self, cfg: TrainConfig, base: TextBase, device: torch.device):
        from peft import LoraConfig, inject_adapter_in_model

        self.cfg, self.base, self.device = cfg, base, device
        targets = cfg.effective_targets
        problems = target_problems(base.model, targets, str(cfg.base_model))
        if problems:
            raise TargetModulesError(problems)
        self.lora_config = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets, task_type="CAUSAL_LM",
            base_model_name_or_path=str(cfg.base_model))
        # LoRA init (A: kaiming uniform, B: zeros) draws from the global RNG: seed it so the same config
        # gives the same starting LoRA, cold or warm daemon.
        torch.manual_seed(cfg.seed)
        inject_adapter_in_model(self.lora_config, base.model)
        self.models = {MODEL_KEY: base.model}
        for n, p in base.model.named_parameters():
            if "lora_" in n:
                # Trainable LoRA weights stay fp32 even when the frozen base is half precision.
                p.data = p.data.float()
                p.requires_grad_(True)
        self._checkpointing = False
        if cfg.gradient_checkpointing and getattr(base.model, "supports_gradient_checkpointing", False):
            # Non-reentrant checkpointing works with a frozen base (no input-grad hook needed).
            # transformers 5.x renamed it activation checkpointing (the old name warns until v6).
            if hasattr(base.model, "activation_checkpointing_enable"):
                base.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                base.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            self._checkpointing = True

    # --- parameters and the LoRA file -------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.base.model.parameters() if p.requires_grad],
                 "lr": self.cfg.learning_rate}]

    def prepare(self, dataset: TextDataset) -> None:
        return None  # texts are tokenized per micro-batch: cheap next to the model's forward pass

    def train(self):
        self.base.model.train()

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA with kohya-style names (`lora_lm_<module path>.lora_down/up.weight`, `.alpha`):
        what checkpoints, `<name>.safetensors` and `init_lora_weights` use."""
        return lora_io.to_kohya(self.models, self.cfg.effective_alpha)

    def load_lora_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        lora_io.load_kohya(self.models, tensors, source)

    def lora_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": "causal_lm", "agentd_base_architecture": self.base.architecture,
                "agentd_target_modules": ",".join(self.cfg.effective_targets),
                "agentd_max_seq_length": str(self.cfg.max_seq_length)}

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The LoRA with PEFT's saved key names (`base_model.model.<module>.lora_A.weight`)."""
        out = {}
        for name, p in self.base.model.named_parameters():
            for part in ("lora_A", "lora_B"):
                tag = f".{part}.default.weight"
                if name.endswith(tag):
                    key = f"base_model.model.{name[: -len(tag)]}.{part}.weight"
                    out[key] = p.detach().float().cpu().contiguous()
        return out

    def export_extra(self, output_dir: Path) -> list[Path]:
        """Write `<output_dir>/<name>-peft/` (adapter_config.json + adapter_model.safetensors), atomically:
        built in a temporary folder beside it, then swapped in."""
        from safetensors.torch import save_file

        folder = Path(output_dir) / f"{self.cfg.run_name}-peft"
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.lora_config.save_pretrained(str(tmp))
        save_file(self.peft_state(), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "README.md").write_text(
            f"PEFT LoRA adapter for {self.cfg.base_model} (trained by agentd).\n\n"
            "    from peft import PeftModel\n"
            f"    model = PeftModel.from_pretrained(base_model, \"{folder}\")\n")
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return [folder]

    def detach(self) -> None:
        """Remove this job's LoRA layers, leaving the base exactly as loaded (for the warm cache)."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        model = self.base.model
        if self._checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None)
            (disable or model.gradient_checkpointing_disable)()
            self._checkpointing = False
        recurse_remove_peft_layers(model)
        if "peft_config" in model.__dict__:
            del model.peft_config
        model.requires_grad_(False)
        model.eval()

    # --- the loss ---------------------------------------------------------------------------------
    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) for `texts`: EOS-terminated, cut to max_seq_length,
        right-padded; labels are the ids with -100 on padding."""
        tok = self.base.tokenizer
        max_len = self.cfg.max_seq_length
        eos = tok.eos_token_id
        encoded = tok(texts, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
        rows = []
        for ids in encoded:
            ids = list(ids)
            # EOS marks a real end: appended when the text fits; a text cut at max_seq_length gets none.
            if eos is not None and len(ids) < max_len and (not ids or ids[-1] != eos):
                ids.append(eos)
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        return input_ids, mask, labels

    def loss(self, indices: list[int], dataset: TextDataset, generator: torch.Generator,
             autocast) -> torch.Tensor:
        input_ids, mask, labels = self.batch([dataset.samples[i].caption for i in indices])
        input_ids, mask, labels = input_ids.to(self.device), mask.to(self.device), labels.to(self.device)
        with autocast():
            logits = self.base.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        if not bool((shift_labels != -100).any()):
            return shift_logits.sum() * 0.0  # nothing to predict (one-token samples): a zero, still a graph
        return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=-100)

    # --- samples ----------------------------------------------------------------------------------
    def eval(self) -> None:
        self.base.model.eval()

    def render_sample(self, prompt, path: Path) -> Path:
        """The greedy continuation of `prompt.prompt` (a `trainer.sampling.SamplePrompt`) with the LoRA as
        trained so far, saved as `path`.txt (prompt + completion)."""
        model, tok = self.base.model, self.base.tokenizer
        with torch.no_grad():
            enc = tok(prompt.prompt, return_tensors="pt").to(self.device)
            out = model.generate(**enc, max_new_tokens=SAMPLE_MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        dest = Path(path).with_suffix(".txt")
        dest.write_text(f"{prompt.prompt}{text}\n", encoding="utf-8")
        return dest
