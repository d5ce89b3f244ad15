"""The order the queue runs in: pure, no clock (the scheduler passes how long each job has waited).

Rules (and why):
- Jobs that must continue first (interrupted by a daemon stop, re-queued after an infrastructure fault)
  go before everything: they already hold a place in time and their builds are waiting.
- A job that has waited `max_wait_s` or longer goes next, oldest first: a stream of higher-priority jobs
  can delay a job, never starve it.
- Otherwise higher `priority` first, FIFO (arrival order) within a priority.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    id: str
    priority: int = 0
    waited_s: float = 0.0
    first: bool = False  # interrupted or re-queued after an infrastructure fault


def run_order(arrival: list[Waiting], max_wait_s: float) -> list[str]:
    """The job ids of `arrival` (oldest first) in the order they should run."""
    def key(item):
        position, job = item
        starved = job.waited_s >= max_wait_s
        return (not job.first, not starved, 0 if starved else -job.priority, position)

    return [job.id for _, job in sorted(enumerate(arrival), key=key)]
