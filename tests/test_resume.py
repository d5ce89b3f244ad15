"""Resume after every kind of interruption, exactly: real processes, real signals, bit-identical LoRAs."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, write_config
from tests.daemon_harness import DaemonProc, Tail
from tests.waiting import wait_for

STEPS, SAVE = 36, 10  # checkpoints at 10, 20, 30; interruptions land between 21 and 29


def config(tmp_path: Path, assets, name: str, **fields) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    base = dict(max_train_steps=STEPS, save_steps=SAVE, keep_checkpoints=5, log_every=1, seed=11)
    return write_config(folder, assets, **{**base, **fields})


def loss_rows(cfg: Path) -> list[dict]:
    from trainer.runs.outputs import read_loss_csv

    path = cfg.parent / "out/logs/loss.csv"
    if not path.exists():
        return []
    try:
        return read_loss_csv(path)
    except Exception:
        return []


def wait_rows(cfg: Path, at_least: int, proc=None, timeout=240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(loss_rows(cfg))
        if n >= at_least:
            return n
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before step {at_least}")
        time.sleep(0.02)
    raise AssertionError(f"never reached step {at_least}")


def lora(cfg: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(cfg.parent / "out/out.safetensors"))


def assert_identical(a: Path, b: Path) -> None:
    la, lb = lora(a), lora(b)
    assert la.keys() == lb.keys()
    assert all(torch.equal(la[k], lb[k]) for k in la), "final LoRA tensors differ"
    ra, rb = loss_rows(a), loss_rows(b)
    assert [int(r["step"]) for r in rb] == list(range(1, STEPS + 1)), "each step exactly once"
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb]
    events = [json.loads(x) for x in (b.parent / "out/logs/events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, STEPS + 1))


def kill_foreground_after(cfg: Path, rows: int, then_wait: float = 0.0) -> None:
    """Run `lora-train` and SIGKILL it once loss.csv has `rows` steps (plus `then_wait` seconds)."""
    proc = subprocess.Popen([str(BIN / "lora-train"), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_rows(cfg, rows, proc)
    time.sleep(then_wait)
    proc.kill()
    proc.wait()


def train_foreground(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lora-train"), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=600)


def uninterrupted_run(built_once, name: str, assets, **fields) -> Path:
    """The config of an uninterrupted `lora-train` run, trained once for the session (the tests only read it)."""
    def build(folder: Path) -> None:
        proc = train_foreground(config(folder, assets, "ref", **fields))
        assert proc.returncode == 0, proc.stderr

    return built_once(name, build) / "ref" / "train.yaml"


@pytest.fixture(scope="module")
def reference(built_once, assets) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    return uninterrupted_run(built_once, "resume-reference", assets)


@pytest.fixture(scope="module")
def reference_accum(built_once, assets) -> Path:
    return uninterrupted_run(built_once, "resume-reference-accum", assets, batch_size=2, gradient_accumulation_steps=2)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_daemon_interrupted_and_restarted_resumes_bit_identical(how, reference, tmp_path, assets):
    d = DaemonProc(tmp_path / "daemon-state").start() if (tmp_path / "daemon-state").mkdir() is None else None
    cfg = config(tmp_path, assets, "job")
    client = Tail(d.agentd("run", str(cfg), "--reconnect-timeout", "240"))
    try:
        wait_rows(cfg, 22, client.proc)
        if how == "SIGKILL":
            d.kill()  # mid-step, like a crash or a power cut
        else:
            assert d.stop(signal.SIGTERM, timeout=120) == 0  # systemctl stop: checkpoint, journal interrupted
            (row,) = d.journal_rows("SELECT state FROM jobs")
            assert row["state"] == "interrupted"
            steps = sorted(p.name for p in (cfg.parent / "out/checkpoints").iterdir())
            assert steps[-1] > "step-00000020", "SIGTERM wrote a checkpoint at the step boundary"
        client.until("retry")  # the following client retries the socket, printing each try
        d.start()
        code, lines = client.finish(timeout=600)
        text = "\n".join(lines)
        assert code == 0, text
        assert "re-attached to job-000001" in text and "resumed from step" in text and "succeeded" in text
    finally:
        d.stop()
    assert_identical(reference, cfg)
    assert len(d.journal_rows("SELECT id FROM jobs")) == 1
    states = [t["state"] for t in d.journal_rows("SELECT state FROM transitions ORDER BY rowid")]
    assert "interrupted" in states and states[-1] == "succeeded"
    run = json.loads((cfg.parent / "out/run.json").read_text())
    assert len(run["resumes"]) == 1 and run["resumes"][0]["from_step"] in (20, 21, 22, 23, 24, 25, 26, 27, 28, 29)
    assert "interrupt" in run["resumes"][0]["why"]


def test_jenkins_abort_then_second_run_resumes_bit_identical(reference, tmp_path, assets):
    d = DaemonProc(tmp_path / "daemon-state").start() if (tmp_path / "daemon-state").mkdir() is None else None
    try:
        cfg = config(tmp_path, assets, "job")
        first = Tail(d.agentd("run", str(cfg)))
        wait_rows(cfg, 23, first.proc)
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish()[0] == 3
        second = d.run("run", str(cfg), timeout=600)
        assert second.returncode == 0, second.stdout
        assert "resumed from step" in second.stdout
    finally:
        d.stop()
    assert_identical(reference, cfg)


def test_grad_accumulation_killed_between_micro_batches(reference_accum, tmp_path, assets):
    cfg = config(tmp_path, assets, "acc", batch_size=2, gradient_accumulation_steps=2)
    kill_foreground_after(cfg, 24, then_wait=0.05)  # inside the next step: between its micro-batches
    again = train_foreground(cfg)
    assert again.returncode == 0, again.stderr
    assert "resumed from step" in again.stdout
    assert_identical(reference_accum, cfg)


def test_truncated_newest_checkpoint_falls_back_to_previous(reference, tmp_path, assets):
    cfg = config(tmp_path, assets, "trunc")
    kill_foreground_after(cfg, 23)
    newest = cfg.parent / "out/checkpoints/step-00000020/optimizer.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut a file in half
    again = train_foreground(cfg)
    assert again.returncode == 0, again.stderr
    assert "WARNING: checkpoint" in again.stdout and "step-00000020" in again.stdout
    assert "resumed from step 10" in again.stdout
    assert_identical(reference, cfg)


def test_resume_policy_config_changes(tmp_path, assets):
    cfg = config(tmp_path, assets, "policy")
    kill_foreground_after(cfg, 12)
    original = cfg.read_text()

    cfg.write_text(original.replace("learning_rate: 2e-3", "learning_rate: 1e-3") + "resume: strict\n")
    refused = train_foreground(cfg)  # strict: today's refusal, nothing moved
    assert refused.returncode == 2
    assert "learning_rate" in refused.stderr and "0.002 -> 0.001" in refused.stderr
    assert "resume: auto" in refused.stderr and "resume: never" in refused.stderr
    assert not (cfg.parent / "out/runs").exists()

    changed = original.replace("learning_rate: 2e-3", "learning_rate: 1e-3")
    cfg.write_text(changed)
    fresh = train_foreground(cfg)  # auto: the changed config starts a new run, the interrupted one is kept
    assert fresh.returncode == 0 and "resumed from" not in fresh.stdout
    assert "config changed since the interrupted run" in fresh.stdout and "learning_rate 0.002 -> 0.001" in fresh.stdout
    assert [int(r["step"]) for r in loss_rows(cfg)] == list(range(1, STEPS + 1))
    (kept,) = (cfg.parent / "out/runs").iterdir()
    assert json.loads((kept / "run.json").read_text())["status"] == "running"  # killed: it never wrote more

    cfg.write_text(changed + "resume: never\n")
    proc = subprocess.Popen([str(BIN / "lora-train"), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list((cfg.parent / "out/runs").iterdir())) == 2, timeout=240, what="the finished run moved")

    def new_run_rows() -> int:
        """Steps of the new run: not the moved run's loss.csv, which stays in out/ until its move ends."""
        try:
            run_id = json.loads((cfg.parent / "out/run.json").read_text())["run_id"]
        except (OSError, ValueError, KeyError):
            return 0
        return 0 if (cfg.parent / "out/runs" / run_id).exists() else len(loss_rows(cfg))

    wait_for(lambda: new_run_rows() >= 12 or proc.poll() is not None, timeout=240, what="the new run's step 12")
    assert proc.poll() is None, "the new run ended before step 12"
    proc.kill()  # a new run again, interrupted
    proc.wait()
    cfg.write_text(changed.replace("save_steps: 10", "save_steps: 7"))  # cadence only: resumes
    resumed = train_foreground(cfg)
    assert resumed.returncode == 0 and "resumed from step 10" in resumed.stdout
    assert len(list((cfg.parent / "out/runs").iterdir())) == 2


def test_checkpoint_contents_and_safe_loading(reference):
    from trainer.runs.checkpoint import list_checkpoints, load_checkpoint, verify

    ckpts = list_checkpoints(reference.parent / "out/checkpoints")
    assert [p.name for p in ckpts] == ["step-00000036", "step-00000030", "step-00000020", "step-00000010"]
    assert verify(ckpts[0]) is None
    data = load_checkpoint(ckpts[0])
    st = data["state"]
    assert st["train_state"]["global_step"] == 36 and st["data_fingerprint"] and st["config_hash"]
    assert set(data["rng"]) == {"torch", "cuda", "numpy", "python"}  # per-sample draws are keyed, not carried
    manifest = json.loads((ckpts[0] / "manifest.json").read_text())
    assert set(manifest) == {"lora.safetensors", "optimizer.pt", "rng.pt", "state.json"}


def bucketed_dataset(folder: Path) -> Path:
    """Mixed aspect ratios in N_name folders with tag captions: buckets, repeats and caption draws in one."""
    from PIL import Image, ImageDraw

    sizes = [(32, 32), (48, 24), (24, 48), (40, 32), (32, 40)]
    for sub, count in (("2_red", 3), ("1_blue", 4)):
        for i in range(count):
            w, h = sizes[(i + count) % len(sizes)]
            im = Image.new("RGB", (w, h), (255, 255, 255))
            ImageDraw.Draw(im).ellipse((4, 4, w - 4, h - 4), fill=(220, 40, 40) if sub == "2_red" else (40, 40, 220))
            (folder / sub).mkdir(parents=True, exist_ok=True)
            im.save(folder / sub / f"{i}.png")
            (folder / sub / f"{i}.txt").write_text(f"{sub[2:]}, circle, photo, white background")
    return folder


BUCKETED = dict(enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8, batch_size=2,
                metadata_path=None, cache_latents=False, center_crop=False, shuffle_caption=True, keep_tokens=1,
                caption_tag_dropout_rate=0.2, noise_offset=0.05, min_snr_gamma=5.0)


def test_bucketed_dataset_killed_resumes_bit_identical(tmp_path, assets):
    """Buckets, repeats, random crops and caption draws: SIGKILL mid-run, rerun, same LoRA as uninterrupted."""
    data = bucketed_dataset(tmp_path / "data")
    ref = config(tmp_path, assets, "ref", train_data_dir=str(data), **BUCKETED)
    assert train_foreground(ref).returncode == 0
    cfg = config(tmp_path, assets, "killed", train_data_dir=str(data), **BUCKETED)
    kill_foreground_after(cfg, 23)
    again = train_foreground(cfg)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 20" in again.stdout
    assert_identical(ref, cfg)
