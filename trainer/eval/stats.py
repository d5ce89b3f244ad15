"""The A/B decision, as pure functions over per-sample scores (no model, no file).

Each arm is scored on the same prompts x seeds (image) or the same records (text), in the same order, so
the candidate and the comparison are *paired*: per prompt (the mean over its seeds) the difference
candidate - comparison, oriented so that positive means the candidate is better (perplexity: lower is
better). The mean of those differences gets a seeded percentile-bootstrap 95% interval (resampling
prompts, the unit that varies), and the gate turns it into a decision:

    better     the interval's lower end is above 0
    no worse   the lower end is at or above -margin (a drop smaller than the margin is tolerated)
    worse      otherwise: the data cannot rule out a drop larger than the margin

Overall, over the metrics the gate names (all measured metrics when it names none): worse when any is
worse; better when none is worse and at least one is better; no worse otherwise; unknown when nothing was
measured (no metric, or the evaluation failed). Metrics outside the gate are reported, not decisive.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from trainer.config import LOWER_IS_BETTER

CONFIDENCE = 0.95


@dataclass(frozen=True)
class MetricDecision:
    decision: str  # better | no worse | worse
    delta: float  # mean paired difference, oriented: > 0 is the candidate better
    ci95: tuple[float, float]
    margin: float
    candidate_mean: float
    comparison_mean: float

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        return out


def per_group_means(scores: list[float], groups: int) -> list[float]:
    """The mean of each of `groups` equal consecutive runs of `scores` (per prompt, over its seeds)."""
    if groups <= 0 or len(scores) % groups:
        raise ValueError(f"{len(scores)} scores do not split into {groups} equal groups")
    size = len(scores) // groups
    return [sum(scores[i * size:(i + 1) * size]) / size for i in range(groups)]


def paired_differences(candidate: list[float], comparison: list[float], metric: str) -> list[float]:
    """candidate - comparison per pair, negated for metrics where lower is better."""
    if len(candidate) != len(comparison):
        raise ValueError(f"{metric}: {len(candidate)} candidate scores against {len(comparison)} comparison scores")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return [sign * (a - b) for a, b in zip(candidate, comparison)]


def bootstrap_ci(diffs: list[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `diffs` (seeded: the same input, the same interval).
    One difference: the interval is that point."""
    if not diffs:
        raise ValueError("no differences to bootstrap")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - CONFIDENCE) / 2
    lo = means[int(math.floor(tail * (resamples - 1)))]
    hi = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return lo, hi


def decide_metric(metric: str, candidate: list[float], comparison: list[float], groups: int, margin: float,
                  resamples: int = 1000, seed: int = 0) -> MetricDecision:
    """The decision of one metric from the per-sample scores of both arms (`groups`: prompts or records)."""
    diffs = paired_differences(per_group_means(candidate, groups), per_group_means(comparison, groups), metric)
    delta = sum(diffs) / len(diffs)
    lo, hi = bootstrap_ci(diffs, resamples, seed)
    decision = "better" if lo > 0 else "no worse" if lo >= -margin else "worse"
    return MetricDecision(decision, delta, (lo, hi), margin, sum(candidate) / len(candidate),
                          sum(comparison) / len(comparison))


def overall(decisions: dict[str, MetricDecision], gated: list[str] | None = None) -> str:
    """The overall decision from the `gated` metrics' decisions (None or empty: every metric's)."""
    values = [d.decision for m, d in decisions.items() if not gated or m in gated]
    if not values:
        return "unknown"
    if "worse" in values:
        return "worse"
    return "better" if "better" in values else "no worse"


def reason(verdict: str, decisions: dict[str, MetricDecision], against: str, gated: list[str] | None = None) -> str:
    """The one line a person reads: the verdict and the metrics that made it."""
    if verdict == "unknown":
        return f"no metric was measured against {against}"
    deciding = {m: d for m, d in decisions.items() if not gated or m in gated}
    named = [m for m, d in deciding.items() if d.decision == verdict] or list(deciding)
    parts = ", ".join(f"{m} {decisions[m].delta:+.4g} [{decisions[m].ci95[0]:+.4g}, {decisions[m].ci95[1]:+.4g}]"
                      for m in named)
    return f"{verdict} than {against}: {parts}"


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties left out): the chance of a split at least this uneven if
    neither side were preferred."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
