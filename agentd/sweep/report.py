"""The sweep report: what `agentd sweep status/report` show and what a sweep leaves in its folder.

    <folder>/summary.csv    one row per trial: number, state, objective, steps, seconds, job, each
                            parameter (the Jenkins Plot plugin reads it)
    <folder>/report.html    self-contained (figures inline as PNG data): the table of trials, the best
                            trial, the objective against each parameter, the history, and the parameter
                            importances when Optuna can compute them (two or more complete trials)
"""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from agentd.sweep.study import sweep_trials
from trainer.api import atomic_write_text
from trainer.events import text_columns


def trial_rows(sweep, study) -> list[dict]:
    rows = []
    for t in sweep_trials(study, sweep.spec.trials):
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        value = t.value if t.state.name == "COMPLETE" else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": value,
                     "steps": t.user_attrs.get("steps"), "seconds": round(seconds, 1) if seconds is not None else None,
                     "job_id": t.user_attrs.get("job_id"), "output_dir": t.user_attrs.get("output_dir"),
                     "detail": t.user_attrs.get("detail"), "params": dict(t.params),
                     "intermediate": dict(t.intermediate_values)})
    return rows


def summary(sweep, study) -> dict:
    """Counts per state, the best complete trial, and every trial (the `agentd sweep status` answer)."""
    rows = trial_rows(sweep, study)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    complete = [r for r in rows if r["state"] == "complete"]
    pick = min if sweep.spec.direction == "minimize" else max
    best = pick(complete, key=lambda r: r["value"]) if complete else None
    return {"objective": sweep.spec.objective, "direction": sweep.spec.direction, "trials_wanted": sweep.spec.trials,
            "counts": counts, "best": best, "trials": rows}


def table(s: dict, names: list[str]) -> str:
    """The trials as plain text columns (the console)."""
    head = ["trial", "state", s["objective"], "steps", "seconds", *names]
    lines = [head]
    for r in s["trials"]:
        lines.append([f"{r['number']:03d}", r["state"], _num(r["value"]), str(r["steps"] or ""),
                      str(r["seconds"] or ""), *[_num(r["params"].get(n)) for n in names]])
    text = "\n".join(text_columns(lines))
    best = s["best"]
    return text + ("\nbest: trial %03d, %s %s, %s" % (best["number"], s["objective"], _num(best["value"]),
                                                     best["output_dir"]) if best else "\nbest: no complete trial")


def _num(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_csv(path: Path, s: dict, names: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "state", s["objective"], "steps", "seconds", "job_id", *names])
    for r in s["trials"]:
        w.writerow([r["number"], r["state"], "" if r["value"] is None else r["value"], r["steps"] or "",
                    r["seconds"] or "", r["job_id"] or "", *[r["params"].get(n, "") for n in names]])
    atomic_write_text(path, buf.getvalue())


def importances(study) -> dict[str, float] | None:
    """Optuna's parameter importances (fANOVA), when it can compute them (None otherwise: too few trials)."""
    import optuna

    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figures(s: dict, names: list[str], log_axes: set[str]) -> list[tuple[str, str]]:
    """(title, base64 PNG): the objective against each parameter, and the history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in s["trials"] if r["value"] is not None]
    out = []
    colors = {"complete": "tab:blue", "pruned": "tab:orange", "fail": "tab:red"}
    for name in names:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        for r in s["trials"]:
            v = r["value"] if r["value"] is not None else (list(r["intermediate"].values()) or [None])[-1]
            if v is not None and name in r["params"]:
                ax.scatter([_plot_value(r["params"][name])], [v], color=colors.get(r["state"], "gray"),
                           label=r["state"])
        if name in log_axes:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(s["objective"])
        handles = {lbl: h for h, lbl in zip(*ax.get_legend_handles_labels())}
        if handles:
            ax.legend(handles.values(), handles.keys(), fontsize=7)
        out.append((f"{s['objective']} against {name}", _png(fig)))
    fig, ax = plt.subplots(figsize=(4.5, 3))
    if done:
        xs = [r["number"] for r in done]
        ys = [r["value"] for r in done]
        ax.plot(xs, ys, "o", label="complete trial")
        pick = min if s["direction"] == "minimize" else max
        ax.step(xs, [pick(ys[:i + 1]) for i in range(len(ys))], where="post", label="best so far")
        ax.legend(fontsize=7)
    ax.set_xlabel("trial")
    ax.set_ylabel(s["objective"])
    out.append(("history", _png(fig)))
    return out


def _plot_value(v):
    return v if isinstance(v, (int, float)) else str(v)


def write_report(sweep, study, html: bool = True) -> dict:
    """summary.csv (always) and report.html (when `html`) in the sweep folder; their paths and the table."""
    s = summary(sweep, study)
    names = list(sweep.spec.parameters)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    write_csv(sweep.folder / "summary.csv", s, names)
    out = {"table": table(s, names), "csv": str(sweep.folder / "summary.csv"), "html": None}
    if html:
        log_axes = {n for n, p in sweep.spec.parameters.items() if p.log}
        page = render_html(sweep, s, names, figures(s, names, log_axes), importances(study))
        atomic_write_text(sweep.folder / "report.html", page)
        out["html"] = str(sweep.folder / "report.html")
    return out


def render_html(sweep, s: dict, names: list[str], figs: list[tuple[str, str]], imp: dict | None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in ["trial", "state", s["objective"], "steps", "seconds", "job", *names])
    rows = []
    for r in s["trials"]:
        cls = ' class="best"' if s["best"] and r["number"] == s["best"]["number"] else ""
        cells = [f"{r['number']:03d}", r["state"], _num(r["value"]), str(r["steps"] or ""), str(r["seconds"] or ""),
                 r["job_id"] or "", *[_num(r["params"].get(n)) for n in names]]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    best = s["best"]
    best_html = (f"<p id=\"best\">Best: trial {best['number']:03d}, {e(s['objective'])} {_num(best['value'])} "
                 f"({e(', '.join(f'{k}={_num(v)}' for k, v in best['params'].items()))}); output "
                 f"<code>{e(best['output_dir'] or '')}</code>; <code>agentd release promote {e(sweep.spec.name)}:best"
                 "</code> names it.</p>" if best else "<p id=\"best\">No complete trial.</p>")
    imp_html = ("<h2>Parameter importances</h2><table id=\"importances\">" + "".join(
        f"<tr><td>{e(k)}</td><td>{v:.3f}</td></tr>" for k, v in imp.items()) + "</table>"
        if imp else "<p id=\"importances\">Parameter importances: not computable yet (needs two or more complete "
                    "trials whose parameters differ).</p>")
    figs_html = "".join(f'<figure><img alt="{e(t)}" src="data:image/png;base64,{b}"><figcaption>{e(t)}</figcaption>'
                        "</figure>" for t, b in figs)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(s["counts"].items()))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>sweep {e(sweep.spec.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:2px 8px;text-align:right}}tr.best{{background:#dfd}}figure{{display:inline-block;margin:0 1em 1em 0}}</style>
</head><body>
<h1>Sweep {e(sweep.spec.name)}</h1>
<p>{e(s['objective'])} ({e(s['direction'])}), sampler {e(sweep.spec.sampler)} seed {sweep.spec.seed}, pruner
{e(sweep.spec.pruner)}; {len(s['trials'])} of {s['trials_wanted']} trials: {e(counts)}.</p>
{best_html}
<h2>Trials</h2><table id="trials"><tr>{head}</tr>{''.join(rows)}</table>
<h2>Figures</h2>{figs_html}
{imp_html}
</body></html>
"""
