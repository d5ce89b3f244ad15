"""The daemon through its real parts: a real `agentd serve` process, real sockets, real signals."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch

from tests.conftest import BIN, write_config
from tests.daemon_harness import DaemonProc, Tail
from tests.waiting import wait_for


@pytest.fixture
def daemon(tmp_path, assets):
    (tmp_path / "daemon").mkdir()
    for folder in ("releases", "backup"):  # release and backup folders for jobs whose config says `release:`
        (tmp_path / folder).mkdir()
    d = DaemonProc(tmp_path / "daemon", f"release:\n  registry: nas\n  backup: offsite\n  targets:\n"
                                        f"    nas: {{type: folder, path: {tmp_path / 'releases'}}}\n"
                                        f"    offsite: {{type: folder, path: {tmp_path / 'backup'}}}\n").start()
    yield d
    d.stop()


def job_config(tmp_path, assets, name: str, **fields):
    folder = tmp_path / name
    folder.mkdir()
    return write_config(folder, assets, **fields)


def test_three_concurrent_runs_share_one_slot_in_order(daemon, tmp_path, assets):
    # job0 and job1 ask for a release when they succeed: the first of a name passes the gate (nothing in
    # production yet); the second has no evaluation against that production, so the gate refuses it; job2 is
    # only backed up (kept).
    releases = [{"name": "shapes", "when": "better"}, {"name": "shapes"}, {"when": "never", "keep": True}]
    configs = [job_config(tmp_path, assets, f"job{i}", max_train_steps=4, save_steps=4, release=releases[i])
               for i in range(3)]
    tails = []
    for cfg in configs:  # submit one after another so the order is known
        t = Tail(daemon.agentd("run", str(cfg)))
        t.until("submitted")
        tails.append(t)
    results = [t.finish() for t in tails]
    assert [code for code, _ in results] == [0, 0, 0], results
    outputs = ["\n".join(lines) for _, lines in results]
    assert "position 1" in outputs[0] and "position 2" in outputs[1] and "position 3" in outputs[2]
    assert all("succeeded" in o for o in outputs)
    assert "released shapes v1 (shapes-v1-" in outputs[0]
    assert "release of shapes refused: " in outputs[1] and "no evaluation" in outputs[1]
    assert "release" not in outputs[2] and "kept out (" in outputs[2] and "backed up to offsite" in outputs[2]
    assert len(list((tmp_path / "backup" / "kept").glob("*.safetensors"))) == 1
    registry = [json.loads(x) for x in (tmp_path / "releases" / "shapes" / "registry.jsonl").read_text().splitlines()]
    assert [(r["event"], r["version"]) for r in registry] == [("pending", 1), ("released", 1)]
    assert registry[1]["run_dir"] == str(tmp_path / "job0" / "out") and registry[1]["family"] == "sd"
    rows = daemon.journal_rows("SELECT id, started, ended, state FROM jobs ORDER BY seq")
    assert [r["state"] for r in rows] == ["succeeded"] * 3
    for a, b in zip(rows, rows[1:]):
        assert a["ended"] <= b["started"], "run intervals overlap"
    assert [r["started"] for r in rows] == sorted(r["started"] for r in rows)


def test_sigterm_to_agentd_run_cancels_with_checkpoint(daemon, tmp_path, assets):
    cfg = job_config(tmp_path, assets, "long", max_train_steps=400, save_steps=1000, log_every=1)
    tail = Tail(daemon.agentd("run", str(cfg)))
    tail.until("step 2/400")
    tail.proc.send_signal(signal.SIGTERM)  # what Jenkins does on abort
    code, lines = tail.finish(timeout=120)
    text = "\n".join(lines)
    assert code == 3, text
    assert "cancel requested" in text and "cancelled at step" in text
    ckpts = list((cfg.parent / "out/checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name.startswith("step-")
    (row,) = daemon.journal_rows("SELECT state FROM jobs")
    assert row["state"] == "cancelled"


def test_sigkill_to_agentd_run_job_goes_on_and_second_run_attaches(daemon, tmp_path, assets):
    cfg = job_config(tmp_path, assets, "attach", max_train_steps=16, save_steps=100, log_every=1)
    first = Tail(daemon.agentd("run", str(cfg)))
    first.until("step 1/16")
    first.proc.kill()  # the agent link is lost: no cancel is sent
    first.proc.wait()
    time.sleep(0.5)
    assert daemon.status()["running"], "the job keeps running without its client"
    second = Tail(daemon.agentd("run", str(cfg)))
    code, lines = second.finish(timeout=300)
    text = "\n".join(lines)
    assert code == 0, text
    assert "attached to job-000001" in text and "succeeded" in text
    assert len(daemon.journal_rows("SELECT id FROM jobs")) == 1


def _raw(daemon, payload: bytes, read: bool = True, timeout: float = 10) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(daemon.socket))
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not read:
            return b""
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return data


def test_bad_protocol_input_is_answered_and_daemon_keeps_serving(daemon, tmp_path, assets):
    def code(data: bytes):
        return json.loads(data)["error"]["code"] if data else None

    assert code(_raw(daemon, b"this is not json\n")) == "bad_json"
    assert code(_raw(daemon, b"[1, 2]\n")) == "bad_json"
    assert code(_raw(daemon, b"x" * (10 * 1024 * 1024))) in ("too_large", None)  # answered or dropped
    assert code(_raw(daemon, b'{"v": 1, "op": "frobnicate"}\n')) == "unknown_op"
    assert code(_raw(daemon, b'{"v": 99, "op": "ping"}\n')) == "bad_version"
    assert code(_raw(daemon, b'{"v": 1, "op": "submit"}\n')) == "bad_request"
    # Idle and trickling clients, held open during the fuzz: each is dropped within idle_client_timeout_s (2 s)
    # of connecting, however it trickles its line, so none pins a thread.
    t0 = time.monotonic()
    idle = [_connect(daemon) for _ in range(20)]
    trickling = [_connect(daemon) for _ in range(5)]
    # A few hundred hostile requests from one peer: each answered "bad request: <what>", none a traceback.
    answers = {}
    for payload in _hostile_requests(300):
        reply = _raw(daemon, payload)
        if reply:  # (a request over max_message_bytes may be dropped before its answer is read)
            message = json.loads(reply)["error"]["message"]
            assert message.startswith("bad request: "), reply
            answers[message.split(":")[0]] = answers.get(message.split(":")[0], 0) + 1
        for s in trickling:
            try:
                s.send(b"{")
            except OSError:  # dropped already: what this checks
                pass
    assert set(answers) == {"bad request"} and answers["bad request"] > 250, answers
    for s in idle + trickling:  # the daemon closed each (EOF), or answers the trickler's unfinished line
        s.settimeout(10)
        assert s.recv(65536) == b"", s
        s.close()
    assert time.monotonic() - t0 < 30
    half_open = _connect(daemon)  # a line cut short, then the write side closed
    half_open.sendall(b'{"v": 1, "op": "pi')
    half_open.shutdown(socket.SHUT_WR)
    half_open.settimeout(10)
    assert b"the connection ended in the middle of a line" in half_open.recv(65536)
    half_open.close()
    assert daemon.request({"op": "ping"})["ok"]
    cfg = job_config(tmp_path, assets, "after", max_train_steps=2, save_steps=2)
    proc = daemon.run("run", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = daemon.log.read_text()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
    # One line each for the first few, the rest counted (summarised when the minute ends): never 300 lines.
    assert 1 <= log.count("bad request: ") <= 5, log[-3000:]


def _connect(daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    return s


def _hostile_requests(count: int, seed: int = 27) -> list[bytes]:
    """Random bytes, JSON nested thousands deep, JSON over max_message_bytes, wrong types, unknown ops."""
    import random

    rng = random.Random(seed)
    kinds = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"") + b"\n",
        lambda: b"[" * rng.randrange(1000, 100000) + b"\n",
        lambda: b'{"v": 1, "op": "ping", "x": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001 + b"\n",
        lambda: json.dumps({"v": 1, "op": "cancel", "job_id": rng.choice([1, None, [], {"a": 1}, True, 2.5])}).encode()
        + b"\n",
        lambda: json.dumps({"v": 1, "op": "submit", "config_path": 1, "config_text": [], "env": {"A": {}}}).encode()
        + b"\n",
        lambda: json.dumps({"v": 1, "op": "logs", "job_id": "job-000001", "after_seq": "0"}).encode() + b"\n",
        lambda: json.dumps({"v": 1, "op": rng.choice(["frobnicate", "", "op_ping", "__init__", "x" * 10000])}).encode()
        + b"\n",
        lambda: json.dumps({"v": rng.choice([0, "1", None, 1.5]), "op": "ping"}).encode() + b"\n",
    ]
    out = [rng.choice(kinds)() for _ in range(count - 3)]
    out += [b'{"v": 1, "op": "ping", "pad": "' + b"x" * (2 << 20) + b'"}\n'] * 3  # over max_message_bytes (1 MiB)
    return out


OPT_NUM = (int, float, type(None))
STATUS_SCHEMA = {
    "daemon": {"pid": int, "version": str, "uptime_s": (int, float), "socket": str, "protocol": int, "draining": bool},
    "jenkins": {"state": str, "node_name": (str, type(None)), "agent": (dict, type(None))},
    "slots": [{"name": str, "index": int, "healthy": bool, "unhealthy_reason": (str, type(None)),
               "job": (str, type(None)), "uuid": (str, type(None)), "agentd_vram_mib": OPT_NUM}],
    "running": [{"id": str, "config": str, "slot": str, "device_uuid": (str, type(None)), "step": (int, type(None)),
                 "total_steps": (int, type(None)), "loss": (float, type(None)), "it_s": (float, type(None)),
                 "eta_s": OPT_NUM, "priority": int, "attempt": int,
                 "submitter": {"uid": (int, type(None)), "user": (str, type(None))}, "build_url": (str, type(None)),
                 "stopping": (str, type(None))}],
    "queue": [{"id": str, "position": int, "state": str, "config": str, "priority": int, "waited_s": OPT_NUM}],
    "paused": [{"id": str, "step": (int, type(None)), "total_steps": (int, type(None))}],
    "recent": [{"id": str, "outcome": str, "ended": (float, type(None)), "loss": (float, type(None)),
                "estimate_mib": OPT_NUM, "peak_mib": OPT_NUM, "infra_retries": int}],
    "counters": {"jobs_finished": dict, "gate_waits": int, "infra_retries": int},
    "model_cache": {"entries": int, "hits": int, "misses": int, "on_device": int, "device_mib": (int, float),
                    "host_mib": (int, float), "warm_vram_ttl_s": (int, float), "device_expires_in_s": OPT_NUM},
}


def check_schema(value, schema, path="status"):
    if isinstance(schema, dict):
        assert isinstance(value, dict), path
        for key, sub in schema.items():
            assert key in value, f"{path}.{key} missing"
            check_schema(value[key], sub, f"{path}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), path
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{path}[{i}]")
    else:
        assert isinstance(value, schema), f"{path}: {value!r} is not {schema}"


def test_status_json_schema_idle_and_running_and_no_daemon(daemon, tmp_path, assets):
    proc = daemon.run("status", "--json")
    assert proc.returncode == 0
    idle = json.loads(proc.stdout)
    check_schema(idle, STATUS_SCHEMA)
    assert idle["running"] == [] and idle["slots"][0]["name"] == "cpu"

    cfg = job_config(tmp_path, assets, "status", max_train_steps=300, save_steps=1000, log_every=1)
    tail = Tail(daemon.agentd("run", str(cfg)))
    tail.until("step 3/300")

    def running_at_step_3():  # the status object is rebuilt once per tick: it may be a tick behind the console
        busy = json.loads(daemon.run("status", "--json").stdout)
        return busy if busy["running"] and (busy["running"][0]["step"] or 0) >= 3 else None

    busy = wait_for(running_at_step_3, timeout=120, interval=0.2, what="status showing step 3")
    check_schema(busy, STATUS_SCHEMA)
    (r,) = busy["running"]
    assert r["total_steps"] == 300 and r["config"] == str(cfg)
    plain = daemon.run("status").stdout
    assert "running:" in plain and r["id"] in plain and "loss" in plain
    daemon.run("cancel", r["id"])
    assert tail.finish()[0] == 3

    gone = subprocess.run([str(BIN / "agentd"), "status", "--socket", str(tmp_path / "nope.sock")],
                          capture_output=True, text=True)
    assert gone.returncode != 0 and "not running" in gone.stderr


def test_broken_config_over_the_socket_fails_cleanly_then_next_job_runs(daemon, tmp_path, assets):
    reply = daemon.request({"op": "submit", "config_path": str(tmp_path / "ghost/train.yaml"),
                            "config_text": "train_data_dir: ./nope\nbase_model: ./nope\noutput_dir: ./out\n",
                            "detach": True})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_config"
    assert "train_data_dir" in reply["error"]["message"]
    cfg = job_config(tmp_path, assets, "next", max_train_steps=2, save_steps=2)
    proc = daemon.run("run", str(cfg))
    assert proc.returncode == 0, proc.stdout


def test_data_removed_while_queued_fails_that_job_only(daemon, tmp_path, assets):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(assets["shapes"], data)
    blocker = job_config(tmp_path, assets, "blocker", max_train_steps=300, save_steps=1000)
    doomed = job_config(tmp_path, assets, "doomed", max_train_steps=2, train_data_dir=str(data),
                        metadata_path=str(data / "metadata.csv"))
    first = Tail(daemon.agentd("run", str(blocker)))
    first.until("step")
    second = Tail(daemon.agentd("run", str(doomed)))
    second.until("position 2")
    shutil.rmtree(data)
    daemon.run("cancel", "job-000001")
    assert first.finish()[0] == 3
    code, lines = second.finish()
    text = "\n".join(lines)
    assert code == 1 and "FAILED" in text and "train_data_dir" in text, text
    third = daemon.run("run", str(job_config(tmp_path, assets, "third", max_train_steps=2)))
    assert third.returncode == 0


def test_warm_cache_gives_the_same_lora_as_cold_runs(daemon, tmp_path, assets):
    from safetensors.torch import load_file

    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    a = job_config(tmp_path, assets, "seedA", max_train_steps=3, seed=1)
    b = job_config(tmp_path, assets, "seedB", max_train_steps=3, seed=2)
    for cfg in (a, b):
        assert daemon.run("run", str(cfg)).returncode == 0
    cache = daemon.status()["model_cache"]
    assert cache["hits"] >= 1, cache  # the second job reused the warm base
    cold = job_config(tmp_path, assets, "coldB", max_train_steps=3, seed=2)
    LoraTrainingJob(preflight(cold)).run()
    warm_b = load_file(str(b.parent / "out/out.safetensors"))
    cold_b = load_file(str(cold.parent / "out/out.safetensors"))
    assert warm_b.keys() == cold_b.keys()
    assert all(torch.equal(warm_b[k], cold_b[k]) for k in warm_b)


def test_socket_permissions_and_second_daemon_refused(daemon, tmp_path):
    import stat

    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    second = subprocess.run([str(BIN / "agentd"), "serve", "--config", str(daemon.settings)], capture_output=True,
                            text=True, timeout=60)
    assert second.returncode == 1 and "held by a running agentd" in second.stderr
    assert daemon.request({"op": "ping"})["ok"]


def test_detach_logs_and_jobs(daemon, tmp_path, assets):
    cfg = job_config(tmp_path, assets, "detached", max_train_steps=2, save_steps=2)
    proc = daemon.run("run", str(cfg), "--detach")
    assert proc.returncode == 0 and "submitted job-000001" in proc.stdout
    logs = daemon.run("logs", "job-000001", "--follow")
    assert logs.returncode == 0 and "succeeded" in logs.stdout
    jobs = daemon.run("jobs")
    assert "job-000001" in jobs.stdout and "succeeded" in jobs.stdout
    (row,) = daemon.journal_rows("SELECT submitter FROM jobs")
    submitter = json.loads(row["submitter"])  # SO_PEERCRED of the submitting `agentd run`
    assert submitter["uid"] == os.getuid() and submitter["pid"] > 0


def test_drain_refuses_new_jobs_until_undrain(daemon, tmp_path, assets):
    assert daemon.run("drain").returncode == 0
    cfg = job_config(tmp_path, assets, "drained", max_train_steps=2)
    refused = daemon.run("run", str(cfg))
    assert refused.returncode == 1 and "draining" in refused.stderr
    assert daemon.status()["daemon"]["draining"] is True
    assert daemon.run("undrain").returncode == 0
    assert daemon.run("run", str(cfg)).returncode == 0


def test_bad_settings_file_exit_78(tmp_path):
    bad = tmp_path / "agentd.yaml"
    bad.write_text("sockett: /tmp/x\nstop_timeout_s: -1\n")
    proc = subprocess.run([str(BIN / "agentd"), "serve", "--config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 78
    assert "did you mean 'socket'" in proc.stderr and "stop_timeout_s" in proc.stderr and ":2:" in proc.stderr


def test_out_of_memory_fails_the_job_with_advice_and_the_next_job_runs(tmp_path, assets):
    """The daemon under a real address-space limit (RLIMIT_AS): a job too big for it runs out of memory."""
    root = tmp_path / "d"
    root.mkdir()
    d = DaemonProc(root, "cpu_slots: 2\n", memory_limit_bytes=5 * 2**30).start()
    try:
        huge = job_config(tmp_path, assets, "huge", resolution=1024, batch_size=32, cache_latents=False)
        proc = d.run("run", str(huge))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "out of memory" in proc.stdout and "lower batch_size" in proc.stdout
        (row,) = d.journal_rows("SELECT state, error FROM jobs")
        assert row["state"] == "failed" and "out of memory" in row["error"]
        # The same on two data-parallel ranks (they inherit the limit): a rank's out-of-memory error comes back
        # to the daemon with the same advice, naming both devices; not a lost rank, so not retried.
        wide = job_config(tmp_path, assets, "wide", resolution=1024, batch_size=64, cache_latents=False, devices=2)
        proc = d.run("run", str(wide))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "out of memory on cpu-0+cpu-1" in proc.stdout and "lower batch_size" in proc.stdout, proc.stdout
        small = d.run("run", str(job_config(tmp_path, assets, "small", max_train_steps=2)))
        assert small.returncode == 0, small.stdout
    finally:
        d.stop()
