"""The sweep file (agentd.sweep.spec) and the Optuna study it opens (agentd.sweep.study), without a daemon:
every bad input of issue 24 reported as file:line: field: message + fix before anything starts."""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from agentd.sweep.spec import corners, load_sweep, parallel_warning
from tests.conftest import BIN
from trainer.errors import ConfigError

BASE = """\
train_data_dir: data
base_model: model
output_dir: out
resolution: 32
validation_split: 0.25
validate_every_n_steps: 2
"""
GOOD = """\
name: lr-rank
base_config: train.yaml
parameters:
  learning_rate: {range: [1.0e-4, 1.0e-2], log: true}
  lora_rank: {choices: [2, 4]}
trials: 6
"""


def write(folder: Path, sweep: str, base: str = BASE) -> Path:
    (folder / "train.yaml").write_text(base)
    path = folder / "sweep.yaml"
    path.write_text(textwrap.dedent(sweep))
    return path


# (sweep file, base config, the field named, the line, words of the message, words of the fix)
BAD = [
    (GOOD.replace("learning_rate:", "learning_rat:"), BASE, "parameters.learning_rat", 4, "not a training config key",
     "did you mean 'learning_rate'?"),
    (GOOD.replace("[1.0e-4, 1.0e-2]", "[1.0e-2, 1.0e-4]"), BASE, "parameters.learning_rate.range", 4,
     "low must be below high", "low < high"),
    (GOOD.replace("[1.0e-4, 1.0e-2]", "[0, 1.0e-2]"), BASE, "parameters.learning_rate.range", 4,
     "a log range needs low > 0", "positive low"),
    (GOOD.replace("{choices: [2, 4]}", "{grid: []}"), BASE, "parameters.lora_rank.grid", 5, "a grid of zero points",
     "at least one value"),
    (GOOD, BASE.replace("validation_split: 0.25\n", ""), "objective", None, "val_loss needs a validation set",
     "validation_split"),
    (GOOD + "objective: eval.bleu\n", BASE, "objective", 7, "produces no 'eval.bleu' for a image model",
     "clip_t"),
    (GOOD + "objective: eval.clip_t\n", BASE, "objective", 7, "the base config has no eval: block",
     "add an eval: block that computes it to train.yaml"),
    (GOOD + "objective: eval.dino\n", BASE + "eval: {clip_model: clip}\n", "objective", 7,
     "the base config's eval: block does not compute dino (it computes: clip_t)", "dino: dino_model + reference_dir"),
    (GOOD + "storage: postgresql://sweeper:hunter2@db.example/optuna\n", BASE, "storage", 7,
     "the URL holds a password", "sweep_db_password_file"),
    (GOOD.replace("{choices: [2, 4]}", "{range: [0, 8]}"), BASE, "parameters.lora_rank", 5,
     "the trial config with", "positive"),
    (GOOD.replace("trials: 6", "trials: 0"), BASE, "trials", 6, "greater than 0", "positive"),
    (GOOD + "sampler: grid\n", BASE, "parameters.learning_rate.range", 4, "sampler: grid needs finite values",
     "grid: [..]"),
    (GOOD.replace("{range: [1.0e-4, 1.0e-2], log: true}", "{grid: [1.0e-3, 1.0e-2]}") + "sampler: grid\n", BASE,
     "trials", 6, "sampler: grid has 4 points", "set trials: 4"),
]


def test_bad_sweep_files_name_file_line_field_and_fix(tmp_path):
    for i, (sweep, base, field, line, message, fix) in enumerate(BAD):
        folder = tmp_path / str(i)
        folder.mkdir()
        path = write(folder, sweep, base)
        with pytest.raises(ConfigError) as err:
            load_sweep(path)
        text = err.value.render()
        where = f"{path}:{line}: {field}: " if line else f"{path}: {field}: "
        assert where in text and message in text and fix in text, (i, text)
        assert "hunter2" not in text
        assert not (folder / "lr-rank").exists()  # nothing started, nothing written


def test_good_sweep_file_defaults_corners_and_trial_config(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD))
    spec = sweep.spec
    assert (spec.sampler, spec.direction, spec.pruner, spec.parallel, spec.storage) == \
        ("tpe", "minimize", "median", 1, "journal")
    assert sweep.folder == tmp_path / "lr-rank"
    assert corners(spec) == [{"learning_rate": 1e-4, "lora_rank": 2}, {"learning_rate": 1e-4, "lora_rank": 4},
                             {"learning_rate": 1e-2, "lora_rank": 2}, {"learning_rate": 1e-2, "lora_rank": 4}]
    cfg = sweep.trial_config(3, {"learning_rate": 3e-3, "lora_rank": 4})
    assert (cfg.learning_rate, cfg.lora_rank, cfg.output_dir) == (3e-3, 4, tmp_path / "lr-rank/trials/003")
    assert cfg.train_data_dir == tmp_path / "data"  # relative paths still resolve against the base config's folder
    clip = write(tmp_path, GOOD + "objective: eval.clip_t\n", BASE + "eval: {clip_model: clip}\n")
    assert load_sweep(clip).spec.direction == "maximize"


def test_journal_study_persists(tmp_path):
    """The default storage: a journal file under the sweep folder that a reopened study reads back."""
    import optuna

    from agentd.sweep import study as st
    from agentd.sweep.spec import suggest

    sweep = load_sweep(write(tmp_path, GOOD))
    study = st.load_study(sweep)
    trial = study.ask()
    values = {n: suggest(trial, n, p) for n, p in sweep.spec.parameters.items()}
    assert 1e-4 <= values["learning_rate"] <= 1e-2 and values["lora_rank"] in (2, 4)
    study.tell(trial, 0.5)
    again = st.load_study(sweep, create=False)
    assert (sweep.folder / "study.journal").is_file()
    [t] = st.sweep_trials(again, sweep.spec.trials)
    assert (t.number, t.state, t.value, t.params) == (0, optuna.trial.TrialState.COMPLETE, 0.5, values)


def test_unreachable_postgres_is_named_with_the_password_redacted(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD + "storage: postgresql://sweeper@127.0.0.1:1/optuna\n"))
    from agentd.sweep import study as st

    with pytest.raises(ConfigError) as err:
        st.load_study(sweep, "s3cr3t-pw")
    text = err.value.render()
    assert "storage: cannot open the study at postgresql://sweeper@127.0.0.1:1/optuna" in text, text
    assert "s3cr3t-pw" not in text


def test_agentd_sweep_run_exits_2_before_the_daemon(tmp_path):
    path = write(tmp_path, GOOD.replace("lora_rank:", "lora_rnak:"))
    proc = subprocess.run([str(BIN / "agentd"), "sweep", "run", str(path), "--socket", str(tmp_path / "none.sock")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}:5: parameters.lora_rnak: not a training config key" in proc.stderr
    assert "did you mean 'lora_rank'?" in proc.stderr


def test_shipped_sweep_file_loads():
    """configs/sweeps/: every shipped sweep file is valid against the shipped base config it names."""
    shipped = sorted((Path(__file__).resolve().parents[1] / "configs/sweeps").glob("*.yaml"))
    assert shipped
    for p in shipped:
        sweep = load_sweep(p)
        assert sweep.spec.objective == "val_loss" and sweep.base_path.is_file()


def test_grid_sweep_visits_every_point_once_by_ask_and_tell(tmp_path):
    """Optuna's GridSampler calls study.stop() when its grid is used up, which raises outside optimize();
    the sweep's ask-and-tell grid must tell the last point without it."""
    from agentd.sweep import study as st
    from agentd.sweep.spec import suggest

    text = GOOD.replace("{range: [1.0e-4, 1.0e-2], log: true}", "{grid: [1.0e-3, 1.0e-2]}").replace(
        "trials: 6", "trials: 4") + "sampler: grid\n"
    sweep = load_sweep(write(tmp_path, text))
    study = st.load_study(sweep)
    seen = set()
    for _ in range(4):
        trial = study.ask()
        values = {n: suggest(trial, n, p) for n, p in sweep.spec.parameters.items()}
        seen.add((values["learning_rate"], values["lora_rank"]))
        study.tell(trial, 1.0)
    assert seen == {(lr, r) for lr in (1e-3, 1e-2) for r in (2, 4)}


def test_parallel_above_the_slots_is_a_warning_not_an_error():
    assert parallel_warning(1, 1) is None and parallel_warning(2, 4) is None
    assert parallel_warning(3, 1) == ("parallel: 3 is more than this box's 1 slot(s): 2 of the trials at a time "
                                      "wait in the queue")
