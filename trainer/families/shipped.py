"""The shipped architecture configs (`trainer/families/model_configs/<name>/`) and the CLIP tokenizer built offline.

A single-file SD/SDXL checkpoint holds weights only. diffusers' `from_single_file` needs a diffusers-format
folder (model_index.json, component configs, tokenizer files) or it downloads one from the hub. We ship
the configs (small JSON of public hyperparameters) and build the tokenizer files from CLIP's BPE
vocabulary as the open_clip package ships it (`bpe_simple_vocab_16e6.txt.gz`, installed by `make setup`
with `--no-deps`: only that file is read; open_clip itself is never imported). `materialize(name)` writes
the complete folder once into the cache (`trainer.config.default_cache_dir()/model-configs/`), atomically.

The vocabulary is the one OpenAI's CLIP tokenizer builds: the 256 byte symbols, the same with `</w>`,
one token per merge (the file's lines 1 .. 48894), then `<|startoftext|>` and `<|endoftext|>` — 49408
entries, the ids of every CLIP tokenizer on the hub (SD1.x's CLIP-L, SD2's OpenCLIP-H, SDXL's two).
Light: no torch.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

from trainer.config import default_cache_dir

ROOT = Path(__file__).resolve().parent / "model_configs"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2
TOKENIZER_FIX = (f"install open_clip_torch, which ships CLIP's vocabulary ({BPE_FILE}): "
                 "`.venv/bin/pip install --no-deps open_clip_torch==3.3.0` (make setup does it); or set "
                 "base_model_config to a diffusers folder of this architecture that holds tokenizer/vocab.json "
                 "and tokenizer/merges.txt (SDXL: also tokenizer_2/)")


def shipped_dir(name: str) -> Path:
    return ROOT / name


def clip_bpe_path() -> Path | None:
    """open_clip's BPE vocabulary file, found without importing open_clip (it imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_vocabulary(bpe_path: str) -> tuple[dict[str, int], list[str]]:
    """(vocab.json mapping, merges.txt lines) of the CLIP tokenizer, from the BPE file."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:CLIP_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: Path, bpe_path: Path) -> None:
    vocab, merges = clip_vocabulary(str(bpe_path))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tokenizer_problem(name: str) -> str | None:
    """Why `materialize(name)` cannot build the tokenizer files (None: it can)."""
    needs_tokenizer = any(p.name.startswith("tokenizer") for p in shipped_dir(name).iterdir())
    if needs_tokenizer and clip_bpe_path() is None:
        return f"the CLIP tokenizer for the shipped {name} config cannot be built offline: {BPE_FILE} not found"
    return None


def materialize(name: str, cache: Path | None = None) -> Path:
    """The complete diffusers-format config folder for shipped config `name` (JSON + tokenizer files),
    built once under the cache folder. Raises FileNotFoundError with the fix when the vocabulary is missing."""
    src = shipped_dir(name)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    digest = hashlib.sha256(b"".join(p.relative_to(src).as_posix().encode() + p.read_bytes() for p in files))
    out = Path(cache or default_cache_dir()) / "model-configs" / f"{name}-{digest.hexdigest()[:12]}"
    if out.is_dir():
        return out
    problem = tokenizer_problem(name)
    if problem:
        raise FileNotFoundError(f"{problem}; {TOKENIZER_FIX}")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for tok in tmp.glob("tokenizer*"):
        write_clip_tokenizer_files(tok, clip_bpe_path())
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
