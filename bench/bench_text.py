"""Text mode throughput: tokens per second of our trainer with packing off and on, and of a textbook
transformers + peft loop, on the tiny chat model (`trainer.dev.tiny.build_tiny_chat_llm`) and the same chat data.

    python bench/bench_text.py                  # 96 conversations, max_seq_length 256, batch 4, each run twice
    python bench/bench_text.py --hidden 256 --layers 4    # a wider model: compute, not overhead, per token
    options: --steps N (timed steps per run)  --warmup N  --repeat N  --threads N (default 1)
             --hidden N --layers N (model size; default the tests' tiny chat model)  --max-turns N

Data: sharegpt conversations of 1-4 question/answer turns (40-250 tokens after the chat template), so a
batch of unpacked samples is padded to its longest, as real chat data is. Runs, same model, rank 8 on
q/k/v/o_proj, AdamW, lr 1e-4, batch 4, grad clipping 1.0:

    textbook     the loop of the transformers/peft docs written out below: apply_chat_template(tokenize=True)
                 per record, `get_peft_model`, a shuffled DataLoader whose collate pads to the longest
                 (DataCollatorForSeq2Seq's behaviour), model(**batch, labels=...) computing the loss,
                 backward, clipping, AdamW, zero_grad, loss.item()
    ours         `trainer.training.job.LoraTrainingJob` in-process (what lora-train runs), packing: false
    ours+packing the same with packing: true (rows of up to 256 tokens, position ids restarting per sample)

Reported: real (non-padding) tokens per CPU second of this process over the timed steps (model loading,
tokenization and the first --warmup steps excluded), and the padding share of what the model computed.
CPU time, not wall time: on a shared machine the wall clock also measures the neighbours. Each run happens in
this process one after the other; --repeat runs the set again in reverse order; the table keeps the best.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RANK, BATCH, LR, SEED, MAX_LEN = 8, 4, 1e-4, 7, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORDS = "red green blue yellow circle square triangle small large bright dark shape colour one two".split()


def build_data(folder: Path, count: int, max_turns: int) -> Path:
    """Sharegpt conversations of varied length (seeded)."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        turns = []
        for _ in range(rng.randint(1, max_turns)):
            turns += [{"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + "?"},
                      {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + "."}]
        rows.append({"conversations": turns})
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_ours(model: Path, data: Path, steps: int, warmup: int, packing: bool) -> dict:
    import yaml

    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        cfg = {"train_data_dir": str(data), "base_model": str(model), "lora_rank": RANK, "batch_size": BATCH,
               "learning_rate": LR, "seed": SEED, "max_seq_length": MAX_LEN, "packing": packing,
               "target_modules": TARGETS, "max_train_steps": steps + warmup, "save_steps": 10_000,
               "output_dir": str(Path(tmp) / "out")}
        path = Path(tmp) / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        stamps: list[float] = []

        class Clock:
            def emit(self, ev):
                if ev["type"] == "step":
                    stamps.append(time.process_time())

        job = LoraTrainingJob(preflight(path), Clock())
        job.setup()
        try:
            rows = job.dataset.samples
            batches = [b for e in range(4) for b in job._epoch_batches(e)][: steps + warmup]
            job.train()
        finally:
            job.cleanup()
    timed = batches[warmup:]
    real = sum(len(rows[i].ids) for b in timed for i in b)
    computed = sum(len(b) * max(len(rows[i].ids) for i in b) for b in timed)
    return {"tokens": real, "cpu_s": stamps[-1] - stamps[warmup - 1], "padding": 1 - real / computed}


def run_textbook(model_dir: Path, data: Path, steps: int, warmup: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, task_type="CAUSAL_LM"))
    role = {"human": "user", "gpt": "assistant"}
    encoded = []
    for line in data.read_text().splitlines():
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in json.loads(line)["conversations"]]
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"][:MAX_LEN]
        encoded.append(ids)

    def collate(rows):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    loader = DataLoader(encoded, batch_size=BATCH, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(SEED))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    stamps, real, computed, step = [], 0, 0, 0
    while step < steps + warmup:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            stamps.append(time.process_time())
            if step >= warmup:
                real += int(batch["attention_mask"].sum())
                computed += batch["input_ids"].numel()
            step += 1
            if step == steps + warmup:
                break
    return {"tokens": real, "cpu_s": stamps[-1] - stamps[warmup - 1], "padding": 1 - real / computed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--conversations", type=int, default=96)
    p.add_argument("--hidden", type=int, default=32, help="model width (32: the tests' tiny chat model)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-turns", type=int, default=4, help="question/answer pairs per conversation, at most")
    args = p.parse_args()
    os.environ.setdefault("AGENTD_CACHE_DIR", tempfile.mkdtemp(prefix="bench-cache-"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from trainer.quiet import quiet_libraries
    from trainer.dev.tiny import build_tiny_chat_llm

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench-text-data-") as tmp:
        model = build_tiny_chat_llm(Path(tmp) / "model", hidden=args.hidden, layers=args.layers)
        data = build_data(Path(tmp), args.conversations, args.max_turns)
        runs = {"textbook": lambda: run_textbook(model, data, args.steps, args.warmup),
                "ours": lambda: run_ours(model, data, args.steps, args.warmup, packing=False),
                "ours+packing": lambda: run_ours(model, data, args.steps, args.warmup, packing=True)}
        results: dict[str, list[dict]] = {k: [] for k in runs}
        for r in range(args.repeat):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                results[name].append(runs[name]())
    rate = {k: [x["tokens"] / x["cpu_s"] for x in v] for k, v in results.items()}
    base = max(rate["textbook"])
    print(f"chat model hidden {args.hidden} x {args.layers} layers, {args.conversations} conversations of 1-"
          f"{args.max_turns} turns, max_seq_length {MAX_LEN}, batch {BATCH}, "
          f"{args.steps} timed steps, {torch.get_num_threads()} thread(s)")
    print(f"{'run':<14}{'tokens/s (best)':>16}{'every run':>26}{'padding':>9}{'vs textbook':>13}")
    for name, rates in rate.items():
        pad = results[name][0]["padding"]
        print(f"{name:<14}{max(rates):>16.0f}{', '.join(f'{r:.0f}' for r in rates):>26}{pad:>9.0%}"
              f"{max(rates) / base:>12.2f}x")


if __name__ == "__main__":
    main()
