"""Time to the first training step: a cold `lora-train` process vs jobs through a running daemon.

    python bench/bench_daemon.py                 # each scenario once (~1 min)
    python bench/bench_daemon.py --repeat 2      # the whole set twice, best and every run shown
    options: --steps N (per job, default 3)  --status-runs N (default 20)  --keep (keep the temp folder)

Scenarios, all on the tiny demo model and data (`trainer.dev.tiny.demo_assets()`, config from
`trainer.dev.demo.write_demo_config` with max_train_steps 3, log_every 1, resume never, save_steps 1000):

    cold lora-train     `lora-train --config X` as a fresh process: wall time from just before the process
                        is spawned to the first "step ..." line on its stdout (python start, imports of
                        torch/diffusers/transformers, config check, model load, latent cache, one step)
    daemon, 1st job     `agentd serve` started beforehand and ready (its own start-up time until `ping`
                        answers is reported separately), then `agentd run X`: wall time from spawning
                        `agentd run` to its first "step ..." line. The daemon has not yet imported the
                        trainer or loaded any model.
    daemon, 2nd job     a second `agentd run` on the same base model (other output_dir and seed) through
                        the same, now warm, daemon: trainer imported, base model in the warm cache

Also `agentd status` (plain text, a live daemon) latency, median of --status-runs, vs `python -c pass`
(the interpreter's own start-up, the floor for any Python CLI).

Every child runs with OMP_NUM_THREADS=1 (the 2-core machine is shared; see bench/README.md); stdout is
a pipe, so both commands print the plain one-line-per-event console output Jenkins sees. `--repeat` runs
the whole set again with a fresh daemon, in the other order (daemon first, then cold); the table shows
the best of the repeats and every run's figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.client import DaemonUnreachable, request  # noqa: E402  (at the top, so no ping times its import)

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "HF_HUB_OFFLINE": "1"}


def write_config(folder: Path, steps: int, seed: int) -> Path:
    """The demo config (tiny SD + shapes) with a short run that prints every step."""
    import yaml

    from trainer.dev.demo import write_demo_config

    path = write_demo_config(folder)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(max_train_steps=steps, log_every=1, save_steps=1000, resume="never", seed=seed,
               output_dir=str(folder / "out"))
    path.write_text(yaml.safe_dump(cfg))
    return path


def time_to_lines(cmd: list[str], marks: dict[str, str], timeout: float = 180) -> tuple[dict, list[str], int]:
    """Spawn `cmd`, stamp the first stdout line starting with each mark (seconds since spawn), wait for exit.

    Returns ({mark name: seconds, "exit": seconds}, lines, exit code)."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=ENV, cwd=str(ROOT))
    # A watchdog: a job that never finishes (a daemon bug) must not hang the bench; SIGKILL, since
    # `agentd run` answers SIGTERM by cancelling and then waiting for the daemon.
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    seen: dict[str, float] = {}
    lines: list[str] = []
    try:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append(line.rstrip("\n"))
            for name, prefix in marks.items():
                if name not in seen and line.startswith(prefix):
                    seen[name] = t
        code = proc.wait()
    finally:
        watchdog.cancel()
    seen["exit"] = time.perf_counter() - t0
    if code == -9:
        lines.append(f"(killed after {timeout:.0f} s)")
    return seen, lines, code


def start_daemon(root: Path) -> tuple[subprocess.Popen, Path, float, Path]:
    """`agentd serve` on a private socket; returns (process, socket, seconds until ping answered, log)."""
    rundir = Path(tempfile.mkdtemp(prefix="agdb-"))  # socket paths are limited to 107 bytes
    sock = rundir / "s"
    root.mkdir(parents=True, exist_ok=True)
    settings = root / "agentd.yaml"
    settings.write_text(f"socket: {sock}\nstate_dir: {root / 'state'}\ncache_dir: {root / 'cache'}\n")
    log = root / "daemon.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "agentd"), "serve", "--config", str(settings)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "a"), env=ENV)
    deadline = t0 + 60
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}:\n{log.read_text()}")
        try:
            if request(sock, {"op": "ping"}, timeout=2.0).get("ok"):
                return proc, sock, time.perf_counter() - t0, log
        except DaemonUnreachable:
            pass
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"daemon did not answer within 60 s:\n{log.read_text()}")


def stop_daemon(proc: subprocess.Popen, sock: Path) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(sock.parent, ignore_errors=True)


def median_runtime(cmd: list[str], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


STEP_MARKS = {"started": "training ", "first_step": "step "}


def one_round(tmp: Path, steps: int, status_runs: int, rnd: int) -> dict:
    out: dict = {}
    base = tmp / f"round{rnd}"

    def cold() -> None:  # (a) cold lora-train
        cfg = write_config(base / "cold", steps, seed=7)
        seen, lines, code = time_to_lines([str(BIN / "lora-train"), "--config", str(cfg)], STEP_MARKS)
        if code != 0 or "first_step" not in seen:
            raise RuntimeError("lora-train failed:\n" + "\n".join(lines))
        out["cold"] = seen

    def daemon_jobs() -> None:  # (b) + (c) through one daemon, started fresh
        daemon, sock, ready_s, log = start_daemon(base / "daemon")
        out["daemon_ready"] = ready_s
        try:
            for key, seed in (("first", 7), ("second", 8)):
                cfg = write_config(base / key, steps, seed=seed)
                seen, lines, code = time_to_lines(
                    [str(BIN / "agentd"), "run", str(cfg), "--socket", str(sock)],
                    {"submitted": "submitted ", **STEP_MARKS})
                if code != 0 or "first_step" not in seen:
                    raise RuntimeError(f"agentd run ({key}) exited {code}:\n" + "\n".join(lines)
                                       + "\n--- daemon log ---\n" + log.read_text()[-3000:])
                out[key] = seen
            status = json.loads(subprocess.run(
                [str(BIN / "agentd"), "status", "--json", "--socket", str(sock)],
                capture_output=True, text=True, env=ENV, check=True).stdout)
            out["model_cache"] = status.get("model_cache")
            out["status_s"], _ = median_runtime([str(BIN / "agentd"), "status", "--socket", str(sock)],
                                                status_runs)
        finally:
            stop_daemon(daemon, sock)

    # Alternate the order between rounds, so the page cache and drifting load favour neither side.
    for part in ((cold, daemon_jobs) if rnd % 2 == 0 else (daemon_jobs, cold)):
        part()
    med, _ = median_runtime([sys.executable, "-c", "pass"], status_runs)
    out["python_pass_s"] = med
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="run the whole set this many times (default 1)")
    p.add_argument("--steps", type=int, default=3, help="training steps per job (default 3)")
    p.add_argument("--status-runs", type=int, default=20, help="agentd status calls to time (default 20)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, outputs, logs)")
    args = p.parse_args(argv)

    from trainer.dev.tiny import demo_assets

    demo_assets()  # build once, outside the timings
    load = os.getloadavg()
    print(f"OMP_NUM_THREADS=1 for every child process; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; tiny demo model, {args.steps} steps per job, "
          f"log_every 1; seconds (lower is better)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    started = time.perf_counter()
    rounds = []
    try:
        for rnd in range(args.repeat):
            r = one_round(tmp, args.steps, args.status_runs, rnd)
            rounds.append(r)
            print(f"  [{rnd + 1}/{args.repeat}] to first step: cold {r['cold']['first_step']:.2f} s, "
                  f"daemon ready {r['daemon_ready']:.2f} s, 1st job {r['first']['first_step']:.2f} s, "
                  f"2nd job {r['second']['first_step']:.2f} s; status {1000 * r['status_s']:.0f} ms, "
                  f"python -c pass {1000 * r['python_pass_s']:.0f} ms; model cache {r['model_cache']}",
                  flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    def best(key, mark):
        return min(r[key][mark] for r in rounds)

    def every(key, mark):
        return " / ".join(f"{r[key][mark]:.2f}" for r in rounds)

    base = best("cold", "first_step")
    print()
    print(f"best of {args.repeat}; all times from spawning the command: 'submitted' = its 'submitted JOB' "
          "line (local config check +\nsubmit), 'setup' = the 'training ...' line (imports, config check, "
          "model load, latent cache), '1st step' = the\nfirst 'step ...' line, 'exit' = the process ended; "
          "ratios on '1st step' vs cold; 'every run' lists '1st step'")
    print(f"{'scenario':<34s} {'submitted':>9s} {'setup s':>8s} {'1st step s':>11s} {'vs cold':>8s} "
          f"{'exit s':>7s}   every run")
    rows = [("(a) cold lora-train", "cold"), ("(b) agentd run, fresh daemon", "first"),
            ("(c) agentd run, warm daemon", "second")]
    for label, key in rows:
        fs = best(key, "first_step")
        sub = f"{best(key, 'submitted'):9.2f}" if "submitted" in rounds[0][key] else f"{'-':>9s}"
        print(f"{label:<34s} {sub} {best(key, 'started'):8.2f} {fs:11.2f} {fs / base:7.2f}x "
              f"{best(key, 'exit'):7.2f}   {every(key, 'first_step')}")
    ready = min(r["daemon_ready"] for r in rounds)
    print(f"{'agentd serve start-up (to ping)':<34s} {'':9s} {'':8s} {ready:11.2f} {ready / base:7.2f}x "
          f"{'':7s}   " + " / ".join(f"{r['daemon_ready']:.2f}" for r in rounds))
    st = min(r["status_s"] for r in rounds)
    py = min(r["python_pass_s"] for r in rounds)
    print()
    print(f"agentd status (median of {args.status_runs}): {1000 * st:.0f} ms; "
          f"python -c pass: {1000 * py:.0f} ms; ratio {st / py:.1f}x  (every run: "
          + ", ".join(f"{1000 * r['status_s']:.0f}/{1000 * r['python_pass_s']:.0f}" for r in rounds) + " ms)")
    print(f"\nbench took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
