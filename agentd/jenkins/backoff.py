"""Retry delays shared by the Jenkins link and the agent.jar supervisor. Pure function."""

from __future__ import annotations

import random
from typing import Optional


def backoff_delay(failures: int, min_s: float, max_s: float, rng: Optional[random.Random] = None) -> float:
    """Delay before the next try after ``failures`` consecutive failures (1 for the first).

    Exponential (``min_s * 2**(failures-1)``, capped at ``max_s``) with "equal jitter": a random factor in
    [0.5, 1] so that many boxes that lost the same controller do not retry in lock-step. The result is
    always within [min_s / 2, max_s], so a caller that sleeps it can never spin.
    """
    rng = rng or random
    exponent = min(max(failures, 1) - 1, 60)  # 2**60 * any sane min_s is far beyond any cap
    base = min(max_s, min_s * (2 ** exponent))
    return rng.uniform(base / 2, base)
