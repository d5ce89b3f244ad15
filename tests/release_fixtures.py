"""Run folders as a finished job leaves them (run.json with status/name/run_id/git/jenkins/training_fields, the
LoRA beside it, eval/decision.json in the evaluation's contract shape), without training: releases read only
these. Also a local S3 (moto's ThreadedMotoServer on 127.0.0.1, driven by boto3 over HTTP)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def make_run(folder: Path, name: str = "style", *, seed: int = 0, family: str = "sd", rank: int = 4,
             decision: dict | None = None, status: str = "succeeded", size: int = 64,
             modules_to_save=None) -> Path:
    """A run folder: `<name>.safetensors` (image families) or `<name>-peft/` (causal_lm) of distinct content."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {"lora_unet_mid_block_attentions_0_to_q.lora_down.weight": rng.standard_normal((rank, size),
                                                                                           dtype=np.float32),
               "lora_unet_mid_block_attentions_0_to_q.lora_up.weight": rng.standard_normal((size, rank),
                                                                                         dtype=np.float32)}
    if family == "causal_lm":
        peft = folder / f"{name}-peft"
        peft.mkdir(exist_ok=True)
        save_file(tensors, str(peft / "adapter_model.safetensors"))
        (peft / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": rank, "peft_type": "LORA",
                                                              "modules_to_save": modules_to_save}))
        mode = "text"
    else:
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"ss_network_dim": str(rank)})
        mode = "image"
    run = {"name": name, "status": status, "run_id": f"20261205-0000{seed:02d}-abcdef",
           "training_fields": {"mode": mode, "model_family": family, "base_model": str(folder / "no-base"),
                               "lora_rank": rank},
           "git": {"commit": "0" * 39 + str(seed % 10), "dirty": False},
           "jenkins": {"BUILD_URL": f"https://ci.example/job/x/{seed}/"}}
    (folder / "run.json").write_text(json.dumps(run))
    if decision is not None:
        (folder / "eval").mkdir(exist_ok=True)
        (folder / "eval" / "decision.json").write_text(json.dumps(decision))
    return folder


def decision(overall: str, against_release: str | None, delta: float = 0.02) -> dict:
    """eval/decision.json exactly as the evaluation (issue 21) writes it."""
    return {"overall": overall,
            "against": {"kind": "production" if against_release else "base", "lora": None, "release": against_release},
            "metrics": {"clip_t": {"decision": overall, "delta": delta, "ci95": [delta - 0.01, delta + 0.01],
                                   "margin": 0.005, "candidate_mean": 0.3 + delta, "comparison_mean": 0.3}},
            "reason": f"clip_t {overall}"}


class LocalS3:
    """moto's S3 server on 127.0.0.1 and a free port, with a bucket."""

    def __init__(self, bucket: str = "loras"):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.bucket = bucket
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def stop(self):
        self.server.stop()
