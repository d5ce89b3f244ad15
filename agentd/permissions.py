"""Who may do what over the control socket: one table keyed by op, and one pure decision.

The socket's file mode decides who may connect at all (the socket group); this table decides what a
connected peer may do:

- ANY: every member of the socket group (submit, status, jobs, ping);
- OWNER: the job's owner or an operator (cancel, pause, resume, logs, attach);
- OPERATOR: operators only (drain, undrain).

Operators are root, the daemon's own user (it could stop the daemon and edit its journal anyway) and
the members of `operator_group` (agentd.yaml), by the peer's groups as the kernel reported them at
connect (SO_PEERGROUPS). The owner of a job is the user who submitted it, from any terminal, except
for jobs the build user (`jenkins.agent_user`) submitted: every Jenkins build on the node runs as that
one user, so uid equality would make every build the owner of every other build's job. Such a job
carries a capability instead: a random token handed to the submitting `agentd run` in the submit reply
and kept only in that process's memory; the journal keeps its SHA-256, so the client still acts on its
job (cancel on a Jenkins abort, re-attach) after a daemon restart. Without the token, the same uid is
refused like any non-owner.

What a refusal reveals: job ids, states and owners are shown to every socket member by `agentd jobs`
and `agentd status`, so a refusal names the owner; it never says whether a presented capability was
wrong or absent, and shows nothing else of the job. An unknown job id is "no job X" for everyone
(no owner to check). Peers outside the socket group cannot connect, so they learn nothing.

A new op adds one row to PERMISSIONS (tests/test_permissions.py checks every op the server serves has one).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Optional

ANY, OWNER, OPERATOR = "any socket member", "the job's owner or an operator", "operators only"

PERMISSIONS = {
    "ping": ANY,
    "submit": ANY,
    "eval": ANY,  # agentd eval: a job evaluating a finished run, checked against the submitter's access like submit
    "status": ANY,
    "jobs": ANY,
    "attach": OWNER,  # streams the job's events
    "logs": OWNER,
    "cancel": OWNER,
    "pause": OWNER,
    "resume": OWNER,
    "drain": OPERATOR,
    "undrain": OPERATOR,
    "sweep_run": ANY,  # its trials are jobs checked against the submitter's access, like submit
    "sweep_follow": ANY,  # the trials' events, as `agentd status` shows trials: names and losses
    "sweep_status": ANY,
    "sweep_report": ANY,
    "sweep_stop": OWNER,
    # releases: any member asks; what they may release or restore is the run's or folder's access
    # (agentd.release.service.check_permission: a run whose output folder they can read)
    "release": ANY,
    "backup": ANY,  # the sweep's submitter (a build's sweep: operators only) or an operator
}

# How refusals name an op ("may not <verb> it").
VERBS = {"attach": "follow", "logs": "read the events of", "sweep_stop": "stop"}


@dataclass(frozen=True)
class Requester:
    """The peer of one request, from SO_PEERCRED/SO_PEERGROUPS, and the capability it presented."""

    uid: int
    user: Optional[str]
    groups: frozenset = frozenset()
    capability: Optional[str] = None

    @property
    def name(self) -> str:
        return self.user or f"uid {self.uid}"


@dataclass(frozen=True)
class Owner:
    """A job's submitter as the journal recorded it."""

    uid: Optional[int]
    user: Optional[str]
    capability_sha256: Optional[str] = None  # set for build-user jobs: only the capability's holder owns it
    job_name: Optional[str] = None  # the Jenkins job the client reported (JOB_NAME), for the refusal text
    build_number: Optional[str] = None

    @classmethod
    def of(cls, record: dict) -> "Owner":
        sub = record.get("submitter") or {}
        env = record.get("env") or {}
        return cls(uid=sub.get("uid"), user=sub.get("user"), capability_sha256=record.get("capability_sha256"),
                   job_name=env.get("JOB_NAME"), build_number=env.get("BUILD_NUMBER"))

    @property
    def name(self) -> str:
        return self.user or f"uid {self.uid}"


@dataclass(frozen=True)
class Policy:
    """The box's settings the decision needs."""

    daemon_uid: int
    operator_group: Optional[str] = None
    operator_gid: Optional[int] = None
    build_uid: Optional[int] = None  # jenkins.agent_user's uid: its jobs are owned through a capability

    def is_build(self, who: Requester) -> bool:
        return self.build_uid is not None and who.uid == self.build_uid

    def is_operator(self, who: Requester) -> bool:
        return (who.uid in (0, self.daemon_uid)
                or (self.operator_gid is not None and self.operator_gid in who.groups))

    def operators(self) -> str:
        """Who the operators are, said so that a refused person knows how to become one."""
        if self.operator_group:
            return f"a member of operator group {self.operator_group!r}"
        return "root (no operator_group is set in agentd.yaml)"


def new_capability() -> tuple[str, str]:
    """A fresh capability and the SHA-256 the journal keeps of it (the token itself is never stored)."""
    token = secrets.token_urlsafe(32)
    return token, capability_hash(token)


def capability_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def holds_capability(who: Requester, owner: Owner) -> bool:
    if owner.capability_sha256 is None or not isinstance(who.capability, str):
        return False
    return hmac.compare_digest(capability_hash(who.capability), owner.capability_sha256)


def decide(op: str, who: Requester, policy: Policy, job_id: str | None = None,
           owner: Owner | None = None) -> str | None:
    """None when `who` may do `op` (on the job `job_id` owned by `owner`); else the refusal, which says
    who may and how to become one. An op missing from PERMISSIONS is refused (a new op must add a row)."""
    rule = PERMISSIONS.get(op)
    if rule == ANY or (rule is not None and policy.is_operator(who)):
        return None
    if rule == OPERATOR:
        who_may = f"root or {policy.operators()}" if policy.operator_group else policy.operators()
        return f"only an operator may {op}: {who_may}; {who.name} is not one"
    if rule == OWNER and owner is not None:
        verb = VERBS.get(op, op)
        if owner.capability_sha256 is not None:
            if holds_capability(who, owner):
                return None
            build = f"Jenkins job {owner.job_name}" if owner.job_name else "a Jenkins build"
            build += f" #{owner.build_number}" if owner.build_number else ""
            return (f"{job_id} belongs to the build that submitted it ({build}, as {owner.name}); only that "
                    f"build's `agentd run` (abort the build to cancel it) or {policy.operators()} may {verb} it")
        if who.uid == owner.uid:
            return None
        return f"{job_id} belongs to {owner.name}; only {owner.name} or {policy.operators()} may {verb} it"
    return f"no permission rule for op {op!r}: refused"
