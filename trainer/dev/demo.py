"""The embedded default job: a tiny Stable Diffusion model, a small shapes dataset, a real training run."""
from __future__ import annotations

from pathlib import Path

from trainer.dev.tiny import demo_assets

DEMO_CONFIG = """\
# The demo job: a LoRA on a tiny random Stable Diffusion model, learning coloured shapes.
# Run:  agentd run {config}   (through a daemon)   or   lora-train --config {config}
mode: image
train_data_dir: {data}
metadata_path: {data}/metadata.csv
base_model: {model}
resolution: 32
lora_rank: 4
batch_size: 4
epochs: 10
learning_rate: 2e-3
lr_warmup_steps: 5
output_dir: {output}
save_steps: 20
log_every: 5
cache_latents: true
seed: 7
resume: never            # the demo trains from scratch every time; earlier runs move to demo_lora/runs/
keep_runs: 3
validation_split: 0.25   # 6 of the 24 shapes held out: validation loss in loss.csv and the report
sample_prompts: ["a red circle --s 10", "a blue square --s 10"]
sample_every_n_epochs: 5
"""


def write_demo_config(folder: str | Path, **overrides) -> Path:
    """Build (or reuse) the tiny assets and write a demo config under `folder`; returns its path."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    assets = demo_assets()
    path = folder / "demo.yaml"
    text = DEMO_CONFIG.format(config=path, data=assets["shapes"], model=assets["sd_model"],
                              output=folder / "demo_lora")
    for key, value in overrides.items():
        text += f"{key}: {value}\n"
    path.write_text(text)
    return path
