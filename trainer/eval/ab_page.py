"""A blind A/B page for people: two runs' evaluation images, pair by pair, without names.

`write_ab_page(a, b, out)` reads each run's `eval/metrics.json` (prompts, seeds) and its candidate images
(`eval/images/candidate/pNN-sSEED.png`) and writes one self-contained page (images inline, no external
file): for every (prompt, seed) both runs have, the two images side by side in a random left/right order
(drawn here from `seed`, so a page can be rebuilt identically), no run names. A person picks left, right
or tie by click or key (1 / 2 / 0, or the arrow keys left / right / down); the page tallies, reveals which
side was which on request, and downloads the votes as JSON:

    {"a": "<run A>", "b": "<run B>", "votes": [{"prompt": ..., "seed": 0, "choice": "a"|"b"|"tie"}, ...]}

`votes_summary(path)` reads that file back: wins, ties, A's win rate (ties left out) and the two-sided
sign test (`trainer.eval.stats.sign_test`).
"""
from __future__ import annotations

import base64
import html
import json
import random
from pathlib import Path

from trainer.errors import Problem
from trainer.eval.stats import sign_test
from trainer.runs.outputs import atomic_write_text


def eval_pairs(a: Path, b: Path) -> tuple[list[dict], list[Problem]]:
    """The (prompt, seed) pairs both runs have candidate images for, in A's order."""
    docs, problems = [], []
    for label, folder in (("A", a), ("B", b)):
        try:
            docs.append(json.loads((Path(folder) / "eval" / "metrics.json").read_text()))
        except (OSError, ValueError):
            problems.append(Problem(label, "has no evaluation (eval/metrics.json)",
                                    "give a run folder whose config had an eval: block (or run `agentd eval` on it)",
                                    str(folder)))
    if problems:
        return [], problems
    b_index = {p: i for i, p in enumerate(docs[1].get("prompts") or [])}
    pairs = []
    for i, prompt in enumerate(docs[0].get("prompts") or []):
        if prompt not in b_index:
            continue
        for seed in docs[0].get("seeds") or []:
            left = Path(a) / "eval" / "images" / "candidate" / f"p{i:02d}-s{seed}.png"
            right = Path(b) / "eval" / "images" / "candidate" / f"p{b_index[prompt]:02d}-s{seed}.png"
            if left.is_file() and right.is_file():
                pairs.append({"prompt": prompt, "seed": seed, "a": left, "b": right})
    if not pairs:
        problems.append(Problem("A/B", "the runs share no (prompt, seed) image", "evaluate both with the same "
                                "eval prompts and seeds", f"{a} / {b}"))
    return pairs, problems


def render_ab_page(a: Path, b: Path, pairs: list[dict], seed: int = 0) -> str:
    rng = random.Random(seed)
    items = []
    for p in pairs:
        a_left = rng.random() < 0.5
        left, right = (p["a"], p["b"]) if a_left else (p["b"], p["a"])
        items.append({"prompt": p["prompt"], "seed": p["seed"], "left": "a" if a_left else "b",
                      "images": [_data_uri(left), _data_uri(right)]})
    data = json.dumps({"a": str(a), "b": str(b), "pairs": items})
    return _PAGE.replace("__DATA__", data.replace("</", "<\\/")).replace("__TITLE__", html.escape(
        f"Blind A/B: {len(items)} pairs"))


def write_ab_page(a: Path, b: Path, out: Path, seed: int = 0) -> tuple[Path | None, list[Problem]]:
    pairs, problems = eval_pairs(a, b)
    if problems:
        return None, problems
    atomic_write_text(Path(out), render_ab_page(a, b, pairs, seed))
    return Path(out), []


def votes_summary(path: Path) -> dict:
    """Wins, ties, A's win rate (ties out) and the sign test of a votes file the page downloaded.
    Raises ValueError naming what is wrong with the file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a votes file ({type(e).__name__})") from None
    votes = doc.get("votes") if isinstance(doc, dict) else None
    if not isinstance(votes, list) or any(not isinstance(v, dict) or v.get("choice") not in ("a", "b", "tie")
                                          for v in votes):
        raise ValueError(f"{path}: expected {{\"votes\": [{{\"choice\": \"a\"|\"b\"|\"tie\"}}, ...]}}")
    wins_a = sum(v["choice"] == "a" for v in votes)
    wins_b = sum(v["choice"] == "b" for v in votes)
    decided = wins_a + wins_b
    return {"a": doc.get("a"), "b": doc.get("b"), "a_wins": wins_a, "b_wins": wins_b,
            "ties": len(votes) - decided, "a_win_rate": wins_a / decided if decided else None,
            "sign_test_p": sign_test(wins_a, wins_b)}


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title><style>
body{font-family:sans-serif;max-width:1000px;margin:1em auto;padding:0 1em;text-align:center}
.pair{display:flex;gap:1em;justify-content:center}.pair img{width:384px;image-rendering:pixelated;border:3px solid #ccc;
cursor:pointer}.pair img:hover{border-color:#36c}button{font-size:1em;margin:.3em}#prompt{font-size:1.2em;margin:.5em}
</style></head><body>
<h1>Which image is better?</h1>
<p>Click the better image, or press 1 / &larr; (left), 2 / &rarr; (right), 0 / &darr; (tie).</p>
<div id="progress"></div><div id="prompt"></div>
<div class="pair"><img id="left" alt="left"><img id="right" alt="right"></div>
<div><button id="pick-left">left (1)</button><button id="pick-tie">tie (0)</button>
<button id="pick-right">right (2)</button></div>
<div id="tally"></div>
<div><button id="reveal">reveal names</button><button id="download">download votes (JSON)</button></div>
<pre id="names" hidden></pre>
<script>
const DATA = __DATA__;
const votes = [];
function current() { return DATA.pairs[votes.length]; }
function show() {
  const p = current();
  document.getElementById('progress').textContent = `pair ${Math.min(votes.length + 1, DATA.pairs.length)} of ${DATA.pairs.length}`;
  const done = !p;
  document.getElementById('prompt').textContent = done ? 'done: every pair is voted' : `"${p.prompt}" (seed ${p.seed})`;
  for (const [i, side] of [[0, 'left'], [1, 'right']]) {
    const img = document.getElementById(side);
    img.hidden = done;
    if (!done) img.src = p.images[i];
  }
  const t = {a: 0, b: 0, tie: 0};
  votes.forEach(v => t[v.choice]++);
  document.getElementById('tally').textContent = `first run ${t.a} - second run ${t.b} - ties ${t.tie}`;
}
function vote(side) {
  const p = current();
  if (!p) return;
  const other = p.left === 'a' ? 'b' : 'a';
  votes.push({prompt: p.prompt, seed: p.seed, choice: side === 'tie' ? 'tie' : (side === 'left' ? p.left : other)});
  show();
}
document.getElementById('left').onclick = () => vote('left');
document.getElementById('right').onclick = () => vote('right');
document.getElementById('pick-left').onclick = () => vote('left');
document.getElementById('pick-right').onclick = () => vote('right');
document.getElementById('pick-tie').onclick = () => vote('tie');
document.addEventListener('keydown', e => {
  const side = {'1': 'left', 'ArrowLeft': 'left', '2': 'right', 'ArrowRight': 'right', '0': 'tie', 'ArrowDown': 'tie'}[e.key];
  if (side) vote(side);
});
document.getElementById('reveal').onclick = () => {
  const names = document.getElementById('names');
  names.hidden = false;
  names.textContent = `first run (a): ${DATA.a}\\nsecond run (b): ${DATA.b}\\n` +
    DATA.pairs.map((p, i) => `pair ${i + 1}: left = ${p.left}`).join('\\n');
};
document.getElementById('download').onclick = () => {
  const blob = new Blob([JSON.stringify({a: DATA.a, b: DATA.b, votes}, null, 1)], {type: 'application/json'});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = 'votes.json';
  document.body.appendChild(link);
  link.click();
  link.remove();
};
show();
</script>
</body></html>
"""
