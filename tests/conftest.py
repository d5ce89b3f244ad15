"""Shared fixtures: the tiny models and datasets, built once per test session (no model hub)."""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# One intra-op thread per torch process: the suite runs a daemon, its clients and the test process side by
# side on 2 cores, and OpenMP threads spinning against each other there make tiny-model steps 5x slower.
# Subprocesses (agentd serve, lora-train) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WARM = Path(__file__).parent / "warm"


def pytest_configure(config):
    """Each process that runs tests starts a warm interpreter (tests/warm/zygote.py: why and how) for the
    programs its tests start; the xdist controller, which runs none, does not."""
    controller = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    if controller or os.environ.get("AGENTD_TEST_COLD"):
        return
    import subprocess
    import tempfile

    socket_path = os.path.join(tempfile.mkdtemp(prefix="agz-"), "z")
    os.environ["AGENTD_TEST_WARM_SOCKET"] = socket_path
    os.environ["PYTHONPATH"] = os.pathsep.join([str(WARM), *filter(None, [os.environ.get("PYTHONPATH")])])
    config._warm_interpreter = subprocess.Popen(  # noqa: SLF001 - kept for pytest_unconfigure
        [sys.executable, str(WARM / "zygote.py"), socket_path], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_unconfigure(config):
    import subprocess

    zygote = getattr(config, "_warm_interpreter", None)
    if zygote is not None:
        zygote.terminate()
        try:
            zygote.wait(timeout=10)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait()
        shutil.rmtree(Path(os.environ["AGENTD_TEST_WARM_SOCKET"]).parent, ignore_errors=True)


@pytest.fixture(autouse=True)
def _close_test_daemons():
    """The daemons a test started through tests/daemon_harness.py stop, and their /tmp run folders go, when
    it ends (a test that fails half-way included). Only tests that imported the harness have any."""
    harness = sys.modules.get("tests.daemon_harness")
    before = len(harness.DaemonProc.created) if harness else 0
    yield
    harness = sys.modules.get("tests.daemon_harness")
    if harness:
        harness.DaemonProc.close_created_since(before)


@pytest.fixture(autouse=True)
def _environment_restored():
    """What a test sets in this process's environment ends with it, and so does what a library it imports here
    sets (scikit-learn KMP_*, huggingface_hub HF_XET_*, the text evaluation HF_DATASETS_OFFLINE): later tests'
    programs start with the worker's own environment, not a neighbour's, and the warm interpreter does not run
    them cold for a variable read at import that differs (tests/warm/sitecustomize.py; measured: 28 programs of
    one suite run went cold that way)."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """`built_once(name, build)` -> the folder `build(folder)` filled, built once per test session however
    many pytest-xdist workers ask: the first builds it under a file lock, the others wait and reuse it.
    Only for what tests READ (a reference run, tiny models): a test that changed it would change it for all.
    """
    base = tmp_path_factory.getbasetemp()
    # Each xdist worker has its own basetemp (.../pytest-N/popen-gwK); the session's is its parent.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    def get(name: str, build) -> Path:
        folder, done = root / name, root / f"{name}.done"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                done.touch()
        return folder

    return get


@pytest.fixture(scope="session")
def assets(tmp_path_factory, built_once) -> dict[str, Path]:
    """Tiny SD/SDXL models, tiny LMs, shapes, text and chat datasets: built once for the session and shared
    by every worker. Each worker keeps its own AGENTD_CACHE_DIR (latent and text caches, model configs)."""
    os.environ["AGENTD_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "agentd-cache")
    from trainer.dev.tiny import demo_assets

    return demo_assets(built_once("tiny-assets", demo_assets))


@pytest.fixture
def shapes(assets, tmp_path) -> Path:
    """A private copy of the shapes dataset (tests may break it)."""
    dst = tmp_path / "data"
    shutil.copytree(assets["shapes"], dst)
    return dst


def write_config(folder: Path, assets: dict, **fields) -> Path:
    """A small image-mode config (tiny model, shapes data) with `fields` overriding; returns its path."""
    base = {
        "train_data_dir": str(assets["shapes"]),
        "metadata_path": str(assets["shapes"] / "metadata.csv"),
        "base_model": str(assets["sd_model"]),
        "resolution": 32, "lora_rank": 4, "batch_size": 4, "learning_rate": "2e-3",
        "max_train_steps": 6, "save_steps": 3, "log_every": 1, "cache_latents": True, "seed": 7,
        "output_dir": str(folder / "out"),
    }
    return write_train_yaml(folder, {**base, **fields})


def write_train_yaml(folder: Path, fields: dict) -> Path:
    """folder/train.yaml with `fields` in their order, those set to None left out (how a test drops one of
    its helper's defaults); returns its path."""
    import yaml

    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in fields.items() if v is not None}, sort_keys=False))
    return path


def lora_at_step_zero(config_path: Path) -> dict:
    """The LoRA tensors a job holds after setup, before its first step (init or resume applied)."""
    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    job = LoraTrainingJob(preflight(config_path))
    job.setup()
    try:
        return job.task.lora_state()
    finally:
        job.cleanup()


@pytest.fixture
def venv():
    """A fake venv that user agentd could reach (`agentd install-service` checks it can run the interpreter):
    pytest's own tmp folders are private (0700)."""
    top = Path(tempfile.mkdtemp(prefix="agentd-install-"))
    top.chmod(0o755)
    v = top / "opt" / "agentd venv"  # a space, to check the quoting of ExecStart=
    (v / "bin").mkdir(parents=True)
    exe = v / "bin" / "agentd"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    yield v
    shutil.rmtree(top)
