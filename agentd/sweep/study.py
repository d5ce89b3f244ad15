"""The Optuna side of a sweep: storage, sampler, pruner, and what a finished trial is worth.

Optuna's storage is the truth for trial states (running, complete, pruned, failed); several boxes share
one study through PostgreSQL, one box keeps it in a journal file under the sweep folder (JournalStorage:
append-only, file-locked, survives a kill -9). Trial numbers are the study's global sequence: numbers
0..trials-1 are the sweep's trials; a trial asked past that (two boxes asked at once) is told FAIL as
"surplus" at once and never run.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from agentd.sweep.spec import Sweep, redact_url
from trainer.errors import ConfigError, Problem

log = logging.getLogger("agentd.sweep")

BOX_ATTR = "agentd_box"  # the trial's user attribute naming the daemon that runs it
SURPLUS_ATTR = "surplus"


def storage_url(sweep: Sweep, password: str | None) -> str:
    """The storage as Optuna's URL form (the password inserted; never shown: see redact_url)."""
    url = sweep.spec.storage
    if password:
        scheme, rest = url.split("://", 1)
        user, _, host = rest.partition("@")
        url = f"{scheme}://{user}:{_quote(password)}@{host}"
    return url


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def open_storage(sweep: Sweep, password: str | None = None):
    """The study's Optuna storage; a PostgreSQL one that does not connect or authenticate is a
    ConfigError naming the URL without its password (exit 2, nothing started)."""
    import optuna

    if not sweep.is_postgres():
        from optuna.storages.journal import JournalFileBackend

        sweep.folder.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(sweep.folder / "study.journal")))
    url = storage_url(sweep, password).replace("postgresql://", "postgresql+psycopg2://", 1)
    try:
        return _rdb_storage(url)
    except Exception as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if password:
            text = text.replace(password, "***").replace(_quote(password), "***")
        raise ConfigError([Problem("storage", f"cannot open the study at {redact_url(sweep.spec.storage)}: "
                                   f"{text}", "check the host, database and user, and the daemon's "
                                   "sweep_db_password_file", redact_url(sweep.spec.storage))], sweep.source) from None


SCHEMA_LOCK = 0x5357454550  # pg_advisory_lock key: one daemon at a time creates Optuna's tables


def _rdb_storage(url: str):
    """Optuna's RDBStorage, its tables created under a PostgreSQL advisory lock: two boxes opening a fresh
    database at once would otherwise both CREATE TABLE, and one fails on a duplicate key of pg_type."""
    import optuna
    import sqlalchemy

    engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK})
    finally:
        engine.dispose()


def sampler(sweep: Sweep):
    import optuna

    spec = sweep.spec
    if spec.sampler == "grid":
        space = {name: p.values() for name, p in spec.parameters.items()}
        return _ask_tell_grid()(space, seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(1, spec.trials // 3)))


def _ask_tell_grid():
    import optuna

    class AskTellGrid(optuna.samplers.GridSampler):
        """GridSampler for ask-and-tell: its after_trial calls `study.stop()` when the grid is used up, which
        raises outside `optimize`; the sweep stops asking by itself (`trials` is at most the grid's size)."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return AskTellGrid


def pruner(sweep: Sweep):
    import optuna

    spec = sweep.spec
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials,
                                       n_warmup_steps=spec.pruner_warmup_steps)


def load_study(sweep: Sweep, password: str | None = None, *, create: bool = True):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(sweep, password)
    if create:
        return optuna.create_study(study_name=sweep.spec.name, storage=storage, sampler=sampler(sweep),
                                   pruner=pruner(sweep), direction=sweep.spec.direction, load_if_exists=True)
    return optuna.load_study(study_name=sweep.spec.name, storage=storage, sampler=sampler(sweep),
                             pruner=pruner(sweep))


def sweep_trials(study, trials: int) -> list:
    """The sweep's trials (numbers below `trials`), in number order."""
    return sorted((t for t in study.get_trials(deepcopy=False) if t.number < trials), key=lambda t: t.number)


def objective_value(sweep: Sweep, output_dir: Path, val_losses: list[float]) -> tuple[float | None, str]:
    """What a succeeded trial is worth, and why when it is worth nothing: the last validation loss, or
    the evaluation's candidate mean of the metric (eval/metrics.json, issue 21's contract)."""
    metric = sweep.spec.metric()
    if metric is None:
        if not val_losses:
            return None, "the trial reported no validation loss"
        return val_losses[-1], ""
    path = Path(output_dir) / "eval" / "metrics.json"
    try:
        data = json.loads(path.read_text())
        return float(data["metrics"][metric]["candidate"]["mean"]), ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"no candidate mean of {metric} in {path} ({type(e).__name__}: {e})"


def box_id(state_dir: Path) -> str:
    """This daemon among the boxes sharing a study: host name and state folder (two daemons on one
    machine have different state folders)."""
    return f"{os.uname().nodename}:{Path(state_dir).resolve()}"
