"""Latents and text-encoder outputs cached on disk, across jobs (`cache_latents_to_disk`,
`cache_text_embeddings_to_disk`).

In CI the same dataset is trained again and again; with these keys the next job on the same data never
runs the VAE (or the text encoder) for what an earlier job already encoded.

Keys are content, never names or times, so a changed input is a miss and never a stale hit:
- a latent: sha256 of (the image file's bytes, the VAE's identity, the bucket size, the resized size,
  the crop offset, `PIPELINE`); the entry holds the latent distribution's mean and std (sampled per step
  with the step generator, as without the cache);
- a text embedding: sha256 of (the text encoders' identity, the family's encoding, clip_skip, the caption).
A module's identity is the sha256 of its weights (names, dtypes, shapes, bytes), computed once per loaded
base and remembered on it (the daemon's warm base reuses it).

Layout: `<cache_dir>/latents/<2 hex>/<key>.safetensors` and `<cache_dir>/text/...`, each written to a
temporary name and renamed (a crash never leaves a half-written entry). A hit touches the file, so
`agentd gc` (which removes cache files unused for `retention_days`) keeps what is in use.

`cache_dir`: the config's key, else `$AGENTD_CACHE_DIR`, else the daemon's (systemd's `$CACHE_DIRECTORY`),
else `~/.cache/agentd`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from trainer.config import default_cache_dir
from trainer.data.files import file_sha256

# Bump when the pixels fed to the VAE change for the same inputs (resampling filter, value range): every
# old latent becomes a miss.
PIPELINE = "rgb-bicubic-center-v1"


def cache_root(cfg) -> Path:
    """Where the disk caches live: the config's `cache_dir`, else `trainer.config.default_cache_dir()`."""
    return Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()


def module_identity(module: torch.nn.Module) -> str:
    """sha256 of a frozen module's weights, remembered on the module (weights never change in place)."""
    known = module.__dict__.get("_agentd_identity")
    if known:
        return known
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    module.__dict__["_agentd_identity"] = h.hexdigest()
    return module.__dict__["_agentd_identity"]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class _DiskCache:
    """Content-keyed safetensors entries under one folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError, ValueError):
            self.misses += 1
            return None  # absent, or unreadable (a torn disk): encode again and overwrite
        try:
            os.utime(path)  # in use: agentd gc keeps it
        except OSError:
            pass
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)


class LatentDiskCache(_DiskCache):
    """Latent distributions (mean, std) of dataset images for one VAE."""

    def __init__(self, root: Path, vae: torch.nn.Module):
        super().__init__(root / "latents")
        self.vae_id = module_identity(vae)

    def key(self, dataset, index: int) -> str:
        s = dataset.samples[index]
        original, crop, target = dataset.fixed_geometry(index)
        return _key("latent", PIPELINE, file_sha256(s.path), self.vae_id, original, crop, target,
                    dataset.resized_size(index))


def batch_latents(cached: dict[int, tuple], indices: list[int], dataset, generators: list,
                  vae: torch.nn.Module, device, masked_loss: bool):
    """The latent distributions (mean, std, on the CPU) of a micro-batch: from `cached` ({index: (mean, std,
    ...)}, from `encode_latents`) when it holds them, else encoded now from the loaded items (crops and flips
    sample k's drawn from generators[k]). Returns (mean, std, the loaded items or None when cached, the masks or None
    without masked_loss); cached latents are center crops, so are their masks."""
    if cached:
        mean = torch.stack([cached[i][0] for i in indices])
        std = torch.stack([cached[i][1] for i in indices])
        return mean, std, None, [dataset.center_mask(i) for i in indices] if masked_loss else None
    items = [dataset.load_item(i, g) for i, g in zip(indices, generators)]
    pixels = torch.stack([it.pixels for it in items]).to(device)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    return dist.mean.cpu(), dist.std.cpu(), items, [it.mask for it in items] if masked_loss else None


def encode_latents(cfg, vae: torch.nn.Module, dataset, device) -> tuple[dict[int, tuple], int]:
    """The latent distribution (mean, std, on the CPU) of every dataset image, each encoded once with `vae`;
    with `cache_latents_to_disk` through the disk cache, so a later job on the same data skips the VAE.
    Returns ({index: (mean, std)}, how many came from disk)."""
    disk = LatentDiskCache(cache_root(cfg), vae) if cfg.cache_latents_to_disk else None
    latents = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            key = disk.key(dataset, i) if disk else None
            hit = disk.get(key) if disk else None
            if hit is None:
                pixels = dataset.load_item(i).pixels
                dist = vae.encode(pixels[None].to(device, torch.float32)).latent_dist
                hit = {"mean": dist.mean[0].cpu(), "std": dist.std[0].cpu()}
                if disk:
                    disk.put(key, hit)
            latents[i] = (hit["mean"], hit["std"])
    return latents, disk.hits if disk else 0


class TextDiskCache(_DiskCache):
    """Text-encoder outputs per caption for one set of encoders and one way of encoding."""

    def __init__(self, root: Path, encoders: list[torch.nn.Module], encoding: str):
        super().__init__(root / "text")
        self.identity = [module_identity(m) for m in encoders] + [encoding]

    def key(self, caption: str) -> str:
        return _key("text", self.identity, caption)
