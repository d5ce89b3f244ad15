"""Does pruning pay? One tiny sweep with and without the median pruner, through a real daemon.

    python bench/bench_sweep.py                  # 8 trials each (~3-6 min on the 2-core machine)
    options: --trials N  --steps N (per trial, default 12)  --keep (keep the temp folder)

Both sweeps are the same file (tiny SD + shapes at 32 px, learning_rate log-range x lora_rank choices, TPE,
seed 5, validation every 2 steps on a 12.5% split) but for `pruner: none` vs `pruner: median` (warm-up 4
steps, 2 startup trials), run one after the other by one `agentd serve` (so the second has the warm model
cache too; the steps count, not the seconds, is the figure). Reported: total optimizer steps of all trials
(the GPU-time equivalent), the ratio, the trials pruned, and whether both sweeps name the same best trial.
The TPE proposals depend on the values told so far, and a pruned trial tells its last intermediate value,
so after the first pruning the two sweeps may propose different trials: the best may differ for that reason.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "HF_HUB_OFFLINE": "1"}


def write_base(folder: Path, steps: int) -> Path:
    import yaml

    from trainer.dev.demo import write_demo_config

    path = write_demo_config(folder)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(max_train_steps=steps, log_every=1, save_steps=2, validate_every_n_steps=2, validation_split=0.125,
               resolution=32, seed=7, keep_checkpoints=1, output_dir=str(folder / "unused"))
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_sweep(folder: Path, base: Path, name: str, pruner: str, trials: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"""name: {name}
base_config: {base}
parameters:
  learning_rate: {{range: [1.0e-4, 5.0e-2], log: true}}
  lora_rank: {{choices: [2, 4, 8]}}
sampler: tpe
seed: 5
trials: {trials}
pruner: {pruner}
pruner_warmup_steps: 4
pruner_startup_trials: 2
""")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    rundir = Path(tempfile.mkdtemp(prefix="bsw-"))
    sock = rundir / "s"
    settings = tmp / "agentd.yaml"
    settings.write_text(f"socket: {sock}\nstate_dir: {tmp / 'state'}\ncache_dir: {tmp / 'cache'}\n")
    base = write_base(tmp / "cfg", args.steps)
    daemon = subprocess.Popen([str(BIN / "agentd"), "serve", "--config", str(settings)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "daemon.log", "w"))
    try:
        while not sock.exists():
            time.sleep(0.1)
        results = {}
        for pruner in ("none", "median"):
            name = f"bench-{pruner}"
            path = write_sweep(tmp, base, name, pruner, args.trials)
            started = time.monotonic()
            proc = subprocess.run([str(BIN / "agentd"), "sweep", "run", str(path), "--socket", str(sock)], env=ENV,
                                  capture_output=True, text=True)
            seconds = time.monotonic() - started
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
            status = json.loads(subprocess.run([str(BIN / "agentd"), "sweep", "status", name, "--json", "--socket",
                                                str(sock)], env=ENV, capture_output=True, text=True).stdout)
            trials = status["trials"]
            results[pruner] = {"steps": sum(t["steps"] or 0 for t in trials), "seconds": seconds,
                               "pruned": sum(t["state"] == "pruned" for t in trials),
                               "best": status["best"]["number"], "best_value": status["best"]["value"],
                               "best_params": status["best"]["params"]}
    finally:
        daemon.terminate()
        daemon.wait(60)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(rundir, ignore_errors=True)
    none, median = results["none"], results["median"]
    print(f"{args.trials} trials x {args.steps} steps, tiny SD 32 px, TPE seed 5")
    print("| pruner | total steps | pruned trials | wall s | best trial (val_loss) |")
    print("|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['steps']} | {r['pruned']} | {r['seconds']:.1f} | {r['best']:03d} "
              f"({r['best_value']:.4f}) |")
    same = (none["best"], none["best_params"]) == (median["best"], median["best_params"])
    print(f"median pruner: {median['steps'] / none['steps']:.2f}x the steps ({none['steps'] - median['steps']} "
          f"saved); same best trial: {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
