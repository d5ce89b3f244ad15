"""`SWEEP:best`: the best trial's output folder, for `agentd release promote` (issue 22).

`agentd release promote NAME:best` hands the release the output folder of sweep NAME's best complete
trial (its LoRA is `<folder>/<run name>.safetensors`, as for any job). The sweep writes
`<sweep folder>/best.json` each time a trial finishes; this reads it through the daemon's journal
(which knows each sweep's folder), so no Optuna storage, password or import is needed to resolve it.
"""
from __future__ import annotations

import json
from pathlib import Path

SUFFIX = ":best"


def is_sweep_ref(ref: str) -> bool:
    return ref.endswith(SUFFIX) and len(ref) > len(SUFFIX)


def resolve_best(journal, ref: str) -> Path:
    """The output folder `NAME:best` names; LookupError saying why when there is none (yet)."""
    name = ref[:-len(SUFFIX)]
    rec = next((r for r in journal.sweeps() if r["name"] == name), None)
    if rec is None:
        raise LookupError(f"{ref}: no sweep {name!r} on this daemon (`agentd sweep run FILE` starts one)")
    path = Path(rec["folder"]) / "best.json"
    try:
        best = json.loads(path.read_text())
    except FileNotFoundError:
        raise LookupError(f"{ref}: sweep {name} has no complete trial yet ({path} does not exist)") from None
    return Path(best["output_dir"])
