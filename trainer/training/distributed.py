"""One job over W devices: data parallel with torch.distributed, only the LoRA gradients reduced.

Why data parallel: the frozen base is replicated on each device and only the LoRA (a few MB) is trained,
so one flat all-reduce of the LoRA gradients per optimizer step is all the traffic there is (NeMo's Flux
LoRA default; FSDP is for bases that do not fit one GPU, not offered here: `trainer.checks.devices`).
One flat all-reduce instead of DistributedDataParallel: DDP's autograd hooks meet gradient checkpointing's
reentrant backward ("Expected to mark a variable ready only once") and gain nothing on a few MB of LoRA.

How the batch is split (`Rank.share`): every micro-batch of the epoch's order (global, from
(seed, epoch), `trainer.data.images.epoch_batches`) is cut into W contiguous shares of `per_rank_batch`
samples; each rank computes the loss of its share weighted by its share of the micro-batch's loss units
(samples; predicted tokens for text: `Task.loss_units`), so the sum over ranks is the mean one rank would
compute, and a short last batch of a bucket (a share may be empty) is weighted right. Every sample draws
its randomness from its own generator keyed by its global index (`trainer.data.randomness`), so W=2 with
per-rank batch b trains what W=1 with batch 2b does, up to float summation order.

Who does what: every rank builds the task, optimizer and scheduler (the LR scheduler steps once per
optimizer step on every rank: the same schedule as one device), restores the same checkpoint and steps
its optimizer on the same reduced gradients. Rank 0 alone writes (logs, events, checkpoints, samples,
validation, outputs, run.json) and decides early stopping; a stop or pause on any rank holds on every rank (the
flags are OR-ed after each step); at a checkpoint every rank's RNG state is gathered into it, and on resume rank 0
reads the checkpoint and broadcasts it.

The launcher (`run_ranks`): W processes started with torch.multiprocessing's forkserver, which has imported
the training stack once (`trainer.training.rank_preload`; a daemon keeps it for its lifetime, so a rank starts
as a fork, not a ~10 s import), rendezvous on 127.0.0.1 at a free port, NCCL on CUDA, gloo on the CPU, a timeout on every collective. The calling process
(the daemon or lora-train) never joins the group: it relays rank 0's events and the stop/pause flags, and
when a rank dies the others are terminated (torch's ProcessContext) and `RankDied` is raised, which the
daemon treats as an infrastructure failure (re-queued, resumed from the last checkpoint), never a hang.

Several boxes (`WorldPlan.rendezvous`, `agentd run --nodes N --node-rank K --rdzv-endpoint HOST:PORT`): each box's
launcher starts its own W ranks as global ranks K x W .. K x W + W - 1 of N x W, and they all meet at the c10d TCP
store that global rank 0 serves at HOST:PORT (`_join_group`), waiting at most the rendezvous timeout for the others
(`RendezvousFailed`, exit 5, names the endpoint and the node count). Global rank 0 (on node 0) alone writes and
reports; the other boxes' launchers say so on their console, and return their first rank's result.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue as queue_mod
import socket
import threading
from datetime import timedelta

import torch

from trainer.checks.devices import Rendezvous, WorldPlan
from trainer.errors import RendezvousFailed, is_peer_lost
from trainer.training.ranks import Rank

log = logging.getLogger(__name__)

# A collective waits this long for the other ranks: longer than rank 0's longest side work between two
# steps (a validation pass, a round of samples, a checkpoint), short enough that a hung rank fails the job.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("AGENTD_COLLECTIVE_TIMEOUT_S", "900"))


class RankDied(RuntimeError):
    """A rank process ended without finishing (killed, crashed): the job resumes from its last checkpoint.
    Its text is what agentd.failures looks for: the daemon re-queues the job from its last checkpoint."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous binds it a moment later: the usual launcher race, small)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QueueReporter:
    """Rank 0's events, sent to the launcher (which hands them to the job's real reporter)."""

    def __init__(self, q):
        self.q = q

    def emit(self, ev) -> None:
        self.q.put(ev)


def run_ranks(plan: WorldPlan, checked, reporter, stop: threading.Event, pause: threading.Event | None,
              job_kwargs: dict):
    """Run the job on `plan`'s ranks (this process joins no group) and return rank 0's JobResult.
    Raises what the first failing rank raised (ConfigError, ...), or RankDied when a rank ended without
    finishing (killed)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["trainer.training.rank_preload"])  # read when the forkserver starts (once)
    events, results = ctx.Queue(), ctx.Queue()
    stop_ev, pause_ev = ctx.Event(), ctx.Event()
    plan = _meeting_point(plan, reporter)
    context = mp.start_processes(_rank_main, args=(plan, os.getpid(), checked, events, results,
                                                   stop_ev, pause_ev, job_kwargs),
                                 nprocs=plan.local_size, join=False, start_method="forkserver")
    # For an operator who must find a rank (a stuck one, `py-spy dump --pid`): the daemon's log names them.
    log.info("data-parallel ranks %d-%d of %d started: pids %s", plan.first_rank, plan.first_rank + plan.local_size
             - 1, plan.world_size, " ".join(str(p.pid) for p in context.processes))
    try:
        while True:
            _relay(events, reporter)
            if stop.is_set():
                stop_ev.set()
            if pause is not None and pause.is_set():
                pause_ev.set()
            try:
                if context.join(timeout=0.2):
                    break
            except Exception as e:  # ProcessRaisedException / ProcessExitedException: the others are terminated
                _relay(events, reporter)
                cause = _root_cause(_drain(results), getattr(e, "error_index", -1))
                if cause is not None and not isinstance(e, mp.ProcessExitedException):
                    raise cause from None
                raise RankDied(f"a data-parallel rank died: {_gist(e)}; the job resumes from its last "
                               "checkpoint") from None
        _relay(events, reporter)
        outcome = _drain(results).get(0)  # this box's first rank: the job's rank 0 on node 0
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    if outcome is None:
        raise RankDied("a data-parallel rank ended without a result")
    if outcome[0] == "error":
        raise outcome[1]
    if plan.rendezvous.node_rank > 0 and reporter is not None:  # rank 0's events (the outcome) are the first box's
        from trainer.events import event

        reporter.emit(event("message", text=f"this box's ranks finished ({plan.rendezvous.part(plan.local_size)}): "
                                            "the first box wrote the outputs and reports the job's outcome"))
    return outcome[1]


def _root_cause(errors: dict, noticed: int) -> BaseException | None:
    """The error that ended the job: a rank's own (out of memory, a bad sample), not what the others then saw
    ("connection closed by peer"); torch notices whichever rank its scan reaches first (`noticed`)."""
    failed = [outcome[1] for _rank, outcome in sorted(errors.items(), key=lambda kv: kv[0] != noticed)
              if outcome[0] == "error"]
    causes = [e for e in failed if not is_peer_lost(f"{type(e).__name__}: {e}")]
    return (causes or failed or [None])[0]


def _meeting_point(plan: WorldPlan, reporter) -> WorldPlan:
    """Where the ranks meet: the plan's rendezvous (several boxes: its console says which part this box is), or a
    free port on 127.0.0.1 for this box alone."""
    rdzv = plan.rendezvous
    if rdzv is None:
        plan = dataclasses.replace(plan, rendezvous=Rendezvous(1, 0, "127.0.0.1", free_port()))
    elif reporter is not None:
        from trainer.events import event

        writer = ("rank 0 is on this box: it reports the loss and writes the checkpoints and outputs"
                  if rdzv.node_rank == 0 else "rank 0 on the first box (--node-rank 0, serving the rendezvous) "
                  "reports the loss and writes the checkpoints and outputs; this box writes nothing into output_dir")
        reporter.emit(event("message", text=f"{rdzv.part(plan.local_size)} of one job over {rdzv.nodes} boxes "
                                             f"(rendezvous {rdzv.endpoint}): {writer}"))
    return plan


def _rank_main(rank: int, plan: WorldPlan, launcher_pid: int, checked, events, results, stop, pause,
               job_kwargs: dict) -> None:
    """Local rank `rank` of this box: join the group, run the job, report this box's first rank's result (a
    forkserver target: module level)."""
    import torch.distributed as dist

    from trainer.training.job import LoraTrainingJob

    _die_with_launcher(launcher_pid)
    device = plan.devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    try:
        _join_group(plan, plan.first_rank + rank, "nccl" if device.startswith("cuda") else "gloo")
    except RendezvousFailed as e:
        results.put((rank, ("error", e)))
        raise
    me = Rank(plan.first_rank + rank, plan.world_size, plan.per_rank_batch, node=plan.rendezvous.node_rank)
    reporter = QueueReporter(events) if me.is_main else None
    job = LoraTrainingJob(checked, reporter, stop, pause=pause, device=device, rank=me, **job_kwargs)
    try:
        result = job.run()
        if rank == 0:
            results.put((rank, ("ok", result)))
    except BaseException as e:
        log.exception("data-parallel rank %d failed", rank)  # the daemon's log keeps the traceback
        results.put((rank, ("error", _picklable(e))))
        raise
    finally:
        dist.destroy_process_group()


def _join_group(plan: WorldPlan, rank: int, backend: str) -> None:
    """Join the job's process group as global `rank`: through a c10d TCP store at the rendezvous (served by rank 0),
    waiting at most its timeout for every rank of every box, then with a timeout on every collective. Raises
    RendezvousFailed naming the endpoint and the node count."""
    import torch.distributed as dist

    rdzv = plan.rendezvous
    try:
        store = dist.TCPStore(rdzv.host, rdzv.port, plan.world_size, is_master=rank == 0,
                              timeout=timedelta(seconds=rdzv.timeout_s), wait_for_workers=True)
        store.set_timeout(timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # joined: the rest waits as a collective does
        dist.init_process_group(backend, store=store, rank=rank, world_size=plan.world_size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except dist.DistError as e:
        boxes = f"{rdzv.nodes} boxes" if rdzv.nodes > 1 else "this box"
        advice = ("; start every box's part within $AGENTD_RDZV_TIMEOUT_S of the first (each daemon's queue is its "
                  f"own) and check that every box reaches {rdzv.endpoint} (the first box's)") if rdzv.nodes > 1 else ""
        raise RendezvousFailed(
            f"rendezvous at {rdzv.endpoint} failed: the {plan.world_size} ranks of {boxes} did not all join within "
            f"{rdzv.timeout_s:g} s ({rdzv.part(plan.local_size)}; {_gist(e)}){advice}") from None


def _die_with_launcher(launcher_pid: int) -> None:
    """A rank ends the moment the process that launched the job does: after a `kill -9` of the daemon no orphaned
    rank trains on and writes while the restarted daemon resumes the job. Watched through a pidfd of the
    launcher, not PR_SET_PDEATHSIG: a rank's parent is the forkserver, which outlives the launcher by the seconds
    its interpreter takes to finalize torch and the libraries (measured: ranks finished a tiny job meanwhile).
    Interrupts go to the launcher, which relays them as the stop flag (Ctrl-C reaches the whole process group)."""
    import select
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        launcher = os.pidfd_open(launcher_pid)
    except ProcessLookupError:  # it died before this rank started
        os._exit(1)

    def watch() -> None:
        select.select([launcher], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _relay(events, reporter) -> None:
    while True:
        try:
            ev = events.get_nowait()
        except queue_mod.Empty:
            return
        if reporter is not None:
            reporter.emit(ev)


def _drain(results) -> dict:
    """{rank: ("ok", JobResult) | ("error", exception)} of what the ranks sent."""
    out = {}
    while True:
        try:
            rank, outcome = results.get(timeout=0.5)
        except queue_mod.Empty:
            return out
        out.setdefault(rank, outcome)


def _gist(e: BaseException) -> str:
    """The last line of what torch says about a dead rank: "process 1 terminated with signal SIGKILL", or the
    exception line that ends a crashed rank's traceback."""
    return ([line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1]
