"""Image metrics from local transformers folders (nothing is downloaded; `local_files_only` everywhere).

    clip_t     prompt adherence: 100 x cos(CLIP image embedding, CLIP text embedding), the scale of
               torchmetrics' CLIPScore (a real CLIP ViT-L/14 gives ~20-35 for matching pairs) without its
               floor at 0, so that a drop below 0 still counts in a paired difference
    clip_i     mean cosine (-1..1) of the image's CLIP image embedding with each reference image's
    dino       the same with a ViT/DINOv2 CLS embedding (DreamBooth's subject fidelity measure)
    aesthetic  a LAION-style MLP head (its Linear layers in order, as LAION's predictors have no
               activations) on the L2-normalised CLIP image embedding

An image identical to the only reference scores clip_i = dino = 1.0. Scores are per image, in the order
the images are given (the caller keeps prompts x seeds in one order for every arm).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CLIP_TYPES = ("clip",)
DINO_TYPES = ("vit", "dinov2")


def folder_kind(path: Path) -> str:
    """What a model folder holds, from its config.json (its architecture, else its model_type), without
    loading it: e.g. "CLIPModel", "Dinov2Model"; "" when it is not a transformers folder."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return ", ".join(cfg.get("architectures") or []) or str(cfg.get("model_type", ""))


def model_type(path: Path) -> str:
    try:
        return str(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError):
        return ""


@dataclass
class ImageScorer:
    """The metric models of one evaluation, loaded once and used for every arm."""

    clip_model: Path | None = None
    dino_model: Path | None = None
    aesthetic_head: Path | None = None
    references: list = field(default_factory=list)  # PIL images of reference_dir
    device: str = "cpu"

    def __post_init__(self):
        import torch
        from transformers import (AutoImageProcessor, AutoModel, AutoTokenizer, CLIPImageProcessor, CLIPModel)

        self._torch = torch
        self.clip = self.clip_proc = self.clip_tok = self.dino = self.dino_proc = self.head = None
        if self.clip_model:
            self.clip = CLIPModel.from_pretrained(self.clip_model, local_files_only=True).to(self.device).eval()
            self.clip_proc = CLIPImageProcessor.from_pretrained(self.clip_model, local_files_only=True)
            self.clip_tok = AutoTokenizer.from_pretrained(self.clip_model, local_files_only=True)
        if self.dino_model:
            self.dino = AutoModel.from_pretrained(self.dino_model, local_files_only=True).to(self.device).eval()
            self.dino_proc = AutoImageProcessor.from_pretrained(self.dino_model, local_files_only=True)
        if self.aesthetic_head:
            self.head = load_aesthetic_head(self.aesthetic_head)
        self._ref_clip = self._clip_images(self.references) if self.clip is not None and self.references else None
        self._ref_dino = self._dino_images(self.references) if self.dino is not None and self.references else None

    @property
    def metrics(self) -> list[str]:
        out = ["clip_t"] if self.clip is not None else []
        out += ["clip_i"] if self._ref_clip is not None else []
        out += ["dino"] if self._ref_dino is not None else []
        out += ["aesthetic"] if self.head is not None and self.clip is not None else []
        return out

    def score(self, images: list, prompts: list[str]) -> dict[str, list[float]]:
        """Every metric for each image (`prompts[i]` is the text image i was made from)."""
        torch = self._torch
        out: dict[str, list[float]] = {}
        with torch.no_grad():
            if self.clip is not None:
                img = self._clip_images(images)
                text = self._clip_texts(prompts)
                out["clip_t"] = [float(v) for v in 100 * (img * text).sum(-1)]
                if self._ref_clip is not None:
                    out["clip_i"] = [float(v) for v in (img @ self._ref_clip.T).mean(-1)]
                if self.head is not None:
                    out["aesthetic"] = [float(v) for v in self.head(img).reshape(-1)]
            if self._ref_dino is not None:
                out["dino"] = [float(v) for v in (self._dino_images(images) @ self._ref_dino.T).mean(-1)]
        return out

    # --- embeddings, L2-normalised ---------------------------------------------------------------
    def _clip_images(self, images):
        pixels = self.clip_proc(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        with self._torch.no_grad():
            emb = self.clip.get_image_features(pixel_values=pixels.to(self.device))
        return _unit(_tensor(emb))

    def _clip_texts(self, texts):
        tok = self.clip_tok(texts, padding=True, truncation=True, max_length=self.clip.config.text_config
                            .max_position_embeddings, return_tensors="pt").to(self.device)
        with self._torch.no_grad():
            emb = self.clip.get_text_features(**tok)
        return _unit(_tensor(emb))

    def _dino_images(self, images):
        pixels = self.dino_proc(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        with self._torch.no_grad():
            hidden = self.dino(pixel_values=pixels.to(self.device)).last_hidden_state
        return _unit(hidden[:, 0])  # the CLS token


def _tensor(out):
    """transformers 5 returns a model output (pooler_output) where 4.x returned the tensor."""
    return out if hasattr(out, "norm") else out.pooler_output


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def load_aesthetic_head(path: Path):
    """A LAION-style aesthetic predictor: its Linear layers (`weight`/`bias` pairs, in key order) chained."""
    import torch

    state = read_state(path)
    names = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith("weight")},
                   key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    layers = []
    for n in names:
        prefix = f"{n}." if n != "weight" else ""
        w = state[f"{prefix}weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"{prefix}bias" in state)
        lin.weight.data.copy_(w)
        if lin.bias is not None:
            lin.bias.data.copy_(state[f"{prefix}bias"])
        layers.append(lin)
    return torch.nn.Sequential(*layers).eval()


def read_state(path: Path) -> dict:
    """A head's tensors: safetensors, or a torch state dict loaded without unpickling objects."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def head_input_size(path: Path) -> int | None:
    """The embedding size the head's first layer takes (checked against the CLIP model's projection)."""
    state = read_state(path)
    weights = sorted((k for k in state if k.endswith("weight")),
                     key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    return int(state[weights[0]].shape[1]) if weights else None
