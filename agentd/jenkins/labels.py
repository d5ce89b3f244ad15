"""Jenkins labels and node description derived from the GPUs this box has. Pure functions only.

Labels (all lower case, sorted, de-duplicated, no spaces, so each one is a Jenkins label atom):

``gpu`` or ``cpu-only``
    whether the box has any GPU.
``gpu:<slug>``
    one per GPU model. The slug rule (:func:`model_slug`): lower-case the marketing name, drop vendor and
    brand words (NVIDIA, GeForce, Tesla, Quadro, AMD, Radeon, Instinct, Intel, "Generation"), glue a
    letters-only word to a following word that starts with a digit (``RTX 3090`` -> ``rtx3090``), join the
    remaining words with ``-`` and keep only ``[a-z0-9.-]``. Examples: ``NVIDIA GeForce RTX 3090`` ->
    ``rtx3090``, ``NVIDIA H200`` -> ``h200``, ``NVIDIA A100-SXM4-80GB`` -> ``a100-sxm4-80gb``,
    ``NVIDIA GeForce GTX 1080 Ti`` -> ``gtx1080-ti``, ``Tesla T4`` -> ``t4``.
``vram:<N>g``
    one per distinct memory size, in the marketed GiB (:func:`vram_gib`): drivers report less than the
    nominal size (ECC, reserved memory), so a measurement within 12% below a common capacity is snapped up
    to it (24576 MiB -> 24g, 81559 MiB -> 80g, an A10's 23028 MiB -> 24g, an H200's 143771 MiB -> 141g);
    anything else is rounded to the nearest GiB.
``cuda:<major.minor>``
    the CUDA version the driver supports, when the probe knows it.

Extra labels from the settings are added as given (they are validated with :func:`is_valid_label`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Optional, Protocol, Sequence


class GpuFactsLike(Protocol):
    """What the labels need from a GPU probe result (trainer.gpus provides objects with these attributes)."""

    name: Optional[str]
    memory_total_mib: Optional[int]
    cuda_version: Optional[str]


_LABEL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+/-]*$")

# Vendor and brand words that add nothing to tell models apart.
_DROP_WORDS = frozenset({"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel",
                         "generation", "(r)", "(tm)"})

# Common nominal capacities in GiB, ascending (see vram_gib).
_NOMINAL_GIB = (1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 180, 192,
                256, 288)
_SNAP_TOLERANCE = 0.88


def is_valid_label(label: str) -> bool:
    """True for a label that Jenkins reads as a single atom without quoting (no spaces or operators)."""
    return bool(_LABEL_RE.match(label))


def model_slug(name: Optional[str]) -> str:
    """The ``gpu:<slug>`` part for a GPU marketing name (``unknown`` when the probe has no name)."""
    text = (name or "").lower().replace("(r)", " ").replace("(tm)", " ")
    words = [w for w in re.sub(r"[^a-z0-9.\-]+", " ", text).split() if w not in _DROP_WORDS]
    glued: list[str] = []
    for word in words:
        if glued and glued[-1].isalpha() and word[0].isdigit():
            glued[-1] += word
        else:
            glued.append(word)
    slug = re.sub(r"-{2,}", "-", "-".join(glued)).strip("-.")
    return slug or "unknown"


def vram_gib(memory_total_mib: int) -> int:
    """The nominal memory size in GiB for a reported total (rule in the module docstring)."""
    gib = memory_total_mib / 1024
    for size in _NOMINAL_GIB:
        if size >= gib:
            if gib >= size * _SNAP_TOLERANCE:
                return size
            break
    return max(1, round(gib))


def cuda_major_minor(version: Optional[str]) -> Optional[str]:
    """``'12.4.1'`` -> ``'12.4'``; ``'12'`` -> ``'12.0'``; None or unparsable -> None."""
    if not version:
        return None
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?", str(version))
    if not match:
        return None
    return f"{match.group(1)}.{match.group(2) or 0}"


def derive_labels(gpus: Sequence[GpuFactsLike], extra: Iterable[str] = ()) -> list[str]:
    """All labels for a box with these GPUs plus ``extra``; sorted and de-duplicated.

    Raises ValueError for an extra label that is not a valid atom (settings validate them earlier).
    """
    labels: set[str] = set()
    for label in extra:
        if not is_valid_label(label):
            raise ValueError(f"invalid Jenkins label {label!r}")
        labels.add(label)
    labels.add("gpu" if gpus else "cpu-only")
    for gpu in gpus:
        labels.add(f"gpu:{model_slug(gpu.name)}")
        if gpu.memory_total_mib:
            labels.add(f"vram:{vram_gib(gpu.memory_total_mib)}g")
        cuda = cuda_major_minor(gpu.cuda_version)
        if cuda:
            labels.add(f"cuda:{cuda}")
    return sorted(labels)


def node_description(gpus: Sequence[GpuFactsLike], version: Optional[str] = None,
                     slots: Optional[int] = None) -> str:
    """A one-line node description: ``agentd 0.1.0: 2x NVIDIA GeForce RTX 3090 (24 GiB), CUDA 12.4; 2 slots``.

    Only stable facts go in (no memory in use), so the description changes only when the hardware,
    the driver or agentd changes, and the node is not reconfigured for nothing.
    """
    head = f"agentd {version}" if version else "agentd"
    if gpus:
        models: Counter[tuple[str, Optional[int]]] = Counter(
            (gpu.name or "unknown GPU", vram_gib(gpu.memory_total_mib) if gpu.memory_total_mib else None)
            for gpu in gpus)
        parts = []
        for (name, gib), count in sorted(models.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
            size = f" ({gib} GiB)" if gib else ""
            parts.append(f"{count}x {name}{size}" if count > 1 else f"{name}{size}")
        body = ", ".join(parts)
        cudas = sorted({c for c in (cuda_major_minor(g.cuda_version) for g in gpus) if c})
        if cudas:
            body += ", CUDA " + "/".join(cudas)
    else:
        body = "no GPU (cpu-only)"
    tail = f"; {slots} slot{'s' if slots != 1 else ''}" if slots is not None else ""
    return f"{head}: {body}{tail}"
