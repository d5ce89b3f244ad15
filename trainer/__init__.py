"""The YAML-driven LoRA trainer library (image mode: diffusers + peft; text mode: transformers + peft).

Layers, top to bottom; each imports only the ones below it (tests/test_layers.py keeps it so):

    cli.py, api.py   the face: `lora-train` and the one door agentd uses
    dev/             tiny models and the demo (tests, bench, `agentd demo`); production never imports it
    training/        the loop, validation loss, sampling rounds, optimizers, the warm model cache, preload
    checks/          preflight, the validate report, the VRAM estimate
    eval/            evaluation metrics (CLIP, DINO, aesthetic, text) and the A/B statistics, family-independent
    families/        everything that depends on which model
    runs/            the output folder: run history, checkpoints, logs, the report
    data/            image folders, text/chat records, prompt files, lint, kohya import
    config.py, errors.py, events.py, yaml_schema.py, quiet.py   the vocabulary every layer may import
"""
