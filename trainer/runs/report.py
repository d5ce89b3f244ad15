"""What a person looks at: `logs/loss.png` and a self-contained `report.html`, and run comparisons.

loss.png: the raw loss per step (faint), a smoothed curve (EMA), the validation loss (points), and the
learning rate on a second axis. It is drawn from logs/loss.csv, so a resumed run's chart covers the
whole run; written atomically (matplotlib's Agg backend, no display needed).

report.html: one page, every image inline (data: URIs), so it can be archived, mailed or published by
Jenkins' HTML Publisher as one file: the run's header (config name, commit, build URL, data
fingerprint, family, device, duration, resumes), the loss chart, the sample grid (or text completions),
the final and validation losses, the dataset summary and — when a previous run exists (the newest in
history_dir, or `compare_with:`) — the comparison: config diff, both loss curves overlaid, both sample
grids side by side, and a one-line verdict.

The comparison data (`compare_runs`) needs no matplotlib or torch: `agentd compare` prints it as a table.
"""
from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from trainer.runs.outputs import atomic_write_bytes, atomic_write_text


@dataclass
class RunView:
    """One run folder, read for reporting (an output_dir or a history folder)."""

    folder: Path
    run: dict
    rows: list[dict]
    label: str = ""

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r["loss"])) for r in self.rows if r.get("loss")]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r.get("val_loss")]

    def figures(self) -> dict:
        """The loss figures compared across runs (None where the run has no such number)."""
        losses = [v for _, v in self.losses]
        vals = [v for _, v in self.val_losses]
        summary = self.run.get("summary") or {}
        t = self.run.get("times") or {}
        duration = (t.get("finished") or 0) - (t.get("first_started") or t.get("started") or 0)
        return {
            "status": self.run.get("status"),
            "steps": (self.run.get("steps") or {}).get("done"),
            "final loss": losses[-1] if losses else self.run.get("final_loss"),
            "mean loss (last 10 steps)": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "validation loss": vals[-1] if vals else None,
            "best validation loss": min(vals) if vals else None,
            "samples/s": summary.get("samples_per_s"),
            "duration (s)": round(duration, 1) if t.get("finished") else None,
        }


def read_run(folder: Path, label: str = "") -> RunView:
    from trainer.runs.outputs import read_loss_csv

    folder = Path(folder)
    run = json.loads((folder / "run.json").read_text())
    loss_csv = folder / "logs" / "loss.csv"
    rows = read_loss_csv(loss_csv) if loss_csv.is_file() else []
    return RunView(folder, run, rows, label or run.get("run_id") or folder.name)


@dataclass
class Comparison:
    current: RunView
    previous: RunView
    config_diff: list[tuple[str, object, object]] = field(default_factory=list)  # (field, previous, current)
    verdict: str = ""


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    skip = {"output_dir"}  # always differs between a run and its history copy's record; not a choice
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in skip and old.get(k) != new.get(k)]


def verdict(cur: dict, prev: dict) -> str:
    """'validation loss 0.112 vs 0.131 last run: better' (lower is better); train loss without validation."""
    for key, name in (("validation loss", "validation loss"), ("mean loss (last 10 steps)", "training loss "
                                                                                             "(mean of the last 10 steps)")):
        a, b = cur.get(key), prev.get(key)
        if a is not None and b is not None:
            word = "the same" if abs(a - b) <= 1e-9 * max(1.0, abs(b)) else ("better" if a < b else "worse")
            return f"{name} {a:.4g} vs {b:.4g} last run: {word}"
    return "no loss figures to compare"


def compare_runs(current: Path, previous: Path) -> Comparison:
    cur, prev = read_run(current, "this run"), read_run(previous)
    return Comparison(cur, prev, config_diff(prev.run.get("config") or {}, cur.run.get("config") or {}),
                      verdict(cur.figures(), prev.figures()))


# ------------------------------------------------------------------------------------------------
# Charts


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _png(fig) -> bytes:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def use_headless_matplotlib() -> None:
    """Import matplotlib with the Agg backend (no display on a build agent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def loss_chart(view: RunView) -> bytes:
    """PNG bytes of the loss chart (`loss_figure`)."""
    return _png(loss_figure(view))


def loss_figure(view: RunView):
    """The loss chart: raw, smoothed, validation; learning rate on a second axis."""
    use_headless_matplotlib()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    steps = [s for s, _ in view.losses]
    values = [v for _, v in view.losses]
    if steps:
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(steps, _ema(values), color="tab:blue", linewidth=1.8, label="loss (smoothed)")
    if view.val_losses:
        ax.plot(*zip(*view.val_losses), "o-", color="tab:red", markersize=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lrs = [(int(r["step"]), float(r["lr"])) for r in view.rows if r.get("lr")]
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:green", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        legend = ax.legend(handles, labels, loc="upper right", fontsize=8)
        # The raw loss is drawn faint and thin (the smoothed line is the one to read); its legend entry
        # must still show a visible sample of its colour.
        for line in legend.get_lines():
            line.set_alpha(max(line.get_alpha() or 1.0, 0.6))
            line.set_linewidth(max(line.get_linewidth(), 2.0))
    ax.set_title(view.run.get("name", ""))
    ax.grid(alpha=0.3)
    return fig


def overlay_chart(c: Comparison) -> bytes:
    """Both runs' smoothed loss (and validation loss) on one chart."""
    use_headless_matplotlib()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for view, color in ((c.previous, "tab:gray"), (c.current, "tab:blue")):
        if view.losses:
            steps, values = zip(*view.losses)
            ax.plot(steps, _ema(list(values)), color=color, linewidth=1.6, label=f"{view.label}: loss (smoothed)")
        if view.val_losses:
            ax.plot(*zip(*view.val_losses), "o--", color=color, markersize=4, label=f"{view.label}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def device_label(device: dict) -> str | None:
    """run.json's device as `agentd status` names it: cpu, or the GPU's name and its cuda:N."""
    if device.get("type") == "cuda":
        index = device.get("index")
        return f"{device.get('name') or 'GPU'}" + (f" (cuda:{index})" if index is not None else "")
    return device.get("type")


def write_loss_png(folder: Path) -> Path:
    path = Path(folder) / "logs" / "loss.png"
    atomic_write_bytes(path, loss_chart(read_run(folder)))
    return path


# ------------------------------------------------------------------------------------------------
# The page


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(x))}</td>" for x in r) + "</tr>")
    return "\n".join(out + ["</table>"])


def _network(net: dict | None) -> str:
    """'LoKr, 3,008 parameters (EMA for samples)' from run.json's network (runs before it: a dash)."""
    if not net:
        return "—"
    ema = f" (EMA for {net['ema']})" if net.get("ema") else ""
    return f"{net['type']}, {net['parameters']:,} parameters{ema}"


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "—"


def _samples_html(view: RunView) -> str:
    from trainer.runs.samples import text_samples

    grid = view.folder / "samples" / "grid.png"
    if grid.is_file():
        return _img(grid.read_bytes(), f"samples of {view.label}")
    texts = text_samples(view.folder / "samples")
    if texts:
        return _table([(step, *t) for step, t in texts], ("step", *[f"prompt {i}" for i in range(len(texts[0][1]))]))
    return "<p>No samples (set sample_prompts).</p>"


ARMS = ("candidate", "comparison", "base")


def _evaluation_html(folder: Path) -> list[str]:
    """The evaluation section (eval/decision.json, eval/metrics.json): the metric table with intervals and
    decisions, and per prompt the same-seed images of candidate | comparison | base."""
    try:
        decision = json.loads((folder / "decision.json").read_text())
    except (OSError, ValueError):
        return []
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {"metrics": {}, "prompts": [], "seeds": []}
    against = decision.get("against") or {}
    rows = [(m, d["candidate_mean"], d["comparison_mean"], metrics["metrics"].get(m, {}).get("base", {}).get("mean"),
             f"{d['delta']:+.4g} [{d['ci95'][0]:+.4g}, {d['ci95'][1]:+.4g}]", d["margin"], d["decision"])
            for m, d in (decision.get("metrics") or {}).items()]
    parts = ['<h2 id="evaluation">Evaluation</h2>',
             f'<p class="verdict">{html.escape(decision.get("overall", "unknown"))}: '
             f'{html.escape(decision.get("reason", ""))}</p>',
             _table([("compared with", against.get("kind")), ("comparison LoRA", against.get("lora")),
                      ("release", against.get("release")), ("seconds", metrics.get("seconds"))])]
    if rows:
        parts.append(_table(rows, ("metric", "candidate", "comparison", "base", "paired delta [95% CI]", "margin",
                                   "decision")))
    seeds = metrics.get("seeds") or []  # none: a text evaluation (no images)
    grid = []
    for i, prompt in enumerate(metrics.get("prompts") or [] if seeds else []):
        cells = []
        for arm in ARMS:
            image = folder / "images" / arm / f"p{i:02d}-s{seeds[0]}.png"
            if arm == "comparison" and not image.is_file():  # compared with the base: its images
                image = folder / "images" / "base" / f"p{i:02d}-s{seeds[0]}.png"
            cells.append(_img(image.read_bytes(), f"{arm}: {prompt}") if image.is_file() else "—")
        grid.append("<tr><td>" + html.escape(prompt) + "</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if grid:
        parts.append(f"<h3>Seed {seeds[0]}: candidate | comparison | base</h3>"
                     "<table class=\"evalgrid\"><tr><th>prompt</th>" + "".join(f"<th>{a}</th>" for a in ARMS) + "</tr>"
                     + "\n".join(grid) + "</table>")
    return parts


def render_html(current: Path, previous: Path | None = None, *, title: str | None = None) -> str:
    cur = read_run(current, "this run")
    run = cur.run
    cfg = run.get("config") or {}
    git = run.get("git") or {}
    jenkins = run.get("jenkins") or {}
    times = run.get("times") or {}
    ds = run.get("dataset") or {}
    fig = cur.figures()
    header = [
        ("config", run.get("config_file") or run.get("name")), ("run", run.get("run_id")),
        ("status", run.get("status")),
        ("commit", (git.get("commit") or "—") + (" (local changes)" if git.get("dirty") else "")),
        ("build", jenkins.get("BUILD_URL") or "—"), ("data fingerprint", ds.get("fingerprint")),
        ("family", cfg.get("model_family") or cfg.get("mode")), ("base model", cfg.get("base_model")),
        ("network", _network(run.get("network"))),
        ("device", device_label(run.get("device") or {})),
        ("started", _when(times.get("first_started") or times.get("started"))),
        ("finished", _when(times.get("finished"))), ("duration (s)", fig["duration (s)"]),
        ("resumes", ", ".join(f"from step {r.get('from_step')} ({r.get('why')})" for r in run.get("resumes") or [])
         or "none"),
    ]
    dataset = [("folder", ds.get("dir")), ("training samples", ds.get("samples")),
               ("validation samples", ds.get("validation_samples")), ("fingerprint", ds.get("fingerprint"))]
    parts = [f"<h1>{html.escape(title or run.get('name', 'run'))}</h1>", _table(header),
             "<h2>Loss</h2>", _img(loss_chart(cur), "loss chart"),
             _table([(k, v) for k, v in fig.items()]),
             "<h2>Samples</h2>", _samples_html(cur), "<h2>Dataset</h2>", _table(dataset)]
    parts += _evaluation_html(Path(current) / "eval")
    if previous is not None:
        c = compare_runs(current, previous)
        parts += [f'<h2 id="comparison">Comparison with {html.escape(c.previous.label)}</h2>',
                  f'<p class="verdict">{html.escape(c.verdict)}</p>',
                  "<h3>Config changes</h3>",
                  _table(c.config_diff, ("field", "previous run", "this run")) if c.config_diff
                  else "<p>No config changes.</p>",
                  "<h3>Loss figures</h3>",
                  _table([(k, c.previous.figures()[k], v) for k, v in fig.items()], ("", "previous run", "this run")),
                  _img(overlay_chart(c), "loss curves overlaid"),
                  "<h3>Samples side by side</h3>",
                  f'<div class="side"><div><p>previous run</p>{_samples_html(c.previous)}</div>'
                  f'<div><p>this run</p>{_samples_html(cur)}</div></div>']
    style = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:left;font-size:13px}img{max-width:100%}.verdict{font-weight:bold;font-size:1.1em}"
             ".side{display:flex;gap:1em}.side>div{flex:1}.evalgrid img{width:128px;image-rendering:pixelated}")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(run.get('name', 'run'))} — agentd report</title><style>{style}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(folder: Path, previous: Path | None = None, out: Path | None = None) -> Path:
    path = Path(out) if out else Path(folder) / "report.html"
    atomic_write_text(path, render_html(folder, previous))
    return path
