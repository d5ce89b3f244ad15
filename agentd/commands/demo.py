"""agentd demo: the main job on the embedded default, through a real daemon.

Starts `agentd serve` on a temporary socket and state folder, submits the tiny demo job through the
same client path as `agentd run`, streams it, prints where the outputs are, and stops the daemon.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd demo")
    p.add_argument("--dir", default="demo-output", help="where the demo config and outputs go")
    args = p.parse_args(argv)
    from agentd.client import DaemonUnreachable, request
    from agentd.commands.run import Follower
    from trainer.dev.demo import write_demo_config

    folder = Path(args.dir).resolve()
    print(f"building the tiny demo model and dataset (cached under {os.environ.get('AGENTD_CACHE_DIR') or '~/.cache/agentd'})",
          flush=True)
    config = write_demo_config(folder)
    runtime = Path(tempfile.mkdtemp(prefix="agentd-demo-"))  # short path: socket names are limited to 107 bytes
    sock = runtime / "agentd.sock"
    settings = runtime / "agentd.yaml"
    settings.write_text(f"socket: {sock}\nstate_dir: {folder / '.agentd-state'}\ncache_dir: {runtime / 'cache'}\n"
                        "slots: auto\n")
    print(f"starting an embedded agentd on {sock}", flush=True)
    daemon = subprocess.Popen([sys.executable, "-m", "agentd.cli", "serve", "--config", str(settings)],
                              stdout=subprocess.DEVNULL, stderr=open(runtime / "daemon.log", "w"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                request(sock, {"op": "ping"}, timeout=2)
                break
            except DaemonUnreachable:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print((runtime / "daemon.log").read_text(), file=sys.stderr)
                    print("agentd demo: the daemon did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(f"agentd run {config}", flush=True)
        msg = {"config_path": str(config), "config_text": config.read_text(), "env": {}}
        code = Follower(sock, reconnect_timeout=30).submit(msg)
        out = folder / "demo_lora"
        if code == 0:
            print("\noutputs:")
            for rel in ("demo_lora.safetensors", "report.html", "run.json", "config.yaml", "logs/loss.csv",
                        "logs/loss.png", "logs/events.jsonl", "samples/grid.png", "checkpoints/", "runs/"):
                print(f"  {out / rel}")
            print(f"\nnext: `lora-train validate {config}`; on a GPU box, `agentd serve` under systemd (README)")
        return code
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
