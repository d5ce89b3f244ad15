"""The evaluation stage (issue 21): decisions on fixed arrays (golden values), the metric models on tiny
random CLIP / ViT / DINOv2 folders, every bad input of the `eval:` block, and through the daemon a normal
run and one made worse on purpose (learning rate far too high), the latter exiting 6."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.daemon_harness import DaemonProc
from trainer.eval import stats

ROOT = Path(__file__).resolve().parents[1]


# --- the decision, pure --------------------------------------------------------------------------
def test_bootstrap_and_decisions_against_golden_values():
    assert stats.bootstrap_ci([0.5, -0.25, 1.0, 0.0, 0.75], 1000, 0) == (0.0, 0.8)
    assert stats.bootstrap_ci([0.3], 200, 5) == (0.3, 0.3)  # one pair: the interval is that point
    # 4 prompts x 2 seeds: per-prompt means 1.1, 0.95, 2.1, 0.6 against 1.0, 1.0, 2.0, 0.6
    d = stats.decide_metric("clip_t", [1.0, 1.2, 0.8, 1.1, 2.0, 2.2, 0.5, 0.7],
                            [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.6, 0.6], 4, 0.1, 1000, 0)
    assert d.decision == "no worse" and d.delta == pytest.approx(0.0375)
    assert d.ci95 == pytest.approx((-0.025, 0.1)) and (d.candidate_mean, d.comparison_mean) == (1.1875, 1.15)
    assert stats.decide_metric("clip_t", [1.0, 1.2, 0.8, 1.1, 2.0, 2.2, 0.5, 0.7], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.6, 0.6],
                               4, 0.0, 1000, 0).decision == "worse"  # -0.025 is below -0
    # perplexity: lower is better, so 10.5 against 11.0 is a positive difference
    p = stats.decide_metric("perplexity", [10, 12, 9, 11], [11, 11, 11, 11], 4, 0.5, 1000, 0)
    assert p.delta == 0.5 and p.ci95 == (-0.5, 1.5) and p.decision == "no worse"
    assert stats.decide_metric("dino", [0.9, 0.8], [0.5, 0.4], 2, 0.0).decision == "better"
    md = stats.MetricDecision
    dec = {"a": md("better", 1, (0.5, 1.5), 0, 1, 0), "b": md("worse", -1, (-2, -0.5), 0, 0, 1)}
    assert stats.overall(dec) == "worse" and stats.overall(dec, ["a"]) == "better" and stats.overall({}) == "unknown"
    assert stats.overall({"a": md("no worse", 0, (-0.1, 0.1), 0.2, 1, 1)}) == "no worse"
    assert stats.sign_test(9, 1) == 0.021484375 and stats.sign_test(5, 5) == 1.0 and stats.sign_test(0, 0) == 1.0


def test_which_checkpoints_are_scored_and_which_is_best():
    from trainer.training.evaluation import best_checkpoint, due_checkpoints

    folders = [Path(f"/x/step-{s:08d}") for s in (700, 600, 500, 400, 300, 250)]
    assert [s for s, _ in due_checkpoints(folders, 100, 2)] == [400, 600]  # 250: the final save, off the cadence
    assert [s for s, _ in due_checkpoints(folders, 100, 1)] == [300, 400, 500, 600, 700]
    assert due_checkpoints(folders, 100, None) == []
    means = {"step-1": {"clip_t": 20.0, "perplexity": 9.0}, "final": {"clip_t": 21.0, "perplexity": 9.5}}
    assert best_checkpoint(means, "clip_t") == "final" and best_checkpoint(means, "perplexity") == "step-1"


# --- the metric models ---------------------------------------------------------------------------
def test_identical_image_scores_one_and_scores_repeat_exactly(assets):
    from PIL import Image

    from trainer.eval.image_metrics import ImageScorer

    ref = Image.new("RGB", (32, 32), (220, 40, 40))
    other = Image.new("RGB", (32, 32), (40, 70, 220))
    for dino in (assets["dino_model"], assets["vit_model"]):
        scorer = ImageScorer(assets["clip_model"], dino, assets["aesthetic_head"] / "head.safetensors", [ref])
        first = scorer.score([ref, other], ["a red circle", "a blue square"])
        assert set(first) == {"clip_t", "clip_i", "dino", "aesthetic"}
        assert first["clip_i"][0] == pytest.approx(1.0, abs=1e-6) and first["dino"][0] == pytest.approx(1.0, abs=1e-6)
        assert first["clip_i"][1] < 0.999 and first["dino"][1] < 0.999
        assert scorer.score([ref, other], ["a red circle", "a blue square"]) == first


def test_batched_rendering_equals_one_render_per_prompt_and_seed(tmp_path, assets):
    """The evaluation renders prompts x seeds in batches (`render_batches`: alike settings, at most `size` per
    call), each (text, negative) encoded once: the images equal one `render_sample` per (prompt, seed), each
    from its CPU Generator(seed), to fp rounding: a batched UNet forward may sum in another order, so a value on
    the edge of an 8-bit step can round to its neighbour (seen: 1 value of 3072 off by 1/255). Asserted: every
    value within 1/255, at most 0.1% differing. Embeddings are kept across calls only while the text encoder
    carries no LoRA (a LoRA-trained one encodes differently per arm)."""
    import numpy as np
    import torch
    from PIL import Image

    from trainer import api, families
    from trainer.data.prompts import SamplePrompt
    from trainer.training.evaluation import render_batches

    prompts = [SamplePrompt(text, negative=negative, width=32, height=32, steps=2, seed=seed)
               for text, negative in (("a red circle", ""), ("a blue square", "blurry")) for seed in (0, 1, 2)]
    prompts.append(SamplePrompt("a red circle", width=40, height=40, steps=2, seed=0))
    batches = render_batches(prompts, size=4)
    assert batches == [[0, 1, 2, 3], [4, 5], [6]]
    cpu = torch.device("cpu")
    for train_text_encoder in (False, True):
        cfg = api.preflight(write_config(tmp_path, assets, train_text_encoder=train_text_encoder)).config
        fam = families.family(cfg.model_family)
        task = fam.make_task(cfg, fam.load_base(cfg, cpu, torch.float32), cpu)
        torch.manual_seed(0)
        for group in task.param_groups():  # a LoRA that changes the images (peft starts B at zero)
            for p in group["params"]:
                p.data.normal_(0, 0.2)
        task.eval()
        one = [task.render_sample(p, tmp_path / f"one-{n}") for n, p in enumerate(prompts)]
        encoded: dict = {}
        batched = {}
        for batch in batches:
            paths = task.render_batch([prompts[n] for n in batch], [tmp_path / f"batch-{n}" for n in batch], encoded)
            batched.update(zip(batch, paths))
        for n, path in enumerate(one):
            alone, together = (np.asarray(Image.open(p)).astype(int) for p in (path, batched[n]))
            assert np.abs(alone - together).max() <= 1 and (alone != together).mean() <= 0.001, (n, prompts[n])
        assert not np.array_equal(np.asarray(Image.open(one[0])), np.asarray(Image.open(one[1])))  # seeds differ
        assert sorted(encoded) == ([] if train_text_encoder else [("a blue square", "blurry"), ("a red circle", "")])
        task.detach()


def test_text_metrics():
    from trainer.eval.text_metrics import exact_match, normalise, rouge_l

    assert normalise("The  Answer, is: 42!") == "answer is 42"
    assert exact_match("the answer is 42.", "Answer is 42") == 1.0 and exact_match("41", "42") == 0.0
    assert rouge_l("a red circle", "a red circle") == 1.0 and 0 < rouge_l("a red square", "a red circle") < 1


# --- bad input: exit 2, field + fix, nothing written ---------------------------------------------
def _bad_inputs(tmp_path: Path, assets) -> list[tuple[dict, str, str]]:
    """(eval block, field, words of the message) per bad input of the issue's list."""
    refs = tmp_path / "refs"
    refs.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    train_image = sorted(p for p in Path(assets["shapes"]).iterdir() if p.suffix == ".png")[0]
    (refs / "copy.png").write_bytes(train_image.read_bytes())
    (tmp_path / "p.txt").write_text("a {trigger} circle\na cat --q 3\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "2+2", "answer": "4"}\n{"prompt": 3}\n')
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: my_task\ndataset_path: json\n")
    clip = str(assets["clip_model"])
    return [
        ({"clip_model": str(tmp_path / "nope"), "prompts": ["a"]}, "eval.clip_model", "is not a folder"),
        ({"clip_model": str(assets["dino_model"]), "prompts": ["a"]}, "eval.clip_model", "found Dinov2Model"),
        ({"dino_model": clip}, "eval.dino_model", "found CLIPModel"),
        ({"clip_model": clip, "prompts": ["a"], "reference_dir": str(empty)}, "eval.reference_dir", "holds no images"),
        ({"clip_model": clip, "prompts": ["a"], "reference_dir": str(refs)}, "eval.reference_dir",
         f"copy.png = {train_image}"),
        ({"clip_model": clip, "prompts": str(tmp_path / "p.txt")}, "eval.prompts", "p.txt:2"),
        ({"clip_model": clip, "prompts": str(tmp_path / "p.txt")}, "eval.prompts", "uses {trigger}"),
        ({"seeds": []}, "eval.seeds", "at least 1"),
        ({"clip_model": clip, "prompts": ["a"], "gate": {"clip_t": {"margin": -0.5}}}, "eval.gate.clip_t.margin",
         "greater than or equal to 0"),
        ({"compare_with": str(tmp_path / "no-run")}, "eval.compare_with", "names no run"),
        ({"eval_file": str(tmp_path / "bad.jsonl")}, "eval.eval_file", "bad.jsonl:2"),
        ({"lm_eval_tasks": ["gsm8k"], "lm_eval_task_dir": str(tasks)}, "eval.lm_eval_tasks", "found: my_task"),
        ({"clip_model": clip, "prompts": ["a"], "gate": {"dino": {"margin": 0.1}}}, "eval.gate.dino",
         "no model computes"),
    ]


def test_every_bad_eval_input_exits_2_naming_field_and_fix_nothing_written(tmp_path, assets, capsys):
    from trainer.api import validate_main

    for n, (block, field, words) in enumerate(_bad_inputs(tmp_path, assets)):
        folder = tmp_path / f"c{n}"
        folder.mkdir()
        cfg = write_config(folder, assets, eval=block)
        code = validate_main([str(cfg)])
        captured = capsys.readouterr()
        text = captured.err + captured.out
        assert code == 2, (block, text)
        assert field in text and words in text and "fix:" in text, (field, words, text)
        assert not (folder / "out").exists()


def test_production_without_a_release_is_refused_with_the_contract_message(tmp_path, assets):
    from trainer import api
    from trainer.errors import ConfigError

    cfg = write_config(tmp_path, assets, eval={"compare_with": "production"})
    checked = api.preflight(cfg)
    for resolver in (None, lambda name: None):
        with pytest.raises(ConfigError) as e:
            api.run_job(checked, None, threading.Event(), resolve_release=resolver)
        assert "no production LoRA for out yet: compare_with previous, or release one first" in str(e.value)
    assert not (tmp_path / "out").exists()
    from trainer.training.evaluation import against_for, production_release

    release = production_release(checked.config, lambda name: (tmp_path / f"{name}.safetensors", f"{name}@v3"))
    assert release == (tmp_path / "out.safetensors", "out@v3")
    against = against_for(checked.config, release=release)
    assert (against.kind, against.lora, against.release) == ("production", tmp_path / "out.safetensors", "out@v3")


# --- through the daemon --------------------------------------------------------------------------
def test_eval_through_the_daemon_normal_run_then_worse_run_exits_6(tmp_path, assets):
    """One daemon, two jobs on one output_dir: a normal run (compared with the base: no earlier run), then
    the same config with a learning rate far too high (its loss goes NaN), compared with the first."""
    from PIL import Image

    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("RGB", (32, 32), (220, 40, 40)).save(refs / "red.png")
    Image.new("RGB", (32, 32), (40, 70, 220)).save(refs / "blue.png")
    block = {"prompts": ["a {trigger} --s 1", "a blue square --s 1"], "trigger": "red circle", "seeds": [0],
             "reference_dir": str(refs), "clip_model": str(assets["clip_model"]),
             "dino_model": str(assets["dino_model"]), "aesthetic_head": str(assets["aesthetic_head"] / "head.safetensors"),
             "gate": {"clip_i": {"margin": 0.02}, "dino": {"margin": 0.02}}, "every_n_checkpoints": 2}
    cfg = write_config(tmp_path, assets, max_train_steps=3, save_steps=1, eval=block)
    out = tmp_path / "out"
    (tmp_path / "daemon").mkdir()
    daemon = DaemonProc(tmp_path / "daemon").start()
    try:
        first = daemon.run("run", str(cfg))
        decision = json.loads((out / "eval" / "decision.json").read_text())
        assert decision["against"] == {"kind": "base", "lora": None, "release": None}
        assert decision["overall"] in ("better", "no worse"), first.stdout
        assert first.returncode == 0, first.stdout + first.stderr
        assert "evaluation against base:" in first.stdout and "clip_i" in first.stdout
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        assert set(metrics["metrics"]) == {"clip_t", "clip_i", "dino", "aesthetic"}
        assert metrics["prompts"] == ["a red circle", "a blue square"] and metrics["seeds"] == [0]
        assert all(len(metrics["metrics"]["dino"][arm]["scores"]) == 2 for arm in ("candidate", "comparison", "base"))
        first_scores = metrics["metrics"]
        # every_n_checkpoints: 2 with a checkpoint per step: step 2 is scored beside the final LoRA, the best named
        assert set(metrics["checkpoints"]) == {"step-00000002", "final"}
        assert metrics["best_checkpoint"]["metric"] == "clip_i"
        best = max(metrics["checkpoints"], key=lambda n: metrics["checkpoints"][n]["clip_i"])
        assert metrics["best_checkpoint"]["name"] == best and f"the best checkpoint by clip_i is {best}" in first.stdout
        _base_arm_is_the_model_without_the_lora(out, assets)
        summary = (out / "logs" / "summary.csv").read_text().splitlines()
        assert {"eval_clip_t", "eval_clip_i", "eval_dino", "eval_aesthetic", "eval_decision"} <= set(summary[0].split(","))
        report = (out / "report.html").read_text()
        assert 'id="evaluation"' in report and "candidate | comparison | base" in report

        write_config(tmp_path, assets, max_train_steps=3, save_steps=1, eval=block, learning_rate="50")
        worse = daemon.run("run", str(cfg))
        assert worse.returncode == 6, worse.stdout + worse.stderr
        decision = json.loads((out / "eval" / "decision.json").read_text())
        assert decision["overall"] == "worse" and decision["against"]["kind"] == "previous"
        assert decision["against"]["lora"].startswith(str(out / "runs"))
        first_lora = Path(decision["against"]["lora"])
        assert "evaluation against previous: WORSE" in worse.stdout
        # The same LoRA scored twice gives identical numbers: the first run's LoRA, loaded from its file as
        # the second run's comparison arm, scores exactly what it scored as the first run's candidate.
        second = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
        for m in first_scores:
            assert second[m]["comparison"]["scores"] == first_scores[m]["candidate"]["scores"], m
            assert second[m]["base"]["scores"] == first_scores[m]["base"]["scores"], m
        # agentd eval through the same daemon: the worse run against the base model (its LoRA's images are
        # black, NaN weights), a job like any other: journaled, and exit 6 on worse.
        on_demand = daemon.run("eval", str(out), "--against", "base")
        assert on_demand.returncode == 6 and "evaluation against base: WORSE" in on_demand.stdout, on_demand
        assert json.loads((out / "eval" / "decision.json").read_text())["against"]["kind"] == "base"
        rows = daemon.journal_rows("SELECT state, evaluate FROM jobs ORDER BY seq")
        assert [r["state"] for r in rows] == ["succeeded"] * 3 and json.loads(rows[2]["evaluate"])["run"] == str(out)
        # compare_with: production on a daemon without releases: refused at submit (exit 2, the contract's
        # message), not when the job starts; no job journaled for it.
        (tmp_path / "prod").mkdir()
        production_cfg = write_config(tmp_path / "prod", assets, eval={**block, "compare_with": "production"})
        production = daemon.run("run", str(production_cfg))
        assert production.returncode == 2, production.stdout + production.stderr
        assert "eval.compare_with: no production LoRA for out yet: compare_with previous, or release one first" \
            in production.stderr
        assert len(daemon.journal_rows("SELECT id FROM jobs")) == 3
    finally:
        daemon.stop()
    jenkinsfile = (ROOT / "jenkins" / "Jenkinsfile").read_text()
    assert "if (code == 6)" in jenkinsfile and "unstable(" in jenkinsfile

    # On demand (agentd eval above), the run's LoRA loaded from its file and scored again gives the identical
    # numbers.
    rescored = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert all(rescored[m]["candidate"]["scores"] == second[m]["candidate"]["scores"] for m in second)
    _blind_ab_page_in_chromium(out, decision["against"]["lora"], tmp_path)

    # Against production (the first run's LoRA as the registry's release out@v1): decision.json names it.
    from trainer import api

    api.evaluate_run(out, None, against="production", resolve_release=lambda name: (first_lora, f"{name}@v1"))
    against = json.loads((out / "eval" / "decision.json").read_text())["against"]
    assert against == {"kind": "production", "lora": str(first_lora), "release": "out@v1"}

def _blind_ab_page_in_chromium(a: Path, b_lora: str, tmp_path: Path) -> None:
    """agentd ab A B --html: headless Chromium clicks and keys through every pair, reveals, and the votes the
    page would download are read back by `agentd ab --votes` (win rate, sign test)."""
    import re
    import shutil
    import subprocess

    from tests.conftest import BIN
    from tests.test_report import ARTIFACTS, CHROMIUM_FLAGS, chromium

    b = Path(b_lora).parent
    page = tmp_path / "ab.html"
    made = subprocess.run([str(BIN / "agentd"), "ab", str(a), str(b), "--html", str(page)], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0 and page.is_file(), made.stderr
    text = page.read_text()
    assert str(b) in text and "<img" in text and 'src="http' not in text  # self-contained
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary: install Debian's `chromium` package (make test does it when run as root)")
    # The test's hand: pick left by click, right by key, then tie, in turn; capture the download's content.
    clicker = """<script>
window.addEventListener('load', () => {
  // A headless page cannot save a file: keep what the download link would save, and its file name.
  URL.createObjectURL = blob => { blob.text().then(t => { document.getElementById('captured').textContent = t; });
                                  return 'blob:captured'; };
  HTMLAnchorElement.prototype.click = function () { document.getElementById('saved-as').textContent = this.download; };
  const n = DATA.pairs.length;
  for (let i = 0; i < n; i++) {
    if (i % 3 === 0) document.getElementById('left').click();
    else if (i % 3 === 1) document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight'}));
    else document.dispatchEvent(new KeyboardEvent('keydown', {key: '0'}));
  }
  document.getElementById('reveal').click();
  document.getElementById('download').click();
});
</script><pre id="captured"></pre><pre id="saved-as"></pre>"""
    check = tmp_path / "ab-check.html"
    check.write_text(text.replace("</body>", clicker + "</body>"))
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-ab'}",
                          "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="captured">(.*?)</pre>', dom.stdout, re.S)
    assert found and found.group(1).strip(), dom.stdout[-2000:] + dom.stderr[-2000:]
    votes = json.loads(found.group(1).replace("&quot;", '"'))
    assert votes["a"] == str(a) and votes["b"] == str(b) and len(votes["votes"]) == 2  # 2 prompts x 1 seed
    assert [v["choice"] == "tie" for v in votes["votes"]] == [False, False]
    assert '<pre id="saved-as">votes.json</pre>' in dom.stdout
    assert "done: every pair is voted" in dom.stdout and "first run (a): " + str(a) in dom.stdout
    data = json.loads(re.search(r"const DATA = (.*?);\n", text).group(1))
    lefts = [p["left"] for p in data["pairs"]]
    # pair 1: the left image was clicked; pair 2: the right one by key
    assert [v["choice"] for v in votes["votes"]] == [lefts[0], "b" if lefts[1] == "a" else "a"]
    (tmp_path / "votes.json").write_text(json.dumps(votes))
    summary = subprocess.run([str(BIN / "agentd"), "ab", "--votes", str(tmp_path / "votes.json")], capture_output=True,
                             text=True, timeout=60)
    wins_a = sum(v["choice"] == "a" for v in votes["votes"])
    assert summary.returncode == 0 and f"A wins {wins_a}, B wins {2 - wins_a}, ties 0" in summary.stdout, summary
    assert "sign test (two-sided): p = 1" in summary.stdout  # 2 decided votes cannot be significant
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ab.png"
    shot.unlink(missing_ok=True)
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-ab2'}", "--window-size=1000,900",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 5_000
    shutil.copy(page, ARTIFACTS / "ab.html")


def _base_arm_is_the_model_without_the_lora(out: Path, assets) -> None:
    """The base arm (LoRA layers disabled) renders exactly what a pipeline loaded without the LoRA renders."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(assets["sd_model"], safety_checker=None, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=1, guidance_scale=7.5, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / "eval" / "images" / "base" / "p00-s0.png")))


# --- text mode -----------------------------------------------------------------------------------
def test_text_evaluation_perplexity_answers_and_lm_eval_offline(tmp_path, assets):
    """A tiny causal LM trained 3 steps by `lora-train` with an eval: block: perplexity on the held-out records,
    exact match and ROUGE-L of greedy answers to eval_file, and an lm-evaluation-harness task from a local
    folder (a JSON task, offline) over the live model with the adapter on and bypassed (the base arm)."""
    from tests.test_train_text import write_text_config
    from trainer.cli import main
    from trainer.eval.checks import lm_eval_task_names

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in (("ab", "c"), ("de", "f"), ("g", "h"))))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "task.yaml").write_text(
        f"task: tiny_copy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: '{{question}}'\ndoc_to_target: ' {{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    assert lm_eval_task_names(tasks) == {"tiny_copy"}
    (tmp_path / "eval.jsonl").write_text('{"prompt": "the red", "answer": "circle"}\n{"prompt": "a blue", "answer": "square"}\n')
    cfg = write_text_config(tmp_path, assets, max_train_steps=3, validation_split=0.25, eval={
        "eval_file": str(tmp_path / "eval.jsonl"), "lm_eval_tasks": ["tiny_copy"], "lm_eval_task_dir": str(tasks),
        "gate": {"perplexity": {"margin": 1000}}})
    assert main([str(cfg)]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"perplexity", "exact_match", "rouge_l", "lm_eval.tiny_copy"}
    assert metrics["prompts"] == ["the red", "a blue"] and metrics["seeds"] == []
    for arm in ("candidate", "comparison", "base"):
        assert len(metrics["metrics"]["lm_eval.tiny_copy"][arm]["scores"]) == 3
        assert len(metrics["metrics"]["exact_match"][arm]["scores"]) == 2
    perplexity = metrics["metrics"]["perplexity"]
    assert perplexity["candidate"]["scores"] != perplexity["base"]["scores"]  # the adapter is really bypassed
    assert all(v > 1 for v in perplexity["candidate"]["scores"])
    decision = json.loads((out / "eval" / "decision.json").read_text())
    assert decision["against"]["kind"] == "base" and decision["overall"] in ("better", "no worse")
    assert set(decision["metrics"]) == set(metrics["metrics"])
    assert "eval_perplexity" in (out / "logs" / "summary.csv").read_text()
    assert 'id="evaluation"' in (out / "report.html").read_text()
