"""Whose fault a failed job is: the machine's (re-queue it elsewhere) or the job's (fail the build). Pure.

`classify_failure` reads the exception's text (what PyTorch, cuBLAS and NVML put there) and whether
the probe still sees the job's GPU as healthy:

- "oom"   out of memory: the job asked for too much (a config problem; the OOM advice applies);
- "infra" the machine failed: a CUDA error other than out-of-memory or a device-side assert (illegal
          address, launch failure, ECC, unknown error...), cuBLAS/cuDNN execution failures, the GPU
          lost or fallen off the bus, or NVML reporting the job's GPU unhealthy after the failure;
- "lost"  a data-parallel job lost a rank: one of its rank processes died (killed: the kernel's OOM killer,
          an operator) or, for the ranks left, a peer went away (gloo "connection closed by peer", an NCCL
          remote error or collective timeout: a rank or a box of a multi-box job). Re-queued from the last
          checkpoint like "infra", but its GPUs are not marked unhealthy: nothing says they failed;
- "job"   anything else (a bad dataset, a bug in a config value): the build fails as before.

A device-side assert is a CUDA error caused by the job (an index out of range in its data), so it is
the job's. Only the text is read: this module imports no torch.
"""
from __future__ import annotations

from typing import Literal, Optional

from trainer.errors import is_peer_lost

FailureKind = Literal["infra", "oom", "lost", "job"]

INFRA_MARKERS = (
    "illegal memory access", "illegal address", "unspecified launch failure", "launch failure",
    "uncorrectable ecc", "ecc error", "gpu is lost", "fallen off the bus", "gpu requires reset",
    "cuda error: unknown error", "cublas_status_execution_failed", "cudnn_status_execution_failed",
    "cuda driver error", "nvml_error_gpu_is_lost", "device not ready", "hardware stop",
)
OOM_MARKERS = ("out of memory", "can't allocate memory", "outofmemoryerror")
# trainer.training.distributed.RankDied's text; gloo's and NCCL's when a peer rank is gone (trainer.errors).
LOST_RANK_MARKERS = ("a data-parallel rank died", "a data-parallel rank ended without a result")
JOB_CUDA_MARKERS = ("device-side assert",)


def classify_failure(error_text: str, gpu_healthy: Optional[bool] = None) -> FailureKind:
    """Classify a failed job by its error text (type name and message) and the GPU's health after it."""
    text = error_text.lower()
    if any(m in text for m in OOM_MARKERS):
        return "oom"
    if gpu_healthy is False:
        return "infra"
    if any(m in text for m in LOST_RANK_MARKERS) or is_peer_lost(text):
        return "lost"
    if any(m in text for m in JOB_CUDA_MARKERS):
        return "job"
    if any(m in text for m in INFRA_MARKERS) or "cuda error" in text:
        return "infra"
    return "job"
