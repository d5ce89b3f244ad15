"""Which devices one job trains on, and each rank's share of the batch: pure decisions, no torch.

A config's `devices:` (a count, a list of GPU indices or UUIDs, or `all`) becomes a `WorldPlan`: one
torch device per rank and each rank's micro-batch. `batch_size` is the micro-batch over all ranks (the
same config on 1 or W devices trains the same model: W ranks each take batch_size / W of every
micro-batch, and `gradient_accumulation_steps` multiplies as on one device); `batch_size_per_device` is the
explicit alternative where the batch grows with W. Data parallel replicates the frozen base on every device:
a base that does not fit one GPU does not fit W of them either (sharding a base over GPUs is not offered).

On a box without GPUs `devices: N` means N CPU ranks over gloo, bounded by the CPU slots the caller has
(the daemon's `cpu_slots`, or the machine's cores in the foreground).

One job over several boxes (`Rendezvous`, `agentd run --nodes N --node-rank K --rdzv-endpoint HOST:PORT`):
`devices:` is what each box contributes, the world is N x that, and the batch splits over the whole world, so
2 boxes x 1 device train what 1 box x 2 devices does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainer.errors import Problem
from trainer.gpus import GpuFacts, NoSuchDevice, gpu_list, match_device


RDZV_TIMEOUT_ENV = "AGENTD_RDZV_TIMEOUT_S"
RDZV_TIMEOUT_DEFAULT_S = 600.0


def rendezvous_timeout_s() -> float:
    """How long the ranks wait for each other at the rendezvous ($AGENTD_RDZV_TIMEOUT_S, default 600 s): every box's
    part must start within it (each daemon's queue is its own), and a box that never joins fails the others then."""
    return float(os.environ.get(RDZV_TIMEOUT_ENV) or RDZV_TIMEOUT_DEFAULT_S)


@dataclass(frozen=True)
class Rendezvous:
    """Where a job's ranks meet: this box is node `node_rank` of `nodes`, and every rank of every box connects to
    the c10d TCP store at `host:port`, which global rank 0 (node 0's first rank) serves. One box alone: a free port
    on 127.0.0.1 and nodes 1. `timeout_s`: how long the ranks wait there (`rendezvous_timeout_s`, read when made)."""

    nodes: int
    node_rank: int
    host: str
    port: int
    timeout_s: float = field(default_factory=rendezvous_timeout_s)

    @classmethod
    def parse(cls, nodes, node_rank, endpoint) -> "Rendezvous":
        """The rendezvous a submitter asked for (`--nodes N --node-rank K --rdzv-endpoint HOST:PORT`); raises
        ValueError saying what is wrong and the fix."""
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
            raise ValueError(f"--nodes must be 2 or more (the boxes the job spans), not {nodes!r}")
        if isinstance(node_rank, bool) or not isinstance(node_rank, int) or not 0 <= node_rank < nodes:
            raise ValueError(f"--node-rank must be 0 to {nodes - 1} (this box's place among {nodes} nodes; node 0 "
                             f"serves the rendezvous and writes the outputs), not {node_rank!r}")
        host, sep, port = str(endpoint or "").rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:29500
        if not sep or not host or any(c.isspace() for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--rdzv-endpoint must be HOST:PORT (node 0's address and a free TCP port every box "
                             f"can reach, e.g. box1.example.com:29500), not {endpoint!r}")
        return cls(nodes, node_rank, host, int(port))

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def request(self) -> dict:
        """The submit request's fields (and the journal's record) for this rendezvous."""
        return {"nodes": self.nodes, "node_rank": self.node_rank, "rdzv_endpoint": self.endpoint}

    def part(self, local_ranks: int) -> str:
        """This box's part of the job as status shows it: "node 2 of 2, ranks 1-1 of 2"."""
        first = self.node_rank * local_ranks
        return (f"node {self.node_rank + 1} of {self.nodes}, ranks {first}-{first + local_ranks - 1} of "
                f"{self.nodes * local_ranks}")


def add_rendezvous_args(parser) -> None:
    """`--nodes N --node-rank K --rdzv-endpoint HOST:PORT` on a command that runs one job over several boxes
    (`agentd run`, `lora-train`); `rendezvous_from_args` reads them."""
    parser.add_argument("--nodes", type=int, default=None,
                        help="one job over N boxes: how many (each runs this command with its own --node-rank)")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this box's place among the --nodes boxes, 0 .. N-1 (0: rank 0, which writes the outputs)")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="where every box's ranks meet: the first box's address and a free TCP port")


def rendezvous_from_args(parser, args) -> "Rendezvous | None":
    """The rendezvous the flags ask for (None: this box alone); a flag missing or wrong is the parser's error (exit 2)."""
    given = [args.nodes is not None, args.node_rank is not None, args.rdzv_endpoint is not None]
    if not any(given):
        return None
    if not all(given):
        parser.error("a job over several boxes needs --nodes, --node-rank and --rdzv-endpoint together")
    try:
        return Rendezvous.parse(args.nodes, args.node_rank, args.rdzv_endpoint)
    except ValueError as e:
        parser.error(str(e))


@dataclass(frozen=True)
class WorldPlan:
    """One job's ranks on this box: `devices[r]` is local rank r's torch device ("cuda:1", "cpu"); `gpus` the NVML
    indices (empty on a CPU box); `per_rank_batch` each rank's share of a full micro-batch, `micro_batch` the
    whole; `rendezvous` where they meet the other boxes' ranks (None: this box alone)."""

    devices: tuple[str, ...]
    gpus: tuple[int, ...]
    per_rank_batch: int
    micro_batch: int
    rendezvous: Rendezvous | None = None

    @property
    def local_size(self) -> int:
        """The ranks (and slots) on this box."""
        return len(self.devices)

    @property
    def world_size(self) -> int:
        """The ranks over every box."""
        return self.local_size * (self.rendezvous.nodes if self.rendezvous else 1)

    @property
    def first_rank(self) -> int:
        """The global rank of this box's first rank."""
        return self.local_size * (self.rendezvous.node_rank if self.rendezvous else 0)


class DevicesError(Exception):
    """The config's devices or batch cannot work on this box: `problems` say which field and the fix."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def requested_count(devices, available: int) -> int:
    """How many ranks `devices:` asks for (None: 1; `all`: what is available; a list: its length)."""
    if devices is None:
        return 1
    if devices == "all":
        return max(1, available)
    if isinstance(devices, list):
        return len(devices)
    return int(devices)


def plan_world(devices, batch_size: int, batch_size_per_device: int | None, gpus: list[GpuFacts],
               cpu_slots: int, rendezvous: Rendezvous | None = None) -> WorldPlan:
    """The ranks of a job on a box with `gpus` (healthy or not; none: CPU ranks, at most `cpu_slots`): a count
    takes the first GPUs by index; with a `rendezvous`, every one of its nodes contributes as many and the batch
    splits over them all. Raises DevicesError naming what is wrong and the fix."""
    problems: list[Problem] = []
    if gpus:
        indices = _pick_gpus(devices, gpus, problems)
        targets = tuple(f"cuda:{i}" for i in indices)
    else:
        indices = ()
        if isinstance(devices, list):
            problems.append(Problem("devices", "lists GPUs, but this box has none (CPU only)",
                                    "give a count (N CPU ranks over gloo) or run on a GPU box", devices))
        count = requested_count(devices, cpu_slots)
        if count > cpu_slots:
            problems.append(Problem("devices", f"asks for {count} CPU ranks, but this box has {cpu_slots} CPU "
                                    "slot(s) and no GPU", f"use devices: {cpu_slots} or fewer", devices))
        targets = ("cpu",) * count
    world = max(1, len(targets)) * (rendezvous.nodes if rendezvous else 1)
    if batch_size_per_device is not None:
        per_rank = batch_size_per_device
    else:
        per_rank = batch_size // world
        if batch_size % world:
            problems.append(Problem("batch_size", split_advice(batch_size, world), "", batch_size))
    if problems:
        raise DevicesError(problems)
    return WorldPlan(targets, tuple(indices), per_rank, per_rank * world, rendezvous)


def batch_sharers(devices, batch_size_per_device: int | None) -> int:
    """How many devices split `batch_size` (the VRAM estimate is for one device's share, `batch_size //` this;
    a batch advised for one device is this many times that in the config): 1 with `batch_size_per_device`
    (the batch is per device already) or one device; `devices: all` counts as 1 here, where the box is not
    known, so its estimate errs high."""
    if batch_size_per_device is not None or devices == "all":
        return 1
    return requested_count(devices, 1)


def split_advice(batch_size: int, world: int) -> str:
    """The message for a batch that does not split evenly over `world` ranks, with the nearest values that do."""
    lower, upper = batch_size - batch_size % world, batch_size - batch_size % world + world
    nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
    return (f"{batch_size} does not split over {world} devices (each rank trains batch_size / {world}): "
            f"use batch_size {nearest}, or batch_size_per_device: N for N per device")


def _pick_gpus(devices, gpus: list[GpuFacts], problems: list[Problem]) -> tuple[int, ...]:
    every = sorted(g.index for g in gpus)
    if isinstance(devices, list):
        picked: list[int] = []
        for spec in devices:
            try:
                found = match_device(spec, gpus)
            except NoSuchDevice as e:
                problems.append(Problem("devices", str(e), "list GPUs this box has", spec))
                continue
            if len(found) > 1:
                problems.append(Problem("devices", f"{spec!r} names {len(found)} GPUs; list each by index or UUID",
                                        f"GPUs here: {gpu_list(gpus)}", spec))
            elif found & set(picked):
                problems.append(Problem("devices", f"{spec!r} is a GPU already listed", "list each GPU once", spec))
            picked += sorted(found)[:1]
        return tuple(picked)
    count = requested_count(devices, len(every))
    if count > len(every):
        problems.append(Problem("devices", f"asks for {count} GPUs, but this box has {len(every)}: {gpu_list(gpus)}",
                                f"use devices: {len(every)} or fewer, or devices: all", devices))
        return ()
    return tuple(every[:count])

