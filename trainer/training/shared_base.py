"""The daemon's warm base, shared with a job's data-parallel ranks through shared memory (issue 23).

Why: a W-device job on a warm daemon should not read the model from disk W times. The launcher
(`trainer.api.run_job`) takes the base from the daemon's cache in host memory (`shared_from_cache`: loading it
there once if it is missing, so the next job finds it), `pack`s it, and hands it to the ranks with their
arguments; each rank rebuilds it (`SharedBase.unpack`) and moves it to its device: a GPU rank copies host->GPU,
a CPU rank computes on the shared tensors as they are (the base is frozen).

How (`pack`): every tensor the base holds (parameters, buffers, and tensors of plain attributes: a noise
scheduler's tables, Flux's text encoders) goes into ONE flat shared-memory buffer per dtype, and the base's own
tensors are re-pointed at their places in it (`tensor.data = view`: the same Parameter objects, now backed by
shared memory), so the daemon holds one copy and its next W-device job finds the base packed already (no copy).
The structure (modules, configs, tokenizers) is pickled once with each tensor replaced by its place
(`persistent_id`): torch.multiprocessing shares a storage through one file descriptor, so a real SDXL's ~2,500
tensors travel as 2 or 3 descriptors and one pickle, not 2,500 descriptors.

A rank never writes into the shared base (the daemon's next job trains on it): LoRA layers wrap the frozen
layers, dtype and device changes (`module.to`) replace a tensor instead of writing into it, and a merged export
is computed out of place. tests/test_distributed.py checks the daemon's base is unchanged after a W=2 job.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

log = logging.getLogger(__name__)

# A CPU kernel's float sums depend on its operands' addresses modulo the vector width (vectorized loops peel an
# unaligned head): each copy keeps its original's address modulo this, so a CPU rank computes bit for bit what the
# cached base (and a rank that loaded it from disk) does. Measured: 64-aligned copies of the tiny SD's weights,
# which the loader leaves at 8 or 56 mod 64, trained a LoRA 1e-6 away from the cold run's.
ALIGN_BYTES = 64
SHM = "/dev/shm"  # where torch's shared storages live (shm_open); a container's default is only 64 MiB

# Where one tensor lies: (dtype name, offset in elements, shape, stride, is a Parameter, requires_grad).
Place = tuple[str, int, tuple[int, ...], tuple[int, ...], bool, bool]


@dataclass
class SharedBase:
    """A packed base: what the ranks receive (buffers travel as shared storages, the rest as bytes)."""

    buffers: dict[str, torch.Tensor]  # dtype name -> one flat 1-D tensor in shared memory
    places: list[Place]  # per tensor of the structure, by its persistent id
    structure: bytes  # the base pickled without its tensors
    cache: str | None = None  # how the launcher had the base from its cache: cold | host | device

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def unpack(self):
        """The base, its tensors views into the shared buffers (a tensor held twice is one object again)."""
        built: dict[int, torch.Tensor] = {}

        def persistent_load(pid: int) -> torch.Tensor:
            if pid not in built:
                dtype, offset, shape, stride, is_param, requires_grad = self.places[pid]
                view = self.buffers[dtype].as_strided(shape, stride, offset)
                built[pid] = torch.nn.Parameter(view, requires_grad=requires_grad) if is_param else view
            return built[pid]

        unpickler = pickle.Unpickler(io.BytesIO(self.structure))
        unpickler.persistent_load = persistent_load
        return unpickler.load()


def pack(base) -> SharedBase:
    """`base` in flat shared buffers (see the module docstring), its own tensors re-pointed into them.
    Raises TypeError for a tensor it cannot share (on a GPU, or a subclass such as a bitsandbytes weight)."""
    tensors: list[torch.Tensor] = []
    ids: dict[int, int] = {}

    class Collect(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, torch.Tensor):
                return None
            if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.device.type != "cpu":
                raise TypeError(f"cannot share a {type(obj).__name__} on {obj.device} through host memory")
            if id(obj) not in ids:
                ids[id(obj)] = len(tensors)
                tensors.append(obj)
            return ids[id(obj)]

    out = io.BytesIO()
    Collect(out, protocol=pickle.HIGHEST_PROTOCOL).dump(base)
    places: list[Place | None] = [None] * len(tensors)
    buffers = {}
    for dtype in {t.dtype for t in tensors}:
        members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = _packed(dtype, [tensors[i] for i in members])
        buffers[str(dtype)] = flat if flat is not None else _pack_dtype(dtype, [tensors[i] for i in members])
        for i in members:
            t = tensors[i]
            places[i] = (str(dtype), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                         isinstance(t, torch.nn.Parameter), t.requires_grad)
    return SharedBase(buffers, places, out.getvalue())


def _packed(dtype: torch.dtype, members: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat buffer these tensors already lie in (packed by an earlier job, not moved since), or None."""
    storage = members[0].untyped_storage()
    if not members[0].is_shared() or any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in members):
        return None
    return _flat(storage, dtype)


def _pack_dtype(dtype: torch.dtype, members: list[torch.Tensor]) -> torch.Tensor:
    """A new shared buffer holding `members` (same dtype), each at its address modulo ALIGN_BYTES (the buffer
    starts on a page); each member re-pointed into it."""
    size = torch.empty(0, dtype=dtype).element_size()
    offsets, total = [], 0
    for t in members:
        total += ((t.data_ptr() - total * size) % ALIGN_BYTES) // size
        offsets.append(total)
        total += t.numel()
    flat = _flat(torch.UntypedStorage._new_shared(max(total, 1) * size), dtype)  # torch.multiprocessing's allocator
    for t, offset in zip(members, offsets):
        # Dense tensors keep their strides (a UNet offloaded from a GPU is channels-last); others become contiguous.
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        view = flat.as_strided(t.shape, t.stride() if dense else t.contiguous().stride(), offset)
        view.copy_(t)
        t.data = view  # the same tensor object, its memory now the shared buffer's
    return flat


def _flat(storage: torch.UntypedStorage, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(storage, 0, (storage.nbytes() // size,), (1,))


@contextmanager
def shared_from_cache(checked, cache, device_type: str) -> Iterator[SharedBase | None]:
    """The base of `checked`'s job from the daemon's `cache`, packed for ranks on `device_type` devices, in use
    (cache.get/release) while the block runs; None (each rank loads it from disk) without a cache, for a base
    the cache cannot hold (bitsandbytes QLoRA), or when /dev/shm has no room for it (a container's default)."""
    from trainer import families
    from trainer.training.job import base_key, cacheable, weight_dtype

    cfg = checked.config
    if cache is None or not cacheable(cfg):
        yield None
        return
    dtype = weight_dtype(cfg.mixed_precision, device_type)
    key = base_key(cfg, dtype)
    fam = families.family(cfg.model_family)
    base, how, _ = cache.get(key, lambda: fam.load_base(cfg, torch.device("cpu"), dtype), "cpu")
    try:
        yield _pack_or_none(base, how)
    finally:
        cache.release(key)


def _pack_or_none(base, how: str) -> SharedBase | None:
    from trainer.training.model_cache import tensor_bytes

    need = tensor_bytes(base)
    st = os.statvfs(SHM)
    if need > st.f_bavail * st.f_frsize and not _is_packed(base):
        log.warning("%s has %d MiB free, the base needs %d MiB: each rank loads the base from disk (raise the "
                    "container's --shm-size)", SHM, st.f_bavail * st.f_frsize // 2**20, need // 2**20)
        return None
    try:
        shared = pack(base)
    except (TypeError, pickle.PicklingError, AttributeError) as e:  # a base whose structure does not pickle
        log.warning("the base cannot be shared with the ranks (%s): each rank loads it from disk", e)
        return None
    shared.cache = how
    return shared


def _is_packed(base) -> bool:
    from trainer.training.model_cache import modules_of

    return all(t.is_shared() for m in modules_of(base) for t in [*m.parameters(), *m.buffers()])
