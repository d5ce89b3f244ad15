"""Least privilege between the daemon, the builds and the submitters, with real users and real privilege drops.

User A runs the daemon (`agentd serve` under setpriv with the unit's capabilities: CAP_SETUID/CAP_SETGID,
ambient and bounded, as AmbientCapabilities=/CapabilityBoundingSet= give them); B is the build user (in
the socket group, agent.jar's user); C is a stranger outside the group. Users are created with useradd
under names unique to this run and removed afterwards. Creating users needs root (CI runs as root);
elsewhere those tests are skipped with that reason; the pure decisions (the kernel's permission rules with
ACLs, metadata errors without file bytes, the install snippet) are tested everywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN
from tests.waiting import wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test creates users (useradd) "
                                                           "and drops privileges to them (setpriv)")

TOKEN = "70ken5ecretc0ffee42beef"
DAEMON_ONLY_VARIABLE = "AGENTD_TEST_DAEMON_ONLY"
FAKE_JAVA = Path(__file__).with_name("fake_java.py")

# One xdist worker for the whole module: `users` grants its users search ACLs on the shared Python folders
# and restores the ACLs it found afterwards; two workers doing that at once would restore over each
# other (locking the other run's users out, or leaving entries for deleted users). `world` is one daemon
# the tests share.
pytestmark = pytest.mark.xdist_group("privileges")

# The build step the agent stand-in runs: who am I, what do I see, may I read the token, signal the daemon?
BUILD_STEP = r'''
import errno, json, os, signal, sys
def ancestors():
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        yield pid, int(fields["Uid"].split()[0])
        pid = int(fields["PPid"])
daemon = next(pid for pid, uid in ancestors() if uid != os.getuid())
with open("/proc/self/status") as f:
    caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k.startswith("Cap")}
report = {"uid": os.getuid(), "env": dict(os.environ), "caps": caps, "cwd": os.getcwd(), "daemon": daemon}
try:
    open(sys.argv[1]).read()
    report["token"] = "read"
except OSError as e:
    report["token"] = errno.errorcode[e.errno]
try:
    os.kill(daemon, signal.SIGTERM)
    report["signal"] = "sent"
except OSError as e:
    report["signal"] = errno.errorcode[e.errno]
print(json.dumps(report))
'''

def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def as_user(name: str, *cmd, daemon_caps: bool = False) -> list[str]:
    """argv that runs `cmd` as `name` with its login groups (and, for the daemon, the unit's capabilities)."""
    caps = (["--inh-caps=+setuid,+setgid", "--ambient-caps=+setuid,+setgid", "--bounding-set=-all,+setuid,+setgid"]
            if daemon_caps else [])
    return ["setpriv", f"--reuid={name}", f"--regid={name}", "--init-groups", *caps, "--", *map(str, cmd)]


def own(path: Path, user: str, group: str, mode: int) -> Path:
    shutil.chown(path, user, group)
    os.chmod(path, mode)
    return path


def python_folders() -> set[Path]:
    """Every folder this interpreter loads from (executable, stdlib, site-packages, the checkout)."""
    import site

    paths = {Path(os.path.realpath(sys.executable)).parent, Path(sys.base_prefix), Path(sys.prefix),
             Path(__file__).resolve().parents[1]}
    paths.update(Path(p) for p in sys.path + site.getsitepackages() if p and Path(p).is_dir())
    return paths


def grant_search(folders: set[Path], uids: list[int]) -> list[tuple[Path, bytes | None, int]]:
    """Let `uids` through every folder above `folders` they could not enter (a named-user `--x` POSIX ACL
    entry, nothing more), so the test users can run this checkout's Python wherever it is installed (here:
    a pyenv under root's 0700 home). Returns what to restore."""
    import struct

    from agentd.access import (ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER, ACL_USER, ACL_USER_OBJ, ACL_XATTR, SEARCH,
                               Identity, access_problem)

    undo, seen = [], set()
    for folder in folders:
        for step in [*reversed(folder.parents), folder]:
            if step in seen or not step.is_dir():
                continue
            seen.add(step)
            blocked = [uid for uid in uids
                       if access_problem(step, Identity(uid, frozenset({uid})), SEARCH) is not None]
            if not blocked:
                continue
            st = os.stat(step)
            try:
                original = os.getxattr(step, ACL_XATTR)
                from agentd.access import parse_posix_acl
                entries = parse_posix_acl(original)
            except OSError:
                original = None
                mode = st.st_mode
                entries = [(ACL_USER_OBJ, (mode >> 6) & 7, 0xFFFFFFFF), (ACL_GROUP_OBJ, (mode >> 3) & 7, 0xFFFFFFFF),
                           (ACL_MASK, (mode >> 3) & 7, 0xFFFFFFFF), (ACL_OTHER, mode & 7, 0xFFFFFFFF)]
            entries = [(t, p | SEARCH if t == ACL_MASK else p, i) for t, p, i in entries]
            entries += [(ACL_USER, SEARCH, uid) for uid in blocked]
            entries.sort(key=lambda e: (e[0], e[2]))
            os.setxattr(step, ACL_XATTR, struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))
            undo.append((step, original, st.st_mode))
    return undo


def restore(undo) -> None:
    from agentd.access import ACL_XATTR

    for folder, original, mode in reversed(undo):
        if original is None:
            os.removexattr(folder, ACL_XATTR)
        else:
            os.setxattr(folder, ACL_XATTR, original)
        os.chmod(folder, mode & 0o7777)


@pytest.fixture(scope="module")
def users():
    tag = secrets.token_hex(3)
    a, b, c, group = f"agdA{tag}", f"agdB{tag}", f"agdC{tag}", f"agdS{tag}"
    # Socket members who submit by hand (alice, bob) and an operator (in operator_group too).
    alice, bob, oper, ops = f"agdL{tag}", f"agdM{tag}", f"agdO{tag}", f"agdP{tag}"
    names = (a, b, c, alice, bob, oper)
    sh("groupadd", group)
    sh("groupadd", ops)
    undo = []
    try:
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", "-G", group, a)
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", "-G", group, b)
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", c)
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", "-G", group, alice)
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", "-G", group, bob)
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", "-G", f"{group},{ops}", oper)
        undo = grant_search(python_folders(), [pwd.getpwnam(n).pw_uid for n in names])
        yield {"a": a, "b": b, "c": c, "group": group, "alice": alice, "bob": bob, "oper": oper, "ops": ops}
    finally:
        restore(undo)
        for name in names:
            try:
                for pid in processes_of(pwd.getpwnam(name).pw_uid):  # only what this test started as them
                    os.kill(pid, 9)
            except KeyError:
                pass
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        subprocess.run(["groupdel", ops], capture_output=True)


@pytest.fixture(scope="module")
def world(users, assets):
    """The folders as install-service lays them out, the daemon running as A, and a fake Jenkins."""
    from fake_jenkins import FakeJenkins, User

    a, b, group = users["a"], users["b"], users["group"]
    root = Path(tempfile.mkdtemp(prefix="agd-priv-"))
    root.chmod(0o755)  # the pytest tmp folders are root's (0700): nobody else could reach anything there
    shared = root / "assets"
    shutil.copytree(assets["sd_model"], shared / "sd")
    shutil.copytree(assets["shapes"], shared / "shapes")
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    daemon_dir = root / "daemon"  # A's own: settings, state (journal), cache
    for folder in (daemon_dir, daemon_dir / "state", daemon_dir / "cache"):
        folder.mkdir()
        own(folder, a, a, 0o700)
    creds = root / "creds"
    creds.mkdir()
    (creds / "jenkins-token").write_text(TOKEN + "\n")
    own(creds / "jenkins-token", a, a, 0o600)
    own(creds, a, a, 0o700)
    a_only = root / "a-only.csv"  # a file only A may read, whose first line once came back in an error
    a_only.write_text(f"{TOKEN}\n{TOKEN},{TOKEN}\n")
    own(a_only, a, a, 0o600)
    run_dir = root / "run"
    run_dir.mkdir()
    own(run_dir, a, a, 0o755)
    agent_dir = root / "agent"
    agent_dir.mkdir()
    own(agent_dir, a, b, 0o2750)  # as agentd.tmpfiles: written by the daemon, read by the build user
    work = root / "work"
    work.mkdir()
    own(work, b, group, 0o2770)  # agent.jar's work folder: the build user's, group = the socket group
    log_dir = root / "log"
    log_dir.mkdir()
    log_dir.chmod(0o1777)
    step = root / "step.py"
    step.write_text(BUILD_STEP)
    step.chmod(0o644)
    java = (f"env FAKE_JAVA_LOG={log_dir / 'java.jsonl'} "
            f"FAKE_JAVA_BUILD_STEP={shlex.quote(shlex.join([sys.executable, str(step), str(creds / 'jenkins-token')]))} "
            f"{sys.executable} {FAKE_JAVA}")
    with FakeJenkins() as fake:
        fake.users["agentd"] = User("agentd", TOKEN)
        settings = daemon_dir / "agentd.yaml"
        settings.write_text(yaml.safe_dump({
            "socket": str(run_dir / "s"), "socket_group": group, "operator_group": users["ops"],
            "state_dir": str(daemon_dir / "state"),
            "cache_dir": str(daemon_dir / "cache"), "idle_client_timeout_s": 5, "stop_timeout_s": 30,
            "jenkins": {"url": fake.url, "user": "agentd", "token_credential": "jenkins-token", "node_name": "gpubox",
                        "launcher": "inbound", "remote_fs": str(work), "agent_jar_dir": str(agent_dir),
                        "agent_user": b, "java": java, "timeout_s": 5, "sync_interval_s": 0.3,
                        "retry_min_s": 0.1, "retry_max_s": 0.5, "agent_restart_min_s": 0.5,
                        "agent_restart_max_s": 2}}))
        own(settings, a, a, 0o600)
        env = {**same_code(), "PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "HOME": str(daemon_dir), "CREDENTIALS_DIRECTORY": str(creds), DAEMON_ONLY_VARIABLE: "daemon-only"}
        log = open(root / "daemon.log", "a")
        proc = subprocess.Popen(as_user(a, BIN / "agentd", "serve", "--config", settings, daemon_caps=True),
                                env=env, stdout=subprocess.DEVNULL, stderr=log, umask=0o007)  # the unit's UMask=
        try:
            wait_for(lambda: proc.poll() is not None or (run_dir / "s").is_socket(), timeout=60, what="socket")
            assert proc.poll() is None, (root / "daemon.log").read_text()
            yield {"root": root, "socket": run_dir / "s", "proc": proc, "users": users, "work": work,
                   "creds": creds, "a_only": a_only, "daemon_dir": daemon_dir, "shared": shared,
                   "java_log": log_dir / "java.jsonl", "fake": fake, "log": root / "daemon.log"}
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            # The daemon stops agent.jar although it runs as another user (it signals it as that user).
            build_uid = pwd.getpwnam(b).pw_uid
            left = processes_of(build_uid)
            if left:
                wait_for(lambda: not processes_of(build_uid), timeout=10, interval=0.2, what="agent.jar gone")
            shutil.rmtree(root, ignore_errors=True)


def processes_of(uid: int) -> list[int]:
    """Pids of processes whose real uid is `uid`; the test's own users only run what the test started."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and fields.get("State", "").split()[0] != "Z":
            pids.append(int(status.parent.name))
    return pids


@needs_root
def test_stopping_the_daemon_stops_the_agent_it_started_as_another_user(world):
    import pwd

    b = pwd.getpwnam(world["users"]["b"]).pw_uid
    agent = wait_for(lambda: processes_of(b), timeout=60, interval=0.2, what="agent.jar running as the build user")
    assert agent


def b_config(world, name: str, user: str = "b", **fields) -> Path:
    """A tiny job (2 steps at 32 px) in a folder of B's workspace, written as B (or `user`) would."""
    folder = world["work"] / name
    folder.mkdir()
    shared = world["shared"]
    cfg = {"train_data_dir": str(shared / "shapes"), "metadata_path": str(shared / "shapes" / "metadata.csv"),
           "base_model": str(shared / "sd"), "resolution": 32, "lora_rank": 4, "batch_size": 2,
           "learning_rate": "1e-3", "max_train_steps": 2, "save_steps": 2, "cache_latents": True,
           "output_dir": str(folder / "out")}
    cfg.update(fields)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    users = world["users"]
    for p in (folder, path):
        shutil.chown(p, users[user], users["group"])
    folder.chmod(0o2770)
    return path


def same_code() -> dict:
    """PYTHONPATH when the tests run with one (a checkout other than the installed one): the daemon and the
    clients then run the code under test too."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


def client_env(world, **extra) -> dict:
    return {**same_code(), "PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "AGENTD_SOCKET": str(world["socket"]),
            **extra}


def run_as(world, who: str, *cmd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(as_user(world["users"][who], *cmd), capture_output=True, text=True, env=client_env(world),
                          timeout=timeout)


def raw_submit(world, who: str, *configs: Path) -> list[dict]:
    script = f"SOCKET = {str(world['socket'])!r}\n" + RAW_SUBMIT
    done = run_as(world, who, sys.executable, "-c", script, *configs)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@needs_root
def test_only_the_socket_group_may_connect(world):
    stranger = run_as(world, "c", BIN / "agentd", "status", "--json")
    assert stranger.returncode != 0
    assert "permission denied" in (stranger.stdout + stranger.stderr)
    build = run_as(world, "b", BIN / "agentd", "status", "--json")
    assert build.returncode == 0, build.stdout + build.stderr
    assert json.loads(build.stdout)["daemon"]["pid"] == world["proc"].pid  # setpriv execs the daemon


@needs_root
def test_a_file_only_the_daemon_can_read_is_refused_without_a_byte_of_it(world):
    a_only, token_file = world["a_only"], world["creds"] / "jenkins-token"
    # Through `agentd run` (its local check runs as B, then the daemon's).
    cfg = b_config(world, "steal-run", metadata_path=str(a_only))
    done = run_as(world, "b", BIN / "agentd", "run", cfg)
    assert done.returncode == 2, done.stdout + done.stderr
    assert TOKEN not in done.stdout + done.stderr
    # Straight to the socket: every field that names a file to read, pointed at A's files.
    configs = [b_config(world, "steal-meta", metadata_path=str(a_only)),
               b_config(world, "steal-meta-token", metadata_path=str(token_file)),
               b_config(world, "steal-init", init_lora_weights=str(token_file)),
               b_config(world, "steal-base", base_model=str(a_only)),
               b_config(world, "steal-data", train_data_dir=str(world["daemon_dir"]), metadata_path=None),
               b_config(world, "steal-resume", resume=str(world["creds"]))]
    replies = raw_submit(world, "b", *configs)
    for cfg, reply in zip(configs, replies):
        assert not reply.get("ok"), (cfg, reply)
        assert reply["error"]["code"] == "invalid_config"
        message = json.dumps(reply)
        assert TOKEN not in message, (cfg, message)
        assert "may not" in message, (cfg, message)  # the reason: the submitter's rights, with the path
    meta = replies[0]["error"]["message"]
    assert "metadata_path" in meta and str(a_only) in meta and "uid " in meta, meta


@needs_root
def test_the_token_never_comes_back_whatever_file_a_config_names(world):
    # Root may read everything, so the daemon reads the files: the errors must still describe, not echo.
    a_only, token_file = world["a_only"], world["creds"] / "jenkins-token"
    configs = [b_config(world, "root-meta", metadata_path=str(a_only)),
               b_config(world, "root-meta-token", metadata_path=str(token_file)),
               b_config(world, "root-init", init_lora_weights=str(token_file)),
               b_config(world, "root-base", base_model=str(token_file))]
    for cfg, reply in zip(configs, raw_submit_as_root(world, *configs)):
        assert TOKEN not in json.dumps(reply), (cfg, reply)
        if reply.get("ok"):  # refused only when it runs (a LoRA file is read by the job): follow it to its end
            events = request_as_root(world, {"op": "logs", "job_id": reply["job_id"], "follow": True})
            assert events[-1]["event"]["type"] == "finished" and events[-1]["event"].get("outcome") == "failed", events
            assert TOKEN not in json.dumps(events), events
        else:
            assert reply["error"]["code"] == "invalid_config", reply
    meta = raw_submit_as_root(world, configs[0])[0]["error"]["message"]
    assert "header (line 1) has 1 column and no file and no caption column" in meta, meta


# Every path a config can name (as the schema spells it, `[]` for a list), with the config keys that point
# it at `S`. test_every_path_field_of_the_schema_is_checked ties this table to the schema: a new path field
# without a row here fails that test, so the socket test below covers it too.
S = "{secret}"
_NO_DATA = {"train_data_dir": None, "metadata_path": None}
_TEXT = {"mode": "text", "train_data_dir": "{text}", "metadata_path": None}
PATH_CASES = {
    "train_data_dir": {**_NO_DATA, "train_data_dir": S},
    "metadata_path": {"metadata_path": S},
    "base_model": {"base_model": S},
    "base_model_config": {"base_model_config": S},
    "init_lora_weights": {"init_lora_weights": S},
    "cache_dir": {"cache_dir": S},
    "mask_dir": {"mask_dir": S},
    "output_dir": {"output_dir": S},
    "history_dir": {"history_dir": S},
    "compare_with": {"compare_with": S},
    "sample_prompts": {"sample_prompts": S},
    "validation_data_dir": {"validation_data_dir": S},
    "resume": {"resume": S},
    "validation_file": {**_TEXT, "validation_file": S},
    "chat_template": {**_TEXT, "chat_template": S},
    "datasets[].image_dir": {**_NO_DATA, "datasets": [{"image_dir": S}]},
    "datasets[].metadata_path": {**_NO_DATA, "datasets": [{"image_dir": "{shapes}", "metadata_path": S}]},
    "datasets[].mask_dir": {**_NO_DATA, "datasets": [{"image_dir": "{shapes}", "mask_dir": S}]},
    # the evaluation's files and folders: metric models, references, prompts, records, the comparison run
    **{f"eval.{name}": {"eval": {name: S}} for name in ("reference_dir", "clip_model", "dino_model",
                                                         "aesthetic_head", "prompts", "compare_with")},
    "eval.eval_file": {**_TEXT, "eval": {"eval_file": S}},
    "eval.lm_eval_task_dir": {**_TEXT, "eval": {"lm_eval_task_dir": S}},
}
PATH_LIKE_NAME = re.compile(r"(_dir|_path|_file|_files|_weights|_config|_template|_with|_prompts)$|^resume$")


def _case(name: str, secret: Path, shapes: Path, text: Path) -> dict:
    fill = lambda v: (v.format(secret=secret, shapes=shapes, text=text) if isinstance(v, str)  # noqa: E731
                      else [fill(d) for d in v] if isinstance(v, list)
                      else {k: fill(x) for k, x in v.items()} if isinstance(v, dict) else v)
    return {k: fill(v) for k, v in PATH_CASES[name].items()}


def _types(annotation) -> tuple[set, bool]:
    """Every type an annotation can hold (through Optional/Union/list), and whether a list is on the way."""
    import typing

    args = typing.get_args(annotation)
    if not args:
        return {annotation}, False
    found, listed = set(), typing.get_origin(annotation) in (list, tuple)
    for arg in args:
        inner, inner_listed = _types(arg)
        found |= inner
        listed |= inner_listed
    return found, listed


def schema_fields(model, prefix: str = "") -> list[tuple[str, set]]:
    """(name, types) of every field of the config schema, nested sections included (`datasets[].image_dir`)."""
    out = []
    for name, info in model.model_fields.items():
        types, listed = _types(info.annotation)
        out.append((prefix + name, types))
        for t in types:
            if hasattr(t, "model_fields"):
                out += schema_fields(t, f"{prefix}{name}{'[]' if listed else ''}.")
    return out


def test_every_path_field_of_the_schema_is_checked(tmp_path):
    from agentd.access import STR_OR_PATH_FIELDS, config_paths
    from trainer.config import TrainConfig, parse_config

    fields = schema_fields(TrainConfig)
    path_fields = {n for n, types in fields if Path in types or n.rsplit(".", 1)[-1] in STR_OR_PATH_FIELDS}
    # A str field named like a path that is neither Path-typed nor a known str-or-path field is a new hole.
    unchecked = [n for n, types in fields if n not in path_fields and str in types
                 and PATH_LIKE_NAME.search(n.rsplit(".", 1)[-1])]
    assert not unchecked, f"path-like str fields not in agentd.access.STR_OR_PATH_FIELDS: {unchecked}"
    assert set(PATH_CASES) == path_fields, "add a PATH_CASES row for each new path field"
    secret = tmp_path / "secret"
    secret.write_text(TOKEN)
    base = {"train_data_dir": str(tmp_path), "metadata_path": str(tmp_path / "m.csv"), "base_model": str(tmp_path),
            "resolution": 32, "output_dir": str(tmp_path / "out")}
    for name in PATH_CASES:
        raw = {k: v for k, v in {**base, **_case(name, secret, tmp_path, tmp_path / "t.jsonl")}.items()
               if v is not None}
        cfg = parse_config(yaml.safe_dump(raw), base_dir=tmp_path)
        named = {f.replace("[0]", "[]") for f, p in config_paths(cfg) if p == secret}
        assert named == {name}, (name, named)


@needs_root
def test_every_path_a_config_names_is_refused_through_the_socket(world):
    a_only = world["a_only"]
    shared = world["shared"]
    configs = {name: b_config(world, "every-" + name.replace("[]", "").replace(".", "-"),
                              **_case(name, a_only, shared / "shapes", shared / "text.jsonl"))
               for name in PATH_CASES}
    replies = raw_submit(world, "b", *configs.values())
    windows = {TOKEN[i:i + 6] for i in range(len(TOKEN) - 5)}  # no byte run of the secret, not just all of it
    for name, reply in zip(configs, replies):
        assert not reply.get("ok") and reply["error"]["code"] == "invalid_config", (name, reply)
        message = json.dumps(reply)
        assert not [w for w in windows if w in message], (name, message)
        field_name = name.replace("[]", "[0]")
        problems = [p for p in reply["error"]["problems"] if p["field"] == field_name]
        assert problems, (name, reply)
        assert str(a_only) in problems[0]["value"] and "may not" in problems[0]["message"], (name, problems)
        assert field_name in reply["error"]["message"] and str(a_only) in reply["error"]["message"], (name, reply)


def request_as_root(world, msg: dict) -> list[dict]:
    """Every message the daemon sends back for one request, until it closes the connection."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(300)
        s.connect(str(world["socket"]))
        s.sendall((json.dumps({"v": 1, **msg}) + "\n").encode())
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def raw_submit_as_root(world, *configs: Path) -> list[dict]:
    return [request_as_root(world, {"op": "submit", "config_path": str(path), "config_text": path.read_text(),
                                    "detach": True})[0] for path in configs]


@needs_root
def test_output_dir_in_or_around_the_daemons_folders_is_refused(world):
    inside = b_config(world, "into-state", output_dir=str(world["daemon_dir"] / "state" / "loot"))
    around = b_config(world, "around-state", output_dir=str(world["daemon_dir"]))
    private = world["work"] / "private"  # B's alone: the daemon could not write the outputs there
    private.mkdir()
    own(private, world["users"]["b"], world["users"]["b"], 0o755)
    closed = b_config(world, "closed", output_dir=str(private / "out"))
    replies = raw_submit(world, "b", inside, around, closed)
    assert "is inside the daemon's state folder" in replies[0]["error"]["message"], replies[0]
    assert "contains the daemon's" in replies[1]["error"]["message"], replies[1]
    assert "the daemon cannot write it" in replies[2]["error"]["message"], replies[2]
    assert "install -d -m 2770" in replies[2]["error"]["message"], replies[2]
    assert not (world["daemon_dir"] / "state" / "loot").exists()


@needs_root
def test_a_file_taken_away_after_the_submit_is_refused_when_the_job_starts(world):
    users = world["users"]
    data = world["work"] / "later-data"
    shutil.copytree(world["shared"] / "shapes", data)
    subprocess.run(["chown", "-R", f"{users['b']}:{users['group']}", str(data)], check=True)
    busy = b_config(world, "busy")  # holds the only slot, so the next job waits in the queue
    later = b_config(world, "later", train_data_dir=str(data), metadata_path=str(data / "metadata.csv"))
    replies = raw_submit(world, "b", busy, later)
    assert all(r.get("ok") for r in replies), replies
    own(data / "metadata.csv", users["a"], users["a"], 0o600)  # now only the daemon's user may read it
    events = request_as_root(world, {"op": "logs", "job_id": replies[1]["job_id"], "follow": True})
    assert events[-1]["event"].get("outcome") == "failed", events[-3:]
    assert "may not read it" in json.dumps(events) and "metadata_path" in json.dumps(events)


@needs_root
def test_a_normal_job_runs_and_the_build_user_owns_its_outputs(world):
    cfg = b_config(world, "normal")
    done = run_as(world, "b", BIN / "agentd", "run", cfg, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + world["log"].read_text()[-3000:]
    out = cfg.parent / "out"
    readable = run_as(world, "b", "cat", out / "run.json")
    assert readable.returncode == 0 and json.loads(readable.stdout), readable.stderr
    removed = run_as(world, "b", "rm", "-r", out)
    assert removed.returncode == 0, removed.stderr
    assert not out.exists()


@needs_root
def test_agent_runs_as_the_build_user_with_none_of_the_daemons_keys(world):
    def step_report():
        if not world["java_log"].exists():
            return None
        for line in world["java_log"].read_text().splitlines():
            entry = json.loads(line)
            if "build_step" in entry:
                return entry
        return None

    try:
        entry = wait_for(step_report, timeout=120, interval=0.2, what="the agent's build step")
    except AssertionError as e:
        java_log = world["java_log"].read_text() if world["java_log"].exists() else "(no agent log)"
        raise AssertionError(f"{e}\n{java_log}\n{world['log'].read_text()[-4000:]}") from None
    assert entry["rc"] == 0, entry
    report = json.loads(entry["output"])
    import pwd

    b = pwd.getpwnam(world["users"]["b"])
    assert report["uid"] == b.pw_uid
    assert report["daemon"] == world["proc"].pid  # the build step's first ancestor of another user
    assert report["token"] == "EACCES"
    assert report["signal"] == "EPERM"
    assert world["proc"].poll() is None
    env = report["env"]
    for leaked in ("CREDENTIALS_DIRECTORY", DAEMON_ONLY_VARIABLE, "NOTIFY_SOCKET", "AGENTD_SOCKET"):
        assert leaked not in env, leaked
    assert TOKEN not in json.dumps(env)
    assert env["USER"] == b.pw_name and env["HOME"] == b.pw_dir
    assert env["PATH"].split(":")[0] == str(BIN)  # a build step finds `agentd run`
    assert int(report["caps"]["CapEff"], 16) == 0 and int(report["caps"]["CapPrm"], 16) == 0
    assert int(report["caps"]["CapAmb"], 16) == 0 and int(report["caps"]["CapInh"], 16) == 0
    assert report["cwd"] == str(world["work"])
    secret = world["root"] / "agent" / "agent.secret"
    assert secret.stat().st_mode & 0o777 == 0o640 and secret.stat().st_gid == b.pw_gid


# --- who may act on a job (agentd.permissions) -------------------------------------------------------------

# A client written straight to the socket: `ask(msg)` sends one request on its own connection and returns
# the first reply line.
RAW_ASK = r'''
import json, socket, sys
def ask(msg):
    s = socket.socket(socket.AF_UNIX); s.settimeout(120); s.connect(SOCKET)
    s.sendall((json.dumps({"v": 1, **msg}) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf.splitlines()[0])
'''
# Each request of the JSON list in argv[1], one reply per line.
RAW_REQUESTS = RAW_ASK + r'''
for msg in json.loads(sys.argv[1]):
    print(json.dumps(ask(msg)), flush=True)
'''
# No `agentd run`, no local preflight: submits each config of argv (detached), its text read as the user who
# runs it, and prints each reply.
RAW_SUBMIT = RAW_ASK + r'''
for path in sys.argv[1:]:
    print(json.dumps(ask({"op": "submit", "config_path": path, "config_text": open(path).read(), "detach": True})),
          flush=True)
'''
# A build that submits (argv[1]) and keeps its capability, tries it on another build's job (argv[2]), then acts
# on its own job with a made-up capability and with its own.
RAW_BUILD = RAW_ASK + r'''
path, other = sys.argv[1], sys.argv[2]
sub = ask({"op": "submit", "config_path": path, "config_text": open(path).read(), "detach": True})
token = sub.pop("capability")
replies = [sub, ask({"op": "cancel", "job_id": other}), ask({"op": "pause", "job_id": other, "capability": token}),
           ask({"op": "cancel", "job_id": sub["job_id"], "capability": "A" * len(token)}),
           ask({"op": "cancel", "job_id": sub["job_id"], "capability": token})]
print(json.dumps({"replies": replies, "token": token}))
'''


def raw_requests(world, who: str, msgs: list[dict]) -> list[dict]:
    done = run_as(world, who, sys.executable, "-c", f"SOCKET = {str(world['socket'])!r}\n" + RAW_REQUESTS,
                  json.dumps(msgs))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def journal_rows(world, sql: str, args=()) -> list[dict]:
    import sqlite3

    db = sqlite3.connect(str(world["daemon_dir"] / "state" / "journal.sqlite3"))
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql, args).fetchall()]
    finally:
        db.close()


def job_state(world, job: str) -> str:
    """The job's state as the journal has it."""
    return journal_rows(world, "SELECT state FROM jobs WHERE id = ?", (job,))[0]["state"]


def wait_training(world, job: str) -> None:
    def training():
        status = request_as_root(world, {"op": "status"})[0]["status"]
        return any(r["id"] == job and (r["step"] or 0) >= 1 for r in status["running"])

    try:
        wait_for(training, timeout=240, interval=0.2, what=f"{job} training")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{world['log'].read_text()[-3000:]}") from None


@needs_root
def test_who_may_act_on_a_job_owners_builds_and_operators(world):
    """One training job for the whole scenario: a build's long job runs; alice's waits behind it."""
    from tests.daemon_harness import Tail

    users = world["users"]
    alice, bob, b, ops = users["alice"], users["bob"], users["b"], users["ops"]
    build_cfg = b_config(world, "build-long", max_train_steps=100000, save_steps=100000, log_every=1)
    env = client_env(world, JOB_NAME="team-a/train", BUILD_NUMBER="12", BUILD_URL="http://ci/job/team-a/train/12/")
    first = subprocess.Popen(as_user(b, BIN / "agentd", "run", build_cfg), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    tail = Tail(first)
    try:
        build_job = re.search(r"submitted (job-\d+)", tail.until("submitted job-", timeout=120)[-1]).group(1)
        alice_cfg = b_config(world, "alice-long", user="alice", max_train_steps=100000, save_steps=100000)
        submitted = run_as(world, "alice", BIN / "agentd", "run", "--detach", alice_cfg)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job = re.search(r"submitted (job-\d+)", submitted.stdout).group(1)

        # bob, in the socket group, sees alice's job and its owner ...
        seen = run_as(world, "bob", BIN / "agentd", "status", "--json")
        assert [q["submitter"]["user"] for q in json.loads(seen.stdout)["queue"]] == [alice], seen.stdout
        assert re.search(rf"{job} +queued .* {alice} ", run_as(world, "bob", BIN / "agentd", "jobs").stdout)
        # ... but may not act on it, read its events, nor drain the box: exit 77 with who may
        who_may = f"{job} belongs to {alice}; only {alice} or a member of operator group '{ops}' may"
        for op, verb in (("cancel", "cancel"), ("logs", "read the events of")):
            done = run_as(world, "bob", BIN / "agentd", op, job)
            assert done.returncode == 77, (op, done.stdout, done.stderr)
            assert f"{who_may} {verb} it" in done.stderr, done.stderr
        drain = run_as(world, "bob", BIN / "agentd", "drain")
        assert drain.returncode == 77, drain.stdout + drain.stderr
        assert f"only an operator may drain: root or a member of operator group '{ops}'; {bob} is not one" in \
            drain.stderr
        # the raw protocol enforces the same (a client need not be ours)
        raw = raw_requests(world, "bob", [{"op": "pause", "job_id": job}, {"op": "resume", "job_id": job},
                                          {"op": "attach", "job_id": job},
                                          {"op": "cancel", "job_id": job, "capability": "x"}, {"op": "undrain"}])
        assert [r["error"]["code"] for r in raw] == ["not_permitted"] * 5, raw
        assert raw[0]["error"]["message"] == f"{who_may} pause it" and raw[1]["error"]["message"] == \
            f"{who_may} resume it", raw

        # another build (same user as the first) may not cancel or pause the first's job, nor attach to it
        wait_training(world, build_job)
        build_may = (f"{build_job} belongs to the build that submitted it (Jenkins job team-a/train #12, as {b}); "
                     f"only that build's `agentd run` (abort the build to cancel it) or a member of operator group "
                     f"'{ops}' may")
        for op in ("cancel", "pause"):
            done = run_as(world, "b", BIN / "agentd", op, build_job)
            assert done.returncode == 77 and f"{build_may} {op} it" in done.stderr, done.stdout + done.stderr
        again = run_as(world, "b", BIN / "agentd", "run", build_cfg)
        assert again.returncode == 77, again.stdout + again.stderr
        assert f"{build_job} already trains into the same output_dir. {build_may} follow it" in again.stderr
        # straight to the socket: a build's capability is a key to its own job only; a made-up one is none
        script = f"SOCKET = {str(world['socket'])!r}\n" + RAW_BUILD
        done = run_as(world, "b", sys.executable, "-c", script, b_config(world, "build-queued"), build_job)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        token, (sub, cancel_other, pause_other, forged, own) = out["token"], out["replies"]
        assert sub["ok"] and len(token) >= 40, sub
        for reply in (cancel_other, pause_other):
            assert reply["error"]["code"] == "not_permitted" and build_may in reply["error"]["message"], reply
        assert forged["error"]["code"] == "not_permitted" and "belongs to the build that submitted it" in \
            forged["error"]["message"] and "capability" not in forged["error"]["message"], forged
        assert own == {"v": 1, "ok": True, "job_id": sub["job_id"], "state": "cancelled"}, own
        # the capability is nowhere but in that client's memory: not in status, the journal or the log
        stored = b"".join(p.read_bytes() for p in (world["daemon_dir"] / "state").iterdir()
                          if p.name.startswith("journal.sqlite3"))
        assert token.encode() not in stored and token not in world["log"].read_text()
        shown = request_as_root(world, {"op": "status"}) + request_as_root(world, {"op": "jobs"})
        assert token not in json.dumps(shown)
        assert journal_rows(world, "SELECT capability_sha256 FROM jobs WHERE id = ?", (sub["job_id"],))[0][
            "capability_sha256"] == hashlib.sha256(token.encode()).hexdigest()
        # nothing changed by all those refusals
        status = request_as_root(world, {"op": "status"})[0]["status"]
        assert [r["id"] for r in status["running"]] == [build_job] and [q["id"] for q in status["queue"]] == [job]
        assert not status["daemon"]["draining"]

        # alice, from another terminal, reads her job's events and cancels it
        logs = run_as(world, "alice", BIN / "agentd", "logs", job)
        assert logs.returncode == 0 and "queued" in logs.stdout, logs.stdout + logs.stderr
        cancelled = run_as(world, "alice", BIN / "agentd", "cancel", job)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stdout + cancelled.stderr
        # an operator drains and undrains the box and pauses the build's job
        for op in ("drain", "undrain"):
            done = run_as(world, "oper", BIN / "agentd", op)
            assert done.returncode == 0, done.stdout + done.stderr
        paused = run_as(world, "oper", BIN / "agentd", "pause", build_job)
        assert paused.returncode == 0 and "pausing" in paused.stdout, paused.stdout + paused.stderr
        tail.until(f"job {build_job} paused")
        # a Jenkins abort of the first build (SIGTERM to its `agentd run`) still cancels its own job
        first.send_signal(signal.SIGTERM)
        code, lines = tail.finish(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 3, "\n".join(lines)
    assert any(f"cancel requested for {build_job} (cancelled)" in line for line in lines), lines
    assert job_state(world, build_job) == "cancelled" and job_state(world, job) == "cancelled"
    # every refusal is journaled with the requester
    refused = journal_rows(world, "SELECT op, job_id, user, reason FROM refusals WHERE user IN (?, ?)", (bob, b))
    assert all(r["reason"] for r in refused)
    assert sorted((r["user"], r["op"], r["job_id"] or "") for r in refused) == sorted([
        *[(bob, op, job) for op in ("cancel", "logs", "pause", "resume", "attach", "cancel")],
        (bob, "drain", ""), (bob, "undrain", ""),
        *[(b, op, build_job) for op in ("cancel", "pause", "attach", "cancel", "pause")], (b, "cancel", sub["job_id"])])


# --- the decisions, without users -------------------------------------------------------------------------

U = 0xFFFFFFFF


def acl_bytes(*entries) -> bytes:
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.parametrize("acl, uid, gids, want, granted", [
    (None, 1000, {1000}, 4, True),           # owner bits r-- of 0o460
    (None, 1001, {500}, 4, True),            # group bits rw-
    (None, 1001, {500}, 2, True),
    (None, 1002, {9}, 4, False),             # other ---
    (None, 0, set(), 6, True),               # root
    # named user rw-, but the mask is r--: only read
    ([(1, 4, U), (2, 6, 1002), (4, 6, U), (0x10, 4, U), (0x20, 0, U)], 1002, {9}, 2, False),
    ([(1, 4, U), (2, 6, 1002), (4, 6, U), (0x10, 4, U), (0x20, 0, U)], 1002, {9}, 4, True),
    # a matching group entry that does not grant denies, even when other would
    ([(1, 4, U), (4, 0, U), (8, 0, 77), (0x10, 7, U), (0x20, 4, U)], 1003, {77}, 4, False),
    ([(1, 4, U), (4, 0, U), (8, 4, 77), (0x10, 7, U), (0x20, 0, U)], 1003, {77}, 4, True),
    ([(1, 4, U), (4, 0, U), (8, 4, 77), (0x10, 7, U), (0x20, 0, U)], 1003, {78}, 4, False),
])
def test_permitted_follows_the_kernels_rules(acl, uid, gids, want, granted):
    from agentd.access import Identity, parse_posix_acl, permitted

    entries = parse_posix_acl(acl_bytes(*acl)) if acl else None
    assert permitted(0o460, 1000, 500, entries, Identity(uid, frozenset(gids)), want) is granted


@pytest.fixture
def open_tmp():
    """A scratch folder others may enter (pytest's own are 0700 under a 0700 parent)."""
    path = Path(tempfile.mkdtemp(prefix="agd-acl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_real_acl_is_read_from_the_file(open_tmp):
    from agentd.access import READ, Identity, access_problem

    folder = open_tmp / "models"
    folder.mkdir()
    model = folder / "model.safetensors"
    model.write_bytes(b"x")
    folder.chmod(0o700)
    stranger = Identity(54321, frozenset({54321}))
    assert f"may not enter {folder}" in access_problem(model, stranger, READ)
    # search for that uid on the folder (mask --x): now the file's own bits decide (0644 here: readable)
    model.chmod(0o644)
    os.setxattr(folder, "system.posix_acl_access",
                acl_bytes((1, 7, U), (2, 1, 54321), (4, 0, U), (0x10, 1, U), (0x20, 0, U)))
    assert access_problem(model, stranger, READ) is None
    model.chmod(0o600)
    problem = access_problem(model, stranger, READ)
    assert "may not read it" in problem and "mode 0600" in problem


def test_output_folders_stay_out_of_the_daemons_folders(tmp_path):
    from agentd.access import daemon_folder_problem

    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "link").symlink_to(state)
    folders = {"state": state}
    assert "inside the daemon's state folder" in daemon_folder_problem(state / "x", folders)
    assert "inside" in daemon_folder_problem(tmp_path / "link" / "x", folders)  # through a symlink too
    assert "contains the daemon's state folder" in daemon_folder_problem(tmp_path, folders)
    assert daemon_folder_problem(tmp_path / "state-out", folders) is None


def test_an_output_folder_with_a_link_out_of_it_is_refused(tmp_path):
    from agentd.access import link_out_problem

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "ok").symlink_to(out / "logs")  # inside: fine
    assert link_out_problem(out) is None
    (out / "checkpoints").symlink_to(tmp_path / "state")  # a daemon folder, say
    assert "symbolic link" in link_out_problem(out) and str(out / "checkpoints") in link_out_problem(out)


def test_metadata_errors_describe_the_file_without_its_bytes(tmp_path):
    from trainer.data.images import scan_image_dataset

    secret = "s3cr3t-first-line"
    meta = tmp_path / "metadata.csv"
    meta.write_text(f"{secret}\n{secret}\n")
    problems = scan_image_dataset(tmp_path, meta).problems
    text = " ".join(p.message for p in problems)
    assert secret not in text and "header (line 1) has 1 column and no file and no caption column" in text
    meta.write_text(f"{secret},file_name\n")
    text = " ".join(p.message for p in scan_image_dataset(tmp_path, meta).problems)
    assert secret not in text and "2 columns" in text and "the file column is column 2" in text
    meta.write_bytes(b"file_name,text\n\xff" + secret.encode())
    text = " ".join(p.message for p in scan_image_dataset(tmp_path, meta).problems)
    assert secret not in text and "offset 15" in text
    meta.write_text(f"file_name,text\nok.png,a\n{secret}.png,b\n")
    text = " ".join(p.message for p in scan_image_dataset(tmp_path, meta).problems)
    assert secret not in text and f"line 2 of {meta}" in text and f"line 3 of {meta}" in text


def test_install_puts_the_users_in_a_configured_socket_group(tmp_path, venv):
    from agentd.install import SOCKET_GROUP_PATH, install_service

    root = tmp_path / "root"
    settings = root / "etc/agentd/agentd.yaml"
    settings.parent.mkdir(parents=True)
    settings.write_text("socket_group: jenkins\n")
    lines = install_service(venv, root=root)
    snippet = (root / SOCKET_GROUP_PATH).read_text()
    assert "m agentd jenkins" in snippet and "m agentd-build jenkins" in snippet
    assert any("socket_group jenkins" in line for line in lines)
    assert any("add `agent_user: agentd-build`" in line for line in lines)  # an old settings file without it


@needs_root
def test_a_socket_group_the_daemon_is_not_in_is_named_with_the_fix(users):
    c, group = users["c"], users["group"]  # C is not in the group
    root = Path(tempfile.mkdtemp(prefix="agd-grp-"))
    try:
        root.chmod(0o755)
        home = root / "c"
        home.mkdir()
        own(home, c, c, 0o700)
        settings = home / "agentd.yaml"
        settings.write_text(f"socket: {home / 's'}\nsocket_group: {group}\nstate_dir: {home / 'state'}\n"
                            f"cache_dir: {home / 'cache'}\n")
        own(settings, c, c, 0o600)
        done = subprocess.run(as_user(c, BIN / "agentd", "serve", "--config", settings), capture_output=True,
                              text=True, timeout=120, env={"PATH": os.environ["PATH"], "HOME": str(home)})
        assert done.returncode == 78, done.stderr
        assert f"user {c} is not a member of group {group}" in done.stderr, done.stderr
        assert f"usermod -aG {group} {c}" in done.stderr and "run it as the service" not in done.stderr
        assert not (home / "s").exists()  # no socket left behind with the wrong group
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None or shutil.which("systemd-sysusers") is None,
                    reason="systemd-tmpfiles/systemd-sysusers are not installed on this machine")
@needs_root
def test_the_snippets_make_the_build_user_and_its_folders(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "etc").mkdir()
    for src, name in (("agentd.sysusers", "users.conf"), ("agentd.tmpfiles", "files.conf")):
        shutil.copy(repo / "systemd" / src, tmp_path / name)
    sh("systemd-sysusers", f"--root={tmp_path}", str(tmp_path / "users.conf"))
    sh("systemd-tmpfiles", f"--root={tmp_path}", "--create", str(tmp_path / "files.conf"))
    passwd = {l.split(":")[0]: l.split(":") for l in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {l.split(":")[0]: l.split(":") for l in (tmp_path / "etc/group").read_text().splitlines()}
    assert "agentd-build" in groups["agentd"][3].split(",")  # the socket's group: it may submit
    assert "agentd" not in groups["agentd-build"][3].split(",")
    assert passwd["agentd-build"][5] == "/srv/agentd/jenkins"
    uid = {name: int(fields[2]) for name, fields in passwd.items()}
    gid = {name: int(fields[2]) for name, fields in groups.items()}
    for path, owner, group, mode in (("srv/agentd", "agentd", "agentd", 0o2770),
                                     ("srv/agentd/jenkins", "agentd-build", "agentd", 0o2770),
                                     ("srv/agentd/agent", "agentd", "agentd-build", 0o2750)):
        st = (tmp_path / path).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid[owner], gid[group], mode), path
    unit = (repo / "systemd" / "agentd.service").read_text()
    for line in ("CapabilityBoundingSet=CAP_SETUID CAP_SETGID", "AmbientCapabilities=CAP_SETUID CAP_SETGID",
                 "StateDirectoryMode=0700", "CacheDirectoryMode=0700", "UMask=0007", "NoNewPrivileges=yes"):
        assert f"\n{line}\n" in unit, line
    settings = yaml.safe_load((repo / "configs" / "agentd.yaml").read_text())
    assert settings["jenkins"]["agent_user"] == "agentd-build"
