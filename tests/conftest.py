"""Shared fixtures: the tiny models and datasets, built once per test session (no model hub)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# One intra-op thread per torch process: the suite runs a daemon, its clients and the test process side by
# side on 2 cores, and OpenMP threads spinning against each other there make tiny-model steps 5x slower.
# Subprocesses (agentd serve, lora-train) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD model, tiny LM, shapes and text datasets (cached for the session in AGENTD_CACHE_DIR)."""
    cache = tmp_path_factory.getbasetemp() / "agentd-cache"
    os.environ["AGENTD_CACHE_DIR"] = str(cache)
    from trainer.dev.tiny import demo_assets

    return demo_assets(cache)


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
    base.update(fields)
    import yaml

    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}, sort_keys=False))
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
