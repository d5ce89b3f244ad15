"""Who may do what over the control socket (agentd.permissions), and what a malformed request costs
(agentd.protocol, agentd.server.PeerLog): the decisions as tables, without processes. The same rules
with real users and a real daemon: tests/test_privileges.py (test_owners_*)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agentd.permissions import ANY, OPERATOR, OWNER, PERMISSIONS, Owner, Policy, Requester, capability_hash, decide
from agentd.protocol import REQUEST_FIELDS, ProtocolError, check_request, decode
from agentd.server import ControlServer, PeerLog, SocketGroupError, permission_policy
from tests.conftest import BIN

REPO = Path(__file__).resolve().parents[1]
ALICE, BOB, BUILD, OPS_GID, DAEMON = 1001, 1002, 1500, 4242, 990
TOKEN = "the-capability-token"
POLICY = Policy(daemon_uid=DAEMON, operator_group="gpu-ops", operator_gid=OPS_GID, build_uid=BUILD)
NO_GROUP = Policy(daemon_uid=DAEMON, build_uid=BUILD)

alice = Requester(ALICE, "alice", frozenset({ALICE, 100}))
bob = Requester(BOB, "bob", frozenset({BOB, 100}))
operator = Requester(BOB, "bob", frozenset({BOB, 100, OPS_GID}))  # bob, once in gpu-ops
root = Requester(0, "root", frozenset({0}))
daemon_user = Requester(DAEMON, "agentd", frozenset({DAEMON}))
build_1 = Requester(BUILD, "agentd-build", frozenset({BUILD}), capability=TOKEN)  # the submitting `agentd run`
build_2 = Requester(BUILD, "agentd-build", frozenset({BUILD}))  # another build: same uid, no token
forged = Requester(BUILD, "agentd-build", frozenset({BUILD}), capability="guessed")

alices_job = Owner(uid=ALICE, user="alice")
builds_job = Owner(uid=BUILD, user="agentd-build", capability_sha256=capability_hash(TOKEN), job_name="team-a/train",
                   build_number="12")

OWN = "job-000042 belongs to alice; only alice or a member of operator group 'gpu-ops' may {} it"
BUILDS = ("job-000042 belongs to the build that submitted it (Jenkins job team-a/train #12, as agentd-build); "
          "only that build's `agentd run` (abort the build to cancel it) or a member of operator group 'gpu-ops' "
          "may {} it")


@pytest.mark.parametrize("op, who, owner, want", [
    # every member: submit, status, jobs, ping
    *[(op, bob, None, None) for op in ("submit", "status", "jobs", "ping")],
    # the owner, from any terminal (uid), on every job op
    *[(op, alice, alices_job, None) for op in ("cancel", "pause", "resume", "logs", "attach")],
    # another member: refused, with who may and how to become one
    ("cancel", bob, alices_job, OWN.format("cancel")),
    ("pause", bob, alices_job, OWN.format("pause")),
    ("resume", bob, alices_job, OWN.format("resume")),
    ("logs", bob, alices_job, OWN.format("read the events of")),
    ("attach", bob, alices_job, OWN.format("follow")),
    # operators: root, the daemon's user, operator_group's members (by the peer's groups)
    *[(op, who, alices_job, None) for op in ("cancel", "logs") for who in (root, daemon_user, operator)],
    *[(op, who, None, None) for op in ("drain", "undrain") for who in (root, daemon_user, operator)],
    ("drain", alice, None, "only an operator may drain: root or a member of operator group 'gpu-ops'; "
                           "alice is not one"),
    ("undrain", bob, None, "only an operator may undrain: root or a member of operator group 'gpu-ops'; "
                           "bob is not one"),
    # a build's job: only the holder of its capability, whatever the uid; a forged token reads like none
    ("cancel", build_1, builds_job, None),
    ("attach", build_1, builds_job, None),
    ("cancel", build_2, builds_job, BUILDS.format("cancel")),
    ("pause", build_2, builds_job, BUILDS.format("pause")),
    ("cancel", forged, builds_job, BUILDS.format("cancel")),
    ("cancel", alice, builds_job, BUILDS.format("cancel")),
    ("cancel", operator, builds_job, None),
    # a token is no key to a job that has none
    ("cancel", Requester(BOB, "bob", frozenset({BOB}), capability=TOKEN), alices_job, OWN.format("cancel")),
    # sweeps: anyone starts, follows and reads them; the submitter or an operator stops one (the sweep's owner
    # comes from agentd.sweep.manager.SweepManager.owner; its id in the text is "sweep NAME")
    *[(op, bob, None, None) for op in ("sweep_run", "sweep_follow", "sweep_status", "sweep_report")],
    ("sweep_stop", alice, alices_job, None),
    ("sweep_stop", operator, alices_job, None),
    ("sweep_stop", bob, alices_job, OWN.format("stop")),
    # an op without a row is refused
    ("frobnicate", root, None, "no permission rule for op 'frobnicate': refused"),
])
def test_who_may_do_what(op, who, owner, want):
    assert decide(op, who, POLICY, "job-000042" if owner else None, owner) == want


def test_without_an_operator_group_only_root_and_the_daemons_user_are_operators():
    assert decide("cancel", bob, NO_GROUP, "job-000042", alices_job) == (
        "job-000042 belongs to alice; only alice or root (no operator_group is set in agentd.yaml) may cancel it")
    assert decide("drain", operator, NO_GROUP) == ("only an operator may drain: root (no operator_group is set in "
                                                   "agentd.yaml); bob is not one")
    assert decide("drain", root, NO_GROUP) is None and decide("drain", daemon_user, NO_GROUP) is None


def test_every_op_the_server_serves_has_one_permission_row_and_one_field_row():
    assert set(ControlServer.ops()) == set(PERMISSIONS) == set(REQUEST_FIELDS)
    assert set(PERMISSIONS.values()) == {ANY, OWNER, OPERATOR}
    # An owner's op is exactly an op that names a job (the server looks its owner up by job_id) or stops a
    # sweep (its owner is the sweep's submitter).
    assert {op for op, rule in PERMISSIONS.items() if rule == OWNER} == {
        op for op, fields in REQUEST_FIELDS.items() if "job_id" in fields} | {"sweep_stop"}


@pytest.mark.parametrize("line, code, message", [
    (b"[" * 100000, "bad_json", "bad request: JSON nested too deep"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "bad_json", "bad request: JSON nested too deep"),
    (b"\xff\xfe", "bad_json", "bad request: not a JSON line"),
    (b"[1, 2]", "bad_json", "bad request: a message must be a JSON object"),
    (b'{"v": 2, "op": "ping"}', "bad_version", "bad request: protocol version 2 not supported; this daemon speaks "
                                               "v1 (upgrade the client or daemon)"),
    (b'{"v": 1}', "bad_request", "bad request: missing 'op' (a string)"),
    (b'{"v": 1, "op": ["cancel"]}', "bad_request", "bad request: missing 'op' (a string)"),
    (b'{"v": 1, "op": "' + b"x" * 500 + b'"}', "unknown_op", "bad request: unknown op 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                                                             "xxxxxxxxxx...; ops: " + ", ".join(sorted(REQUEST_FIELDS))),
    (b'{"v": 1, "op": "cancel"}', "bad_request", "bad request: cancel needs job_id (a string)"),
    (b'{"v": 1, "op": "cancel", "job_id": 42}', "bad_request", "bad request: cancel: job_id must be a string, not 42"),
    (b'{"v": 1, "op": "cancel", "job_id": {"$gt": ""}}', "bad_request",
     "bad request: cancel: job_id must be a string, not dict"),
    (b'{"v": 1, "op": "logs", "job_id": "j", "after_seq": "0"}', "bad_request",
     "bad request: logs: after_seq must be an integer, not '0'"),
    (b'{"v": 1, "op": "jobs", "limit": true}', "bad_request", "bad request: jobs: limit must be an integer, not True"),
    (b'{"v": 1, "op": "submit", "config_path": "a", "config_text": "b", "env": {"A": [1]}}', "bad_request",
     "bad request: submit: env must map names to strings"),
    (b'{"v": 1, "op": "submit", "config_path": "a", "config_text": "b", "priority": 1.5}', "bad_request",
     "bad request: submit: priority must be an integer, not 1.5"),
])
def test_a_malformed_request_is_answered_with_what_is_wrong(line, code, message):
    with pytest.raises(ProtocolError) as e:
        check_request(decode(line))
    assert (e.value.code, e.value.message) == (code, message)


def test_well_formed_requests_pass_with_their_optional_fields_absent_or_null():
    assert check_request({"v": 1, "op": "cancel", "job_id": "job-1", "capability": None}) == "cancel"
    submit = ('{"v": 1, "op": "submit", "config_path": "a", "config_text": "b", "env": {"BUILD_URL": "u"}, '
              '"detach": false, "priority": -3, "future": 1}')
    assert check_request(json.loads(submit)) == "submit"


def test_a_peers_bad_requests_are_logged_a_few_lines_then_summarised():
    lines, now = [], [0.0]
    plog = PeerLog(lines.append, burst=3, window_s=60, clock=lambda: now[0])
    for i in range(400):
        plog.note(1002, "bad requests", f"bad request {i}")
    plog.note(1003, "refusals", "refused cancel")
    plog.flush()
    assert lines == ["bad request 0", "bad request 1", "bad request 2", "refused cancel"]  # nothing more yet
    now[0] = 61.0
    plog.flush()
    assert len(lines) == 5 and lines[4].startswith("397 more bad requests from uid 1002 (") and "in 61 s" in lines[4]
    plog.note(1002, "bad requests", "a new window")  # a fresh window logs again
    assert lines[5] == "a new window"


def test_the_peer_log_holds_a_bounded_number_of_windows():
    lines = []
    plog = PeerLog(lines.append, burst=1, window_s=60, clock=lambda: 0.0)
    for uid in range(PeerLog.MAX_KEYS + 10):
        plog.note(uid, "bad requests", "x")
        plog.note(uid, "bad requests", "y")  # counted
    assert len(plog._windows) <= PeerLog.MAX_KEYS
    # Full: every window so far was summarised early (not dropped), then counting went on in new ones.
    assert sum(1 for line in lines if line.startswith("1 more bad requests")) >= PeerLog.MAX_KEYS - 1


def test_a_capability_is_kept_as_its_hash_and_survives_a_restart(tmp_path):
    from agentd.journal import Journal

    journal = Journal(tmp_path / "j.sqlite3")
    job = journal.create(config_path="c.yaml", config_text="x", config_hash="h", resolved={}, output_dir="o", name="n",
                         submitter={"uid": BUILD, "user": "agentd-build"}, env={"JOB_NAME": "team-a/train"},
                         capability_sha256=capability_hash(TOKEN))
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite3")  # what a restarted daemon reads
    owner = Owner.of(reopened.get(job))
    assert decide("attach", build_1, POLICY, job, owner) is None  # the reconnecting client still owns it
    assert decide("cancel", build_2, POLICY, job, owner) is not None
    assert TOKEN.encode() not in (tmp_path / "j.sqlite3").read_bytes()


def test_an_operator_group_that_does_not_exist_stops_the_daemon_with_78(tmp_path):
    with pytest.raises(SocketGroupError, match="operator_group 'no-such-group-x' does not exist: create it"):
        permission_policy("no-such-group-x", None)
    settings = tmp_path / "agentd.yaml"
    settings.write_text(f"socket: {tmp_path / 's'}\nstate_dir: {tmp_path / 'state'}\ncache_dir: {tmp_path / 'c'}\n"
                        "slots: [cpu]\noperator_group: no-such-group-x\n")
    done = subprocess.run([str(BIN / "agentd"), "serve", "--config", str(settings)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 78, done.stderr
    assert "operator_group 'no-such-group-x' does not exist" in done.stderr
    assert not (tmp_path / "s").exists()


def test_the_shipped_settings_example_documents_operator_group(tmp_path):
    from agentd.settings import load_settings

    example = (REPO / "configs" / "agentd.yaml").read_text()
    assert "# operator_group: gpu-ops" in example
    (tmp_path / "agentd.yaml").write_text(example.replace("# operator_group: gpu-ops", "operator_group: gpu-ops"))
    assert load_settings(tmp_path / "agentd.yaml").operator_group == "gpu-ops"
    assert load_settings(REPO / "configs" / "agentd.yaml").operator_group is None  # default: root only
