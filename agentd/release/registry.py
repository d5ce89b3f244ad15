"""The registry of one LoRA name: decisions on its records and aliases (pure functions, no I/O).

On the registry target, per name:

    NAME/registry.jsonl   append-only, one JSON record per event:
                            pending   {version, artifact, targets, by, at}: a promote started (written first,
                                      so a version number is taken for good before any copy exists)
                            released  {version, artifact, sha256, size, files, run_id, run_dir, commit,
                                      build_url, family, base_model, base_fingerprint, evaluation, by,
                                      reason, forced, targets, alias, at}
                            aborted   {version, error, at}: the promote failed or was interrupted; its copies
                                      were removed (or never had a manifest, which marks a copy complete)
                            rollback  {from, to, by, at}
    NAME/aliases.json     {"production": N|null, "previous": N|null, "candidate": N|null}, replaced whole
                          (write to a temporary name, rename)
    NAME/NAME-vN-<sha256[:12]>.safetensors (or that folder), and its .manifest.json written last

Versions and artifact names are never reused: the next version is one past the highest ever recorded,
whatever became of it. An alias only ever names a released version.
"""
from __future__ import annotations

import re

from agentd.release import ReleaseError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ALIASES = ("production", "previous", "candidate")
PASSING = ("better", "no worse")


def release_ref(name: str, version: int) -> str:
    """How a person and decision.json's against.release name a released version: NAME@vN."""
    return f"{name}@v{version}"


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ReleaseError(f"release name {name!r} is not a simple slug: use 1-64 of a-z, 0-9, '-' and '_', "
                           "starting with a letter or digit (e.g. my_style)", "bad_request")


def versions(records: list[dict]) -> dict[int, dict]:
    """Each version's state (pending | released | aborted) with every field its records gave, by version."""
    out: dict[int, dict] = {}
    for r in records:
        event = r.get("event")
        if event in ("pending", "released", "aborted") and isinstance(r.get("version"), int):
            out.setdefault(r["version"], {}).update({k: v for k, v in r.items() if k != "event"}, state=event)
    return out


def next_version(records: list[dict]) -> int:
    return max(versions(records), default=0) + 1


def unfinished(records: list[dict]) -> list[dict]:
    """Promotes that started and never ended (the daemon was killed during them): to clean up."""
    return [v for v in versions(records).values() if v["state"] == "pending"]


def empty_aliases() -> dict:
    return {a: None for a in ALIASES}


def after_promote(aliases: dict, version: int, alias: str) -> dict:
    """The aliases once `version` is released as `alias` (production: the old production becomes previous)."""
    new = {**empty_aliases(), **aliases}
    if alias == "production":
        if new["production"] is not None and new["production"] != version:
            new["previous"] = new["production"]
        new["production"] = version
    else:
        new[alias] = version
    return new


def rollback_plan(aliases: dict, records: list[dict], to: int | None) -> tuple[int, dict]:
    """(the version production goes back to, the aliases after it). `to` None: the `previous` alias.
    `previous` then names the newest released version older than the new production (so rolling back again
    walks further back)."""
    states = versions(records)
    current = aliases.get("production")
    if current is None:
        raise ReleaseError("nothing to roll back: no version is in production yet", "bad_state")
    target = to if to is not None else aliases.get("previous")
    if target is None:
        raise ReleaseError(f"no previous version to roll back to (production is v{current}, the first release): "
                           "promote another run, or name one with --to vK", "bad_state")
    state = states.get(target, {}).get("state")
    if state != "released":
        released = sorted(v for v, s in states.items() if s["state"] == "released")
        raise ReleaseError(f"v{target} is {'not in the registry' if state is None else state}: roll back to a "
                           f"released version ({', '.join(f'v{v}' for v in released)})", "bad_state")
    if target == current:
        raise ReleaseError(f"v{target} is already in production", "bad_state")
    older = [v for v, s in states.items() if s["state"] == "released" and v < target]
    new = {**empty_aliases(), **aliases, "production": target, "previous": max(older) if older else None}
    return target, new


def gate(name: str, decision: dict | None, production: dict | None, against_sha: str | None) -> str | None:
    """None when the run may be promoted over `production` (its released record, or None for a first
    release), else why not. `decision` is the run's eval/decision.json (the evaluation's contract);
    `against_sha` the sha256 of the LoRA it was compared with, when that file is here."""
    if production is None:
        if decision is not None and decision.get("overall") == "worse":
            return f"its evaluation decided worse against {_against(decision)}: {metric_deltas(decision)}"
        return None
    ref = release_ref(name, production["version"])
    if decision is None:
        return (f"it has no evaluation (eval/decision.json) against production {ref}: evaluate it with "
                "compare_with: production")
    against = decision.get("against") or {}
    if against.get("release") != ref and (against_sha is None or against_sha != production.get("sha256")):
        return (f"its evaluation compared it with {_against(decision)}, not with production {ref}: evaluate it "
                "again with compare_with: production")
    overall = decision.get("overall")
    if overall in PASSING:
        return None
    return f"its evaluation decided {overall} against {ref}: {metric_deltas(decision)}"


def _against(decision: dict) -> str:
    a = decision.get("against") or {}
    return a.get("release") or a.get("lora") or a.get("kind") or "an unnamed comparison"


def metric_deltas(decision: dict) -> str:
    """One line a person reads: each metric's decision, delta, 95% interval and margin."""
    parts = []
    for metric, m in sorted((decision.get("metrics") or {}).items()):
        try:
            lo, hi = m["ci95"]
            parts.append(f"{metric} {m['decision']} (delta {m['delta']:+.4g}, 95% CI [{lo:+.4g}, {hi:+.4g}], "
                         f"margin {m['margin']:.4g})")
        except (KeyError, TypeError, ValueError):
            parts.append(f"{metric} {m.get('decision', '?') if isinstance(m, dict) else '?'}")
    return "; ".join(parts) or (decision.get("reason") or "no metrics")


def evaluation_summary(decision: dict | None) -> dict | None:
    """What the registry keeps of the evaluation: overall, against and each metric's means and delta."""
    if decision is None:
        return None
    return {"overall": decision.get("overall"), "against": decision.get("against"),
            "metrics": {k: {f: v.get(f) for f in ("decision", "delta", "candidate_mean", "comparison_mean")}
                        for k, v in (decision.get("metrics") or {}).items() if isinstance(v, dict)}}
