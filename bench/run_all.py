"""Run every CPU benchmark in bench/ one after another (`make bench`). GPU checks: bench/gpu_check.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = ["bench_train.py", "bench_daemon.py", "bench_checkpoint.py", "bench_warm_cache.py", "bench_sampling.py", "bench_text.py",
           "bench_flux.py", "bench_latent_cache.py", "bench_network.py", "bench_sweep.py"]

if __name__ == "__main__":
    failed = 0
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        failed |= subprocess.call([sys.executable, str(HERE / name)])
    sys.exit(failed)
