"""The job journal: every job, its state transitions and its events, durably, in sqlite.

States: queued -> gated -> running -> succeeded | failed | cancelled, plus interrupted (the job was
running when the daemon stopped or died; it is queued again, first, at the next start, and resumes
from its last checkpoint) and paused (`agentd pause`: checkpointed, parked until `agentd resume`; it
stays paused across daemon restarts). A job re-queued after an infrastructure fault goes back to
queued (`infra_retries` counts them). Each job records its owner: `submitter` (uid, gid, groups, user,
pid from SO_PEERCRED) and, for a build user's job, `capability_sha256` (agentd.permissions; never the
token). Refused requests go to `refusals` with the requester (the newest MAX_REFUSALS kept).
WAL mode with synchronous=FULL: a committed transition survives a power cut.

One connection, guarded by a lock: the daemon's threads (socket handlers, slot workers) share it.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

ACTIVE = ("queued", "gated", "running", "interrupted", "paused")
FINAL = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    config_path TEXT NOT NULL,
    config_text TEXT NOT NULL,
    config_hash TEXT,
    resolved TEXT,
    output_dir TEXT,
    name TEXT,
    submitter TEXT,
    env TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    requeue_first INTEGER NOT NULL DEFAULT 0,
    slot TEXT,
    step INTEGER,
    total_steps INTEGER,
    loss REAL,
    error TEXT,
    artifacts TEXT,
    estimate_mib REAL,
    peak_mib REAL,
    shape_key TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    infra_retries INTEGER NOT NULL DEFAULT 0,
    capability_sha256 TEXT,
    sweep TEXT,
    evaluate TEXT,
    rendezvous TEXT
);
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY, state TEXT NOT NULL, source TEXT NOT NULL, text TEXT NOT NULL, base_text TEXT NOT NULL,
    folder TEXT NOT NULL, submitter TEXT, env TEXT, created REAL NOT NULL, ended REAL, detail TEXT
);
CREATE TABLE IF NOT EXISTS transitions (
    job_id TEXT NOT NULL, state TEXT NOT NULL, time REAL NOT NULL, detail TEXT
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS refusals (
    time REAL NOT NULL, op TEXT NOT NULL, job_id TEXT, uid INTEGER NOT NULL, user TEXT, reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id);
"""

JSON_COLUMNS = ("resolved", "submitter", "env", "artifacts", "sweep", "evaluate", "rendezvous")
NEWER_COLUMNS = {"priority": "INTEGER NOT NULL DEFAULT 0", "infra_retries": "INTEGER NOT NULL DEFAULT 0",
                 "capability_sha256": "TEXT", "sweep": "TEXT",
                 "evaluate": "TEXT",  # evaluate: an `agentd eval` job, {"run": folder, "against": ...}
                 "rendezvous": "TEXT"}  # one box's part of a job over several: {nodes, node_rank, rdzv_endpoint}
MAX_REFUSALS = 10000  # refusals kept (the newest): a member refused in a loop cannot grow the journal


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A journal written by an older agentd lacks the newer columns: add them (sqlite's ALTER TABLE)."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
        for name, decl in NEWER_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
                self._db.execute("COMMIT")
                return out
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # --- jobs -------------------------------------------------------------------------------------
    def create(self, *, config_path: str, config_text: str, config_hash: str, resolved: dict, output_dir: str,
               name: str, submitter: dict, env: dict, shape_key: str | None = None,
               estimate_mib: float | None = None, priority: int = 0, capability_sha256: str | None = None,
               sweep: dict | None = None, evaluate: dict | None = None, rendezvous: dict | None = None) -> str:
        """`sweep`: {name, trial, folder} when the job is a sweep's trial (agentd.sweep); `evaluate`: {run,
        against} when the job is `agentd eval` of a finished run; `rendezvous`: {nodes, node_rank, rdzv_endpoint}
        when it is this box's part of a job over several boxes."""
        now = time.time()

        def fn(db):
            cur = db.execute(
                "INSERT INTO jobs (id, state, config_path, config_text, config_hash, resolved, output_dir, name, "
                "submitter, env, created, shape_key, estimate_mib, priority, capability_sha256, sweep, evaluate, "
                "rendezvous) VALUES ('', 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (config_path, config_text, config_hash, json.dumps(resolved), output_dir, name,
                 json.dumps(submitter), json.dumps(env), now, shape_key, estimate_mib, priority, capability_sha256,
                 json.dumps(sweep) if sweep else None, json.dumps(evaluate) if evaluate is not None else None,
                 json.dumps(rendezvous) if rendezvous else None))
            job_id = f"job-{cur.lastrowid:06d}"
            db.execute("UPDATE jobs SET id = ? WHERE seq = ?", (job_id, cur.lastrowid))
            db.execute("INSERT INTO transitions VALUES (?, 'queued', ?, NULL)", (job_id, now))
            return job_id

        return self._tx(fn)

    def transition(self, job_id: str, state: str, detail: str | None = None, **fields) -> None:
        now = time.time()
        if state == "running":
            fields.setdefault("started", now)
        if state in FINAL:
            fields.setdefault("ended", now)
        for k in JSON_COLUMNS:
            if k in fields:
                fields[k] = json.dumps(fields[k])

        def fn(db):
            sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (state, *fields.values(), job_id))
            db.execute("INSERT INTO transitions VALUES (?, ?, ?, ?)", (job_id, state, now, detail))

        self._tx(fn)

    def update(self, job_id: str, **fields) -> None:
        """Progress fields (step, loss, ...) without a state change."""
        if not fields:
            return
        for k in JSON_COLUMNS:
            if k in fields:
                fields[k] = json.dumps(fields[k])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None, limit: int | None = None, newest_first=False) -> list[dict]:
        q = "SELECT * FROM jobs"
        args: list = []
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
            args += list(states)
        q += " ORDER BY " + ("seq DESC" if newest_first else "requeue_first DESC, seq ASC")
        if limit:
            q += " LIMIT ?"
            args.append(limit)
        with self._lock:
            return [_row(r) for r in self._db.execute(q, args).fetchall()]

    def job_for_output(self, output_dir: str) -> dict | None:
        """The newest job that trains into `output_dir` (a sweep trial's folder names its job)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE output_dir = ? ORDER BY seq DESC LIMIT 1",
                                   (output_dir,)).fetchone()
        return _row(row) if row else None

    def transitions(self, job_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT state, time, detail FROM transitions WHERE job_id = ? ORDER BY rowid",
                                    (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def recover_after_start(self) -> list[str]:
        """Jobs the last daemon left running (or gated) were interrupted: queue them again, first."""
        def fn(db):
            rows = db.execute("SELECT id FROM jobs WHERE state IN ('running', 'gated', 'interrupted')").fetchall()
            now = time.time()
            ids = [r["id"] for r in rows]
            for job_id in ids:
                db.execute("UPDATE jobs SET state = 'interrupted', requeue_first = 1 WHERE id = ?", (job_id,))
                db.execute("INSERT INTO transitions VALUES (?, 'interrupted', ?, ?)",
                           (job_id, now, "daemon restarted; resuming from the last checkpoint"))
            return ids

        return self._tx(fn)

    # --- refusals ----------------------------------------------------------------------------------
    def add_refusal(self, *, op: str, job_id: str | None, uid: int, user: str | None, reason: str) -> None:
        def fn(db):
            cur = db.execute("INSERT INTO refusals VALUES (?, ?, ?, ?, ?, ?)",
                             (time.time(), op, job_id, uid, user, reason))
            db.execute("DELETE FROM refusals WHERE rowid <= ?", (cur.lastrowid - MAX_REFUSALS,))

        self._tx(fn)

    # --- events -----------------------------------------------------------------------------------
    def add_event(self, job_id: str, seq: int, event: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)",
                             (job_id, seq, event.get("time", time.time()), json.dumps(event, default=str)))

    def events(self, job_id: str, after_seq: int = 0) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                                    (job_id, after_seq)).fetchall()
        return [json.loads(r["body"]) for r in rows]

    def last_event_seq(self, job_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) AS m FROM events WHERE job_id = ?", (job_id,)).fetchone()
        return row["m"] or 0

    # --- sweeps (agentd.sweep): the daemon resumes the running ones when it starts ---------------------
    def sweep_start(self, *, name: str, source: str, text: str, base_text: str, folder: str, submitter: dict,
                    env: dict) -> bool:
        """Record a sweep (its file and base config as they are now) as running; False when a sweep of that
        name is running already."""
        def fn(db):
            row = db.execute("SELECT state FROM sweeps WHERE name = ?", (name,)).fetchone()
            if row and row["state"] == "running":
                return False
            db.execute("INSERT OR REPLACE INTO sweeps VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                       (name, source, text, base_text, folder, json.dumps(submitter), json.dumps(env), time.time()))
            return True

        return self._tx(fn)

    def sweep_end(self, name: str, state: str, detail: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE sweeps SET state = ?, ended = ?, detail = ? WHERE name = ?",
                             (state, time.time(), detail, name))

    def sweeps(self, state: str | None = None) -> list[dict]:
        q, args = "SELECT * FROM sweeps", ()
        if state:
            q, args = q + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY created", args).fetchall()
        return [{**dict(r), "submitter": json.loads(r["submitter"] or "{}"), "env": json.loads(r["env"] or "{}")}
                for r in rows]

    # --- calibration and retention ----------------------------------------------------------------
    def recorded_peak(self, shape_key: str) -> float | None:
        """The largest measured peak of a finished job with the same base model and shape."""
        with self._lock:
            row = self._db.execute("SELECT MAX(peak_mib) AS p FROM jobs WHERE shape_key = ? AND peak_mib IS NOT NULL",
                                   (shape_key,)).fetchone()
        return row["p"]

    def expired(self, before: float) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN ('succeeded','failed','cancelled') AND COALESCE(ended, created) < ?",
                (before,)).fetchall()
        return [_row(r) for r in rows]

    def delete_jobs(self, ids: list[str]) -> None:
        def fn(db):
            for job_id in ids:
                for table in ("jobs", "transitions", "events"):
                    col = "id" if table == "jobs" else "job_id"
                    db.execute(f"DELETE FROM {table} WHERE {col} = ?", (job_id,))

        self._tx(fn)


def _row(row: sqlite3.Row) -> dict:
    d = dict(row)
    for k in JSON_COLUMNS:
        if d.get(k):
            d[k] = json.loads(d[k])
    return d
