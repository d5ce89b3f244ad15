"""The dataset lint `agentd validate` / `lora-train validate` print (image mode): the mistakes kohya users
make, found before any GPU time.

Per subset: images, repeats, effective samples per epoch, images per bucket, images without a caption,
tiny images (shorter side < half the resolution: upscaled, blurry), exact duplicates (sha256 of the
file), caption length in tokens against the text encoder's limit (how many get cut), the 20 most frequent
tags (keep_tokens longer than a caption: a scan warning, `trainer.data.images.keep_tokens_warnings`); overall: samples per epoch and the regularization balance.

Errors (training would be wrong; exit 2): the same image in a training and a regularization subset.
(A dataset of only regularization images, missing or unreadable images and bad folders are preflight
errors already.) Everything else is a warning. `lint` reads the images' bytes (hashes) and the tokenizer
files: no torch.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from trainer.data.files import file_sha256

TOP_TAGS = 20


def _tokenizer(cfg):
    """The base model's (first) tokenizer when its files are at hand, else None."""
    for folder in (cfg.base_model, cfg.base_model_config):
        tokenizer = Path(folder) / "tokenizer" if folder is not None else None
        if tokenizer is not None and tokenizer.is_dir():
            # The CLIP classes directly: AutoTokenizer would import torch, and validate must not.
            from transformers import CLIPTokenizer, CLIPTokenizerFast

            cls = CLIPTokenizerFast if (tokenizer / "tokenizer.json").is_file() else CLIPTokenizer
            return cls.from_pretrained(str(tokenizer), local_files_only=True)
    return None


def lint(checked) -> dict | None:
    """The dataset report (see the module docstring) as data; None for text datasets."""
    from trainer.data.images import caption_tags, epoch_items, process_caption

    cfg = checked.config
    samples = checked.scan.samples
    subsets = checked.scan.subsets
    if cfg.mode != "image" or not subsets:
        return None
    tok = _tokenizer(cfg)
    limit = tok.model_max_length - 2 if tok is not None else None  # BOS and EOS take two of the 77
    errors, warnings = [], []
    hashes: dict[str, list] = {}
    for s in samples:
        hashes.setdefault(file_sha256(s.path), []).append(s)
    items = epoch_items(samples)
    per_subset = []
    for n, sub in enumerate(subsets):
        mine = [s for s in samples if s.subset == n]
        name = sub.image_dir.name if sub.field_name == "train_data_dir" else f"{sub.field_name} ({sub.image_dir.name})"
        tags: Counter = Counter()
        token_counts = []
        for s in mine:
            opts = s.captions
            fixed = process_caption(s.caption, opts)
            tags.update(t for part in caption_tags(fixed, opts or _default_opts()) for t in part)
            if tok is not None:
                token_counts.append(len(tok(fixed, add_special_tokens=False).input_ids))
        tiny = [s.path.name for s in mine if s.size and min(s.size) * 2 < cfg.resolution]
        buckets = Counter(f"{s.bucket[0]}x{s.bucket[1]}" for s in mine if s.bucket)
        report = {
            "subset": name, "dir": str(sub.image_dir), "images": len(mine), "repeats": sub.num_repeats,
            "is_reg": sub.is_reg, "samples_per_epoch": sum(1 for i in items if samples[i].subset == n),
            "buckets": dict(sorted(buckets.items())),
            "without_caption": sum(1 for s in mine if s.caption_from == "none"),
            "tiny_images": tiny,
            "duplicates": sorted([s.path.name for s in group] for group in hashes.values()
                                 if len(group) > 1 and any(s.subset == n for s in group)),
            "tokens": None if tok is None else {
                "limit": limit, "max": max(token_counts, default=0),
                "truncated": sum(1 for c in token_counts if c > limit)},
            "top_tags": tags.most_common(TOP_TAGS),
        }
        per_subset.append(report)
        if report["without_caption"]:
            warnings.append(f"{name}: {report['without_caption']} of {len(mine)} images have no caption (no "
                            f"{sub.caption_extension} file, no class tokens): they train unconditioned")
        if tiny:
            warnings.append(f"{name}: {len(tiny)} image(s) have a shorter side under half the resolution "
                            f"({cfg.resolution // 2} px) and are upscaled: {', '.join(tiny[:5])}")
        if report["tokens"] and report["tokens"]["truncated"]:
            warnings.append(f"{name}: {report['tokens']['truncated']} caption(s) are longer than the text encoder's "
                            f"{limit} tokens (longest {report['tokens']['max']}) and are cut")
    for group in hashes.values():
        if len(group) < 2:
            continue
        names = ", ".join(str(s.path) for s in group)
        if len({s.is_reg for s in group}) > 1:
            errors.append(f"the same image is a training and a regularization image: {names} (remove it from "
                          "one of the subsets)")
        else:
            warnings.append(f"exact duplicates (trained {len(group)}x as often): {names}")
    train = sum(1 for i in items if not samples[i].is_reg)
    reg_images = sum(1 for s in samples if s.is_reg)
    regularization = None
    if reg_images:
        pool = sum(s.repeats for s in samples if s.is_reg)
        regularization = {"training_items": train, "reg_images": reg_images, "reg_items": len(items) - train,
                          "prior_loss_weight": cfg.prior_loss_weight,
                          "note": ("each reg image is seen less than once per epoch (the reg pool is cut to the "
                                   "training items)" if pool > train else
                                   "reg images repeat to match the training items" if pool < train else "balanced")}
    return {"samples_per_epoch": len(items), "subsets": per_subset, "regularization": regularization,
            "errors": errors, "warnings": warnings}


def _default_opts():
    from trainer.data.images import CaptionOptions

    return CaptionOptions()


def render(report: dict) -> list[str]:
    """The lint as lines for the console."""
    lines = [f"dataset: {report['samples_per_epoch']} samples per epoch"]
    for s in report["subsets"]:
        tokens = s["tokens"]
        tok = f"; tokens max {tokens['max']}/{tokens['limit']}, {tokens['truncated']} cut" if tokens else ""
        lines.append(f"  {s['subset']}{' [reg]' if s['is_reg'] else ''}: {s['images']} images x {s['repeats']} "
                     f"repeats = {s['samples_per_epoch']} per epoch; {s['without_caption']} without caption; "
                     f"{len(s['tiny_images'])} tiny; {len(s['duplicates'])} duplicate group(s){tok}")
        if s["buckets"]:
            lines.append("    buckets: " + ", ".join(f"{k} ({v})" for k, v in s["buckets"].items()))
        if s["top_tags"]:
            lines.append("    top tags: " + ", ".join(f"{t} ({n})" for t, n in s["top_tags"]))
    reg = report["regularization"]
    if reg:
        lines.append(f"  regularization: {reg['reg_images']} images -> {reg['reg_items']} items per epoch against "
                     f"{reg['training_items']} training items (prior_loss_weight {reg['prior_loss_weight']}): "
                     f"{reg['note']}")
    return lines
