"""What a base model's files say about its architecture, read cheaply (no weights, no torch).

`probe(path)` looks at:
- a folder: `model_index.json` (`_class_name`, the diffusers pipeline) and the UNet's `in_channels`, or
  `config.json` (`architectures`, a transformers model);
- a single file: the tensor names (and, for safetensors, shapes) from its header. A `.safetensors`
  header is JSON; a `.ckpt` is a torch zip whose pickle is scanned for strings with `pickletools`
  (never executed), so detection reads no weights and imports no torch.

Family modules decide from the `Probe` whether a model is theirs (`detect`); this module only reads (the
names it may quote in messages come from the families' table: `trainer.families.describe`).
"""
from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

from trainer.errors import DescribedError, content_free

SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt"}
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Probe:
    """The architecture facts of one model path. `kind`: folder | file | missing | unreadable."""

    path: Path
    kind: str
    class_name: str | None = None          # model_index.json _class_name
    architectures: tuple[str, ...] = ()    # config.json architectures
    unet_in_channels: int | None = None    # from unet/config.json or the first conv's shape
    keys: frozenset[str] = field(default_factory=frozenset)  # single file: tensor names
    shapes: dict = field(default_factory=dict, compare=False, hash=False)  # safetensors: name -> shape
    error: str | None = None

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    def describe(self, pipeline_classes: Collection[str], architecture_suffixes: tuple[str, ...]) -> str:
        """What the files say, for error messages: by kind and count, quoting a name only when it is one
        agentd knows (one of the families' `pipeline_classes`, a known key prefix; the table passes its
        names: `trainer.families.describe`), never a string read from the files (the daemon reads them for a
        submitter; they can open their own files)."""
        if self.kind == "folder":
            if self.class_name:
                extra = f", UNet with {self.unet_in_channels} input channels" if self.unet_in_channels else ""
                known = self.class_name in pipeline_classes
                name = self.class_name if known else "a pipeline class agentd does not train"
                return f"a diffusers folder (model_index.json _class_name: {name}){extra}"
            if self.architectures:
                lm = sum(a.endswith(architecture_suffixes) for a in self.architectures)
                count = f"{len(self.architectures)} entr{'y' if len(self.architectures) == 1 else 'ies'}"
                return (f"a transformers folder (config.json architectures: {count}, "
                        + (f"{lm} a causal LM)" if lm else
                           f"none a causal LM ending in {' or '.join(architecture_suffixes)})"))
            return "a folder with neither model_index.json nor config.json"
        if self.kind == "file":
            found = [p for p in KNOWN_KEY_PREFIXES if self.has_prefix(p)]
            return (f"a single-file checkpoint with {len(self.keys)} tensors, " +
                    (f"keys under {', '.join(found)}" if found else
                     f"none under a key prefix agentd knows ({', '.join(KNOWN_KEY_PREFIXES[:4])}, ...)"))
        return self.error or self.kind


# The top-level tensor-name prefixes of the single-file layouts agentd knows (LDM/SGM checkpoints, Flux,
# kohya LoRAs, diffusers-style files): named in messages, since they are agentd's, not the file's.
KNOWN_KEY_PREFIXES = ("model.diffusion_model.", "double_blocks.", "single_blocks.", "first_stage_model.",
                      "cond_stage_model.", "conditioner.", "lora_unet_", "lora_te", "transformer.", "unet.",
                      "text_encoder.", "vae.")


def probe(path: Path) -> Probe:
    path = Path(path)
    if not path.exists():
        return Probe(path, "missing", error="does not exist")
    if path.is_dir():
        return _probe_folder(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        return Probe(path, "unreadable", error="is not a model checkpoint (.safetensors or .ckpt)")
    try:
        if path.suffix.lower() == ".safetensors":
            shapes = _safetensors_shapes(path)
            keys = frozenset(shapes)
        else:
            shapes, keys = {}, _ckpt_keys(path)
    except (OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        return Probe(path, "unreadable", error=f"is not a model checkpoint ({content_free(e)})")
    in_conv = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    return Probe(path, "file", keys=keys, shapes=shapes,
                 unet_in_channels=int(in_conv[1]) if in_conv and len(in_conv) == 4 else None)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _probe_folder(path: Path) -> Probe:
    index = _read_json(path / "model_index.json")
    if index is not None:
        unet = _read_json(path / "unet" / "config.json") or {}
        transformer = _read_json(path / "transformer" / "config.json") or {}
        channels = unet.get("in_channels", transformer.get("in_channels"))
        return Probe(path, "folder", class_name=str(index.get("_class_name") or ""),
                     unet_in_channels=int(channels) if isinstance(channels, int) else None)
    config = _read_json(path / "config.json")
    if config is not None:
        return Probe(path, "folder", architectures=tuple(config.get("architectures") or ()))
    return Probe(path, "folder")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    return safetensors_header(path)[0]


def safetensors_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, the `__metadata__` strings) of a .safetensors file, from its JSON header."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DescribedError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > MAX_HEADER_BYTES:
            raise DescribedError("no safetensors header")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise DescribedError("safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    return ({k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)},
            {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {})


def _ckpt_keys(path: Path) -> frozenset[str]:
    """Strings in a torch checkpoint's pickle that look like tensor names (dotted), without unpickling."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise DescribedError("torch zip without data.pkl")
            data = z.read(name)
    else:
        data = path.read_bytes()
        if data[:1] != b"\x80":
            raise DescribedError("not a pickle")
    keys = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "." in arg and " " not in arg and op.name.endswith("UNICODE"):
                keys.add(arg)
    except ValueError:  # pickletools names the opcode bytes it stopped at
        raise DescribedError("its pickle cannot be parsed") from None
    return frozenset(keys)
