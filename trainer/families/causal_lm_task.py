"""Family `causal_lm`, the heavy half: a LoRA on a causal language model (transformers + peft), a
`trainer.families.Task`.

The frozen base (`TextBase`: model + tokenizer) is loaded once, offline, and may be kept warm by the
daemon between jobs; the task injects LoRA layers for one job and removes them in `detach()`.

Data: `trainer.data.text` reads the records (raw text, alpaca, sharegpt, OpenAI messages), renders chat
formats with the model's chat template and tokenizes everything once, at preflight; each `TextSample`
holds its token ids, the 0/1 mask of the tokens the loss trains on (the assistant turns, from the
rendered template; every token of raw text, which ends with EOS) and, packed, the lengths of the samples
in the row. A micro-batch is right-padded with the tokenizer's pad token (EOS when it has none, as
Llama's); padding and untrained tokens carry label -100.

Packing: position ids restart at 0 for every sample of a row and the model gets no 2-D attention mask
and no KV cache (`use_cache=False`: with a cache transformers does not look for packed rows), so
transformers' masking utilities (`create_causal_mask`) see the restarts and keep each sample's
attention within itself: a block-diagonal causal mask for eager, sdpa and flex attention, per-sample
lengths for flash_attention_2/3. `trainer.data.text.packing_isolates` tells which models build their
mask that way (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2 ... in transformers 5); for others preflight
warns that packed samples can see the samples before them.

Loss: next-token cross-entropy, in fp32, averaged over the trained target tokens of the micro-batch.
The loss draws nothing from the per-sample generators (dropout, if any, uses the global RNG, which the
checkpoint captures per rank).

QLoRA (`quantization: 4bit|8bit`): the base loads through bitsandbytes (NF4, double quantization, bf16
compute dtype; or LLM.int8) onto the job's CUDA device; LoRA weights stay fp32 and gradient
checkpointing is on. Preflight refuses it without CUDA, before any weight loads.

Target modules: peft's rule (a module whose full name equals a target or ends with `.<target>`). Every
target must match at least one module, else `TargetModulesError` (a `ConfigError`: exit code 2) names
the model's adaptable layer names. The default targets are Llama-style `q_proj/k_proj/v_proj/o_proj`
(also Mistral, Qwen2, Gemma, Phi-3 ...); GPT-2-style models need e.g. `[c_attn, c_proj]`.
`target_modules: [all-linear]` is passed to peft as its "all-linear" preset (every linear layer but the
output head).

Outputs: `<name>.safetensors` (written by the job, from `lora_state()`: kohya-style names under the
`lora_lm_` prefix, used for checkpoints and `init_lora_weights`) and, from `export_extra`, the PEFT
adapter folder `<output_dir>/<name>-peft/` (adapter_config.json + adapter_model.safetensors, plus the
tokenizer with the chat template used) that `peft.PeftModel.from_pretrained(base_model, folder)` and
`model.load_adapter(folder)` read; with `export_merged: true` also `<name>-merged/`, the base with the
LoRA merged in (W + scale x B A, computed out of place so the warm base stays untouched; a quantized
base is dequantized first), saved with the tokenizer: `AutoModelForCausalLM.from_pretrained` loads it.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import trainer.families.lora_io as lora_io
import trainer.families.peft_lora as peft_lora
from trainer.config import TrainConfig
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
    """Load a transformers causal LM and its tokenizer from a local folder, offline, frozen, on `device`
    (quantized by bitsandbytes with `quantization`)."""
    quiet_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.base_model
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template is not None:
        from trainer.data.text import template_text

        tokenizer.chat_template = template_text(cfg.chat_template)  # exported with the adapter and merged model
    if cfg.base_quantization is not None:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, quantization_config=quantization_config(cfg),
            dtype=compute_dtype(cfg), device_map={"": _device_map_target(device)})
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=weight_dtype)
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    return TextBase(model, tokenizer, str(path), arch)


def _device_map_target(device: torch.device):
    """What `device_map` wants for one device: a CUDA index (plain "cuda" is the current one), or "cpu"."""
    if device.type == "cuda":
        return torch.cuda.current_device() if device.index is None else device.index
    return str(device)


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """QLoRA's compute dtype: bf16 (fp16 when the config asks for fp16 mixed precision)."""
    return torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16


def quantization_config(cfg: TrainConfig):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(cfg))


class TextDataset:
    """The tokenized rows of a text-mode dataset (`trainer.data.text.TextSample`s)."""

    def __init__(self, samples: list):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)


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


def target_problems(model: torch.nn.Module, targets: list[str], where: str = "") -> list[Problem]:
    """Problems with `targets` for `model`: each target must name at least one adaptable layer."""
    if targets == [ALL_LINEAR]:
        return []
    names = [n for n, m in model.named_modules() if n]
    layer_names = adaptable_layer_names(model)
    problems = []
    unmatched = [t for t in targets if not any(peft_lora.matches(n, [t]) for n in names)]
    not_layers = [t for t in targets if t not in unmatched
                  and not any(peft_lora.matches(n, [t]) and _adaptable(m) for n, m in model.named_modules() if n)]
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
    return target_problems(model, cfg.target_modules, str(cfg.base_model))


# ------------------------------------------------------------------------------------------------


class TextTask:
    """One job's LoRA on a `TextBase`: trainable parameters, the loss, and the LoRA's file formats."""

    def __init__(self, cfg: TrainConfig, base: TextBase, device: torch.device):
        self.cfg, self.base, self.device = cfg, base, device
        targets = cfg.target_modules
        problems = target_problems(base.model, targets, str(cfg.base_model))
        if problems:
            raise TargetModulesError(problems)
        # LoRA init (A: kaiming uniform, B: zeros) draws from the global RNG: seed it so the same config
        # gives the same starting LoRA, cold or warm daemon.
        torch.manual_seed(cfg.seed)
        self.lora_config = peft_lora.inject(
            base.model, cfg, ALL_LINEAR if targets == [ALL_LINEAR] else targets, task_type="CAUSAL_LM",
            base_model_name_or_path=str(cfg.base_model))
        self.models = {MODEL_KEY: base.model}
        peft_lora.trainable(base.model)
        self._checkpointing = False
        self.chat = False  # set by prepare(): the data is conversations
        if (cfg.gradient_checkpointing or cfg.base_quantization) \
                and getattr(base.model, "supports_gradient_checkpointing", False):
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

    def prepare(self, dataset: TextDataset, autocast=None) -> None:
        # Tokenized at preflight already (trainer.data.text); samples follow the data: chat data, chat prompts.
        self.chat = bool(dataset.samples) and dataset.samples[0].chat

    def train(self):
        self.base.model.train()

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA with kohya-style names (`lora_lm_<module path>.lora_down/up.weight`, `.alpha`):
        what checkpoints, `<name>.safetensors` and `init_lora_weights` use."""
        return lora_io.to_kohya(self.models)

    def load_lora_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        lora_io.load_kohya(self.models, tensors, source)

    def lora_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": "causal_lm", "agentd_base_architecture": self.base.architecture,
                "agentd_target_modules": ",".join(self.cfg.target_modules),
                "agentd_max_seq_length": str(self.cfg.max_seq_length)}

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The network with PEFT's saved key names (`base_model.model.<module>.lora_A.weight`, `.hada_w1_a`,
        `.lokr_w1`, `.lora_magnitude_vector`: peft's own `get_peft_model_state_dict`, what `save_pretrained`
        writes), fp32."""
        from peft import get_peft_model_state_dict

        return {f"base_model.model.{k}": v.detach().float().cpu().contiguous()
                for k, v in get_peft_model_state_dict(self.base.model).items()}

    def adapters_disabled(self):
        """The base without this LoRA inside the block (the evaluation's base arm), nothing reloaded."""
        return peft_lora.disabled(*self.models.values())

    def export_extra(self, output_dir: Path) -> list[Path]:
        """`<name>-peft/` (adapter_config.json, adapter_model.safetensors, the tokenizer and its chat template)
        and, with export_merged, `<name>-merged/`; each built in a temporary folder beside it, then swapped in."""
        from safetensors.torch import save_file

        folder = Path(output_dir) / f"{self.cfg.run_name}-peft"

        def write_adapter(tmp: Path) -> None:
            self.lora_config.save_pretrained(str(tmp))
            save_file(self.peft_state(), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            self.base.tokenizer.save_pretrained(str(tmp))
            (tmp / "README.md").write_text(
                f"PEFT LoRA adapter for {self.cfg.base_model} (trained by agentd).\n\n"
                "    from peft import PeftModel\n"
                f"    model = PeftModel.from_pretrained(base_model, \"{folder}\")\n")

        out = [_swap_in(folder, write_adapter)]
        if self.cfg.export_merged:
            out.append(_swap_in(self.merged_dir, self.write_merged))
        return out

    @property
    def merged_dir(self) -> Path:
        return Path(self.cfg.output_dir) / f"{self.cfg.run_name}-merged"

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The base's state dict with every LoRA merged in (W + scale x B A), under the base's own names;
        quantized layers dequantized. Computed out of place: the (warm) base is left as it is."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.integrations import dequantize_module_weight

        model, out, done = self.base.model, {}, set()
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                base_layer = module.get_base_layer()
                weight = dequantize_module_weight(base_layer).detach().float()  # summed in fp32, then cast
                delta = module.get_delta_weight("default").float()
                merged = _dora(module, weight + delta) if self.cfg.network.dora else weight + delta
                out[f"{name}.weight"] = merged.to(self._save_dtype()).cpu().contiguous()
                if getattr(base_layer, "bias", None) is not None:
                    out[f"{name}.bias"] = base_layer.bias.detach().to(self._save_dtype()).cpu().contiguous()
                done.add(f"{name}.base_layer")
            elif _is_quantized(module) and not any(name.startswith(d) for d in done):
                out[f"{name}.weight"] = dequantize_module_weight(module).detach().to(self._save_dtype()).cpu()
                if getattr(module, "bias", None) is not None:
                    out[f"{name}.bias"] = module.bias.detach().to(self._save_dtype()).cpu()
                done.add(name)
        for key, tensor in model.state_dict().items():
            if any(m in key for m in peft_lora.ADAPTER_PARAM_MARKS) or ".base_layer." in key or key in out:
                continue
            owner = key.rsplit(".", 1)[0]
            if owner in done or any(key.startswith(d + ".") for d in done):
                continue  # a quantized layer's weight/state (absmax, quant_map...): written dequantized above
            out[key] = tensor.detach().to(self._save_dtype() if tensor.is_floating_point() else tensor.dtype) \
                .cpu().clone()
        return out

    def _save_dtype(self) -> torch.dtype:
        if self.cfg.base_quantization is not None:
            return compute_dtype(self.cfg)
        return next(p.dtype for n, p in self.base.model.named_parameters()
                    if not any(m in n for m in peft_lora.ADAPTER_PARAM_MARKS))

    def write_merged(self, tmp: Path) -> None:
        """A transformers folder of the merged model: config, weights, generation config, tokenizer."""
        from safetensors.torch import save_file

        model = self.base.model
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = str(self._save_dtype()).replace("torch.", "")
        state = self.merged_state()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: transformers re-ties it to the input embeddings
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        type(model.config).from_dict(config).save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        self.base.tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(
            f"{self.cfg.base_model} with the LoRA {self.cfg.run_name} merged in (trained by agentd).\n\n"
            "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"    model = AutoModelForCausalLM.from_pretrained(\"{self.merged_dir}\")\n"
            f"    tokenizer = AutoTokenizer.from_pretrained(\"{self.merged_dir}\")\n")

    def detach(self) -> None:
        """Remove this job's LoRA layers, leaving the base exactly as loaded (for the warm cache)."""
        model = self.base.model
        if self._checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None)
            (disable or model.gradient_checkpointing_disable)()
            self._checkpointing = False
        peft_lora.remove(model)

    # --- the loss ---------------------------------------------------------------------------------
    def batch(self, rows: list) -> dict[str, torch.Tensor]:
        """The model inputs and labels for `rows` (`TextSample`s), right-padded to the longest.

        Unpacked: input_ids, attention_mask, labels. Packed (`packing: true`): input_ids, position_ids
        restarting at 0 for each sample in a row (and for the padding after it), labels, and no attention
        mask, so transformers keeps each sample's attention within itself (see the module docstring)."""
        tok = self.base.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(r.ids) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.ids)
            ids = torch.tensor(list(r.ids), dtype=torch.long)
            input_ids[i, :n] = ids
            labels[i, :n] = ids.masked_fill(torch.tensor(list(r.trained)) == 0, -100)
            mask[i, :n] = 1
            at = 0
            for length in [*r.lengths, width - n]:
                positions[i, at:at + length] = torch.arange(length)
                at += length
        if self.cfg.packing:
            return {"input_ids": input_ids, "position_ids": positions, "labels": labels}
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def loss_units(self, indices: list[int], dataset: TextDataset) -> int:
        """The predicted tokens of these rows: the loss is a mean over tokens, so data-parallel ranks weigh
        their shares by it (trainer.training.distributed)."""
        labels = self.batch([dataset.samples[i] for i in indices])["labels"]
        return int((labels[:, 1:] != -100).sum())

    def loss(self, indices: list[int], dataset: TextDataset, generators: list[torch.Generator],
             autocast) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in self.batch([dataset.samples[i] for i in indices]).items()}
        labels = inputs.pop("labels")
        with autocast():
            logits = self.base.model(**inputs, use_cache=False).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        if not bool((shift_labels != -100).any()):
            return shift_logits.sum() * 0.0  # nothing to predict (all cut away): a zero, still a graph
        return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=-100)

    # --- samples ----------------------------------------------------------------------------------
    def eval(self) -> None:
        self.base.model.eval()

    def render_sample(self, prompt, path: Path) -> Path:
        """The greedy continuation of `prompt.prompt` (a `trainer.data.prompts.SamplePrompt`) with the LoRA as
        trained so far, saved as `path`.txt (prompt + completion). On chat data the prompt is a user turn,
        rendered with the chat template and its generation prompt, and generation stops at the turn's end."""
        model, tok = self.base.model, self.base.tokenizer
        with torch.no_grad():
            if self.chat:
                enc = tok.apply_chat_template([{"role": "user", "content": prompt.prompt}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True).to(self.device)
            else:
                enc = tok(prompt.prompt, return_tensors="pt").to(self.device)
            out = model.generate(**enc, max_new_tokens=SAMPLE_MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        dest = Path(path).with_suffix(".txt")
        dest.write_text(f"{prompt.prompt}{text}\n", encoding="utf-8")
        return dest


def _is_quantized(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _dora(module, merged: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight: each output row of W + scale x B A rescaled to the trained magnitude (what peft's
    LoraLayer.merge computes with use_dora; its weight norm is per output row of a Linear)."""
    magnitude = module.lora_magnitude_vector["default"].weight.detach().float()
    return merged * (magnitude / merged.norm(p=2, dim=1)).view(-1, 1)


def _swap_in(folder: Path, write) -> Path:
    """Build `folder` with `write(tmp)` in a temporary folder beside it, then swap it in (never half-written)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
