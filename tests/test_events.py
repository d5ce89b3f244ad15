"""Typed job events: one class per kind, one name per fact, the same from the trainer to every reader."""
from __future__ import annotations

import json

import pytest

import agentd.events  # noqa: F401  (the daemon's kinds: queued, gated, state, infra_retry)
from trainer.events import KINDS, Event, Finished, Step, event, format_event, from_dict


def test_round_trip_through_json_keeps_the_type_and_every_field():
    ev = event("step", step=3, total_steps=10, epoch="1/2", loss=0.25, loss_mean=0.3, lr=1e-4, it_s=2.0,
               eta_s=3.5, logged=True).with_fields(seq=7, job_id="job-000001")
    data = json.loads(json.dumps(ev.to_dict()))
    back = from_dict(data)
    assert isinstance(back, Step) and back == ev
    assert data["type"] == "step" and data["total_steps"] == 10 and "total" not in data
    assert ev["step"] == 3 and ev.get("missing") is None and {**ev}["type"] == "step"  # reads as a mapping


def test_every_kind_registers_itself_and_the_started_and_step_totals_share_one_name():
    assert {"started", "resumed", "warning", "step", "checkpoint", "artifact", "finished", "message", "queued",
            "gated", "state", "infra_retry", "run"} <= set(KINDS)
    fields = {k: {f for f in cls.__dataclass_fields__} for k, cls in KINDS.items()}
    assert "total_steps" in fields["started"] and "total_steps" in fields["step"] and "total" not in fields["step"]


def test_a_new_kind_is_one_class():
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(kw_only=True)
    class Sampled(Event):
        kind: ClassVar[str] = "sampled_for_test"
        path: str

        def line(self) -> str:
            return f"sample -> {self.path}"

    try:
        assert format_event({"type": "sampled_for_test", "path": "a.png"}) == "sample -> a.png"
        assert event("sampled_for_test", path="b.png").line() == "sample -> b.png"
    finally:
        KINDS.pop("sampled_for_test")


def test_bad_and_foreign_input():
    with pytest.raises(ValueError, match="unknown event kind 'nope'"):
        event("nope")
    with pytest.raises(TypeError):
        event("step", step=1, total=3)  # the old name is not a field any more
    # From a journal written by an older agentd: `total`; from a newer one: an unknown kind or field.
    old = {"type": "step", "step": 1, "total": 3, "epoch": "1/1", "loss": 0.5, "loss_mean": 0.5, "lr": 1e-3}
    assert format_event(old).startswith("step 1/3")
    assert format_event({"type": "from-the-future", "x": 1}) is None
    assert format_event({**old, "new_field": 1}).startswith("step 1/3")
    assert format_event({"type": "step"}) is None  # required fields missing: kept, not shown, no crash


def test_infra_failure_line():
    ev = Finished(outcome="failed", error="CUDA error: an illegal memory access", infra=True)
    assert ev.line().startswith("FAILED (infrastructure): CUDA error")
    assert Finished(outcome="failed", error="bad data").line() == "FAILED: bad data"
