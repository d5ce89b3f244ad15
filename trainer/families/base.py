"""What every model family is (`Family`, the base class of the table's rows) and what the training loop
needs from one job's LoRA (`Task`).

A family module defines a subclass of `Family` and its one instance, `FAMILY`; the table
(`trainer.families.FAMILIES`) lists those instances. The base class holds what families share, so a
family module says only what is its own. Light: no torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

from trainer.errors import Problem
from trainer.families.probe import Probe

if TYPE_CHECKING:
    import torch

    from trainer.config import TrainConfig
    from trainer.data.prompts import SamplePrompt


class Family(ABC):
    """A model family. Attributes (class constants):

        NAME, TITLE, MODE        table key; human name for messages; the data it trains on ("image"|"text")
        LORA_VERSIONS            the `ss_base_model_version` values its LoRA files carry
        LORA_KEY_PREFIXES        key prefixes that mark its LoRA files when they carry no version
        HAS_TEXT_ENCODER         whether `train_text_encoder` means anything for it
        PIPELINE_CLASSES         the diffusers pipeline classes (`model_index.json` `_class_name`) it trains
        ARCHITECTURE_SUFFIXES    the endings of the transformers `architectures` it trains
        DEFAULT_TARGETS, DEFAULT_TE_TARGETS   the LoRA's target modules when the config leaves them out
        OWN_KEYS                 the family-specific config keys it reads: {key: allowed values, or None for
                                 any}. A key some family owns and this one does not is refused when the user
                                 set it (`trainer.families.key_problems`); keys no family lists are common
        KEY_FIXES                {key: fix}: what to use instead of another family's key
        NETWORK_TYPES            the `network.type`s it trains (`trainer.families.network_problems`)
        DORA                     whether it trains `network.dora`
        VRAM_SHAPE_FIELDS        which settings (besides the model) shape its memory
        ACT_FACTOR               activation bytes under mixed precision, as a fraction of fp32
    """

    NAME: str
    TITLE: str
    MODE: str
    LORA_VERSIONS: tuple[str, ...] = ()
    LORA_KEY_PREFIXES: tuple[str, ...] = ()
    HAS_TEXT_ENCODER: bool = False
    PIPELINE_CLASSES: tuple[str, ...] = ()
    ARCHITECTURE_SUFFIXES: tuple[str, ...] = ()
    DEFAULT_TARGETS: list[str]
    DEFAULT_TE_TARGETS: list[str] = []
    OWN_KEYS: dict[str, tuple | None]
    KEY_FIXES: dict[str, str] = {}
    NETWORK_TYPES: tuple[str, ...] = ("lora",)
    DORA: bool = False
    VRAM_SHAPE_FIELDS: tuple[str, ...]
    ACT_FACTOR: float

    @abstractmethod
    def detect(self, p: Probe) -> bool:
        """Is this model (its `Probe`) of this family? Claim only its own models."""

    def defaults(self, p: Probe, cfg: "TrainConfig") -> dict:
        """Config values it fills in when the config leaves them out."""
        return {"target_modules": list(self.DEFAULT_TARGETS)}

    @abstractmethod
    def check(self, cfg: "TrainConfig", p: Probe, describe: Callable[[Probe], str]) -> list[Problem]:
        """Preflight problems, from config files only (no weights, no torch). `describe` names what other
        files are (`trainer.families.describe`), for messages."""

    @abstractmethod
    def config_dir(self, cfg: "TrainConfig") -> Path | None:
        """The folder holding the model's config files (for checks and estimates)."""

    @abstractmethod
    def scan_dataset(self, cfg: "TrainConfig"):
        """Find and check the samples (a `trainer.data.images.Scan`)."""

    @abstractmethod
    def make_dataset(self, cfg: "TrainConfig", samples: list):
        """What `Task.loss` reads samples from."""

    @abstractmethod
    def load_base(self, cfg: "TrainConfig", device, dtype):
        """The frozen base, offline (the daemon may keep it warm)."""

    @abstractmethod
    def make_task(self, cfg: "TrainConfig", base, device) -> "Task":
        """A `Task` on that base, for one job."""

    def lora_claims(self, keys: set[str], metadata: dict[str, str]) -> bool:
        """Is this LoRA file (tensor names, safetensors metadata) for this family?"""
        version = metadata.get("ss_base_model_version")
        if version:
            return self.claims_version(version)
        return any(k.startswith(self.LORA_KEY_PREFIXES) for k in keys)

    def claims_version(self, version: str) -> bool:
        return version in self.LORA_VERSIONS

    @abstractmethod
    def vram_summary(self, model_dir: Path, targets: tuple[str, ...], te_targets: tuple[str, ...]):
        """Parameter counts and activation terms (`trainer.families.memory.ModelSummary`, meta device)."""

    def vram_network_counts(self, model_dir: Path, targets, te_targets, network, rank: int,
                            alpha: float) -> dict[str, int]:
        """{component: parameters} of a network other than plain LoRA; only families whose NETWORK_TYPES or DORA
        allow one are asked (`trainer.families.network_problems` refuses the rest)."""
        raise NotImplementedError(f"{self.TITLE} trains plain LoRA only")

    @abstractmethod
    def vram_per_sample_bytes(self, summary, shape: dict) -> float:
        """Activation bytes of one sample (shape: resolution, max_seq_length, gradient_checkpointing,
        train_text_encoder, act_bytes and the family's VRAM_SHAPE_FIELDS)."""

    @abstractmethod
    def preload(self) -> None:
        """Import what load_base needs (the daemon warms up with it)."""


class Task(Protocol):
    """What the training loop (`trainer.training.job`) needs from one job's LoRA on a frozen base.

    Randomness: every random draw for sample `indices[k]` comes from `generators[k]`, seeded from its global
    sample index (`trainer.data.randomness`), which is what makes a resumed run bit-identical on the CPU and
    W data-parallel ranks equal to one.
    """

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (trainable LoRA weights, fp32), each with its own "lr"."""

    def train(self) -> None:
        """Put the trainable parts in training mode."""

    def prepare(self, dataset: Any, autocast: Callable[[], ContextManager]) -> None:
        """Called once before the first step, after the LoRA state is in place: build caches the config
        asks for (latents with `cache_latents`; frozen text-encoder outputs with `cache_text_embeddings`),
        computing under `autocast` as the loss would. Nothing to do: return."""

    def loss(self, indices: list[int], dataset: Any, generators: list["torch.Generator"],
             autocast: Callable[[], ContextManager]) -> "torch.Tensor":
        """The scalar loss of one micro-batch (the samples at `indices`, one generator each)."""

    def loss_units(self, indices: list[int], dataset: Any) -> int:
        """What `loss` of these samples is a mean over (samples, or predicted tokens): data-parallel ranks
        weigh their share of a micro-batch by it, so W ranks compute the mean one rank would."""

    def lora_state(self) -> dict[str, "torch.Tensor"]:
        """The LoRA as the family's main file format (checkpoints and <name>.safetensors)."""

    def load_lora_state(self, tensors: dict[str, "torch.Tensor"], source: str) -> None:
        """Load what `lora_state` wrote (resume, init_lora_weights); every layer must match."""

    def lora_metadata(self) -> dict[str, str]:
        """Family-specific safetensors metadata (ss_base_model_version, ...)."""

    def eval(self) -> None:
        """Put the trainable parts in evaluation mode (validation and samples; `train` undoes it)."""

    def render_sample(self, prompt: "SamplePrompt", path: Path) -> Path:
        """One sample of the LoRA as trained so far for `prompt` (`trainer.data.prompts.SamplePrompt`: the
        text, negative, size, steps, guidance, seed, sampler), written to `path` plus the family's suffix
        (.png, .txt); returns the file. May raise: the caller turns a failure into a warning."""

    def render_batch(self, prompts: list["SamplePrompt"], paths: list[Path], encoded: dict | None = None) -> list[Path]:
        """Image families: the images `render_sample` renders for each of `prompts` (alike in size, steps,
        guidance and sampler) at `paths`, batched where the family can; `encoded`: a cache of text embeddings
        the caller keeps across calls, used only where they cannot differ between calls (the evaluation)."""

    def adapters_disabled(self) -> ContextManager:
        """Inside the block the model computes as the base without the LoRA (`peft_lora.disabled`), with no
        second load: the evaluation's base arm."""

    def export_extra(self, output_dir: Path) -> list[Path]:
        """Other formats written at the end (a PEFT folder, ...); [] when none."""

    def detach(self) -> None:
        """Remove this job's LoRA and caches, leaving the base as loaded (the warm cache reuses it)."""
