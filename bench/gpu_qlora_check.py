#!/usr/bin/env python
"""GPU check of text mode's QLoRA: a real job (`api.preflight`, `api.run_job`, packing, merged export) on a
TinyLlama-1.1B-shaped model, bf16 base vs `quantization: 4bit` vs `8bit`, measured peak against the estimate.

Run on a GPU box (or a lent GPU):

    .venv/bin/python bench/gpu_qlora_check.py              # 1.1B shape, max_seq_length 512, batch 2, 12 steps
    .venv/bin/python bench/gpu_qlora_check.py --layers 4   # a quicker, smaller model of the same width

The model has random weights (bf16, saved once to a temporary folder; nothing is downloaded) and the tiny chat
model's character tokenizer and ChatML template (`trainer.dev.tiny.build_tiny_chat_llm`), so the vocabulary is
small: the quantized share of the weights is the decoder's linear layers, as in a real model. For each case
it prints the estimate (`agentd validate`'s figure), `torch.cuda.max_memory_allocated`, tokens/s, and checks
that the merged export loads with transformers and matches the trained model's logits. Without CUDA it says
so and exits 0 (the CPU tests cover the code path: tests/test_text_chat.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(folder: Path, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.dev.tiny import build_tiny_chat_llm

    tok_dir = build_tiny_chat_llm(folder.with_name("tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def run_case(model: Path, data: Path, work: Path, quantization: str | None, steps: int) -> dict:
    import threading

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from trainer import api

    out = work / f"out-{quantization or 'bf16'}"
    cfg = {"train_data_dir": str(data), "base_model": str(model), "output_dir": str(out), "name": "chk",
           "quantization": quantization, "mixed_precision": "bf16", "gradient_checkpointing": True,
           "packing": True, "max_seq_length": 512, "batch_size": 2, "lora_rank": 16, "learning_rate": 2e-4,
           "max_train_steps": steps, "save_steps": 10_000, "export_merged": True, "resume": "never"}
    path = work / f"{quantization or 'bf16'}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    checked = api.preflight(path)
    estimate = api.estimate_for_config(checked.config)
    torch.cuda.reset_peak_memory_stats()
    stamps = []

    class Clock:
        def emit(self, ev):
            if ev["type"] == "step":
                stamps.append(time.perf_counter())

    result = api.run_job(checked, Clock(), threading.Event())
    peak = torch.cuda.max_memory_allocated() / 2**20
    rows = checked.scan.samples
    tokens = sum(len(r.ids) for r in rows) / len(rows) * 2  # batch 2
    merged = AutoModelForCausalLM.from_pretrained(out / "chk-merged", dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([list(rows[0].ids)[:128]], device="cuda")
    with torch.no_grad():
        logits = merged(input_ids=ids).logits.float()
    finite = bool(torch.isfinite(logits).all())
    del merged
    torch.cuda.empty_cache()
    return {"case": quantization or "bf16", "outcome": result.outcome, "final_loss": result.final_loss,
            "estimate_mib": estimate.total_mib, "estimate_weights_mib": estimate.breakdown["weights"],
            "measured_peak_mib": round(peak), "tensor_estimate_mib": estimate.total_mib - estimate.breakdown["overhead"],
            "tokens_per_s": round(tokens * (len(stamps) - 2) / (stamps[-1] - stamps[1]), 1) if len(stamps) > 3 else None,
            "merged_loads_finite": finite}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: QLoRA needs one (the CPU tests cover the code path); nothing measured")
        return 0
    from trainer.quiet import quiet_libraries
    from trainer.dev.tiny import build_chat_datasets

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="qlora-check-"))
    try:
        model = build_model(work / "model", args.layers)
        data = build_chat_datasets(work / "data") / "sharegpt.jsonl"
        results = [run_case(model, data, work, q, args.steps) for q in (None, "8bit", "4bit")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"TinyLlama-1.1B shape ({args.layers} layers), packing, max_seq_length 512, batch 2, rank 16, bf16")
    print(f"{'case':<6}{'outcome':>10}{'est weights':>13}{'est total':>11}{'est tensors':>13}{'peak':>8}"
          f"{'peak/est':>10}{'tok/s':>9}{'merged ok':>11}")
    for r in results:
        print(f"{r['case']:<6}{r['outcome']:>10}{r['estimate_weights_mib']:>13}{r['estimate_mib']:>11}"
              f"{r['tensor_estimate_mib']:>13}{r['measured_peak_mib']:>8}"
              f"{r['measured_peak_mib'] / r['tensor_estimate_mib']:>10.2f}{r['tokens_per_s'] or 0:>9}"
              f"{str(r['merged_loads_finite']):>11}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["outcome"] == "succeeded" and r["merged_loads_finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
