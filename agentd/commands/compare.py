"""agentd compare A B|previous [--html out.html]: two runs side by side.

A and B are run folders: an output_dir (its current run) or a history folder (`runs/<run-id>/`).
`previous` means the newest earlier run of A (in A's history_dir, default A/runs/). Prints the config
diff and the loss figures as a table (rich) and the verdict; `--html` writes the comparison page (the
same page as report.html, A as "this run"). Exit 2 when a folder is not a run. Imports no torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def resolve_previous(a: Path) -> Path | None:
    import json

    from trainer.runs.history import newest_previous

    try:
        history = (json.loads((a / "run.json").read_text()).get("config") or {}).get("history_dir")
    except (OSError, ValueError):
        history = None
    return newest_previous(Path(history) if history else a / "runs")


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd compare", description="Compare two training runs.")
    p.add_argument("a", help="a run folder (an output_dir or runs/<run-id>)")
    p.add_argument("b", help="another run folder, or 'previous' (A's newest earlier run)")
    p.add_argument("--html", metavar="OUT", help="also write the comparison page (self-contained HTML)")
    args = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from trainer.runs.report import compare_runs, write_report
    from trainer.runs.history import is_run_folder

    a = Path(args.a).resolve()
    b = resolve_previous(a) if args.b == "previous" else Path(args.b).resolve()
    for label, folder in (("A", a), ("B", b)):
        if folder is None:
            print(f"agentd compare: {a} has no previous run (nothing in its runs/ folder)", file=sys.stderr)
            return 2
        if not is_run_folder(folder):
            print(f"agentd compare: {label} = {folder} is not a run folder (no run.json and logs/loss.csv); "
                  "give an output_dir or a runs/<run-id> folder", file=sys.stderr)
            return 2
    c = compare_runs(a, b)
    console = Console(width=max(100, Console().width))
    console.print(f"[bold]A[/] {a}  ({c.current.run.get('run_id') or '—'})\n[bold]B[/] {b}  "
                  f"({c.previous.run.get('run_id') or '—'})")
    diff = Table(title="config changes (B -> A)")
    for col in ("field", "B", "A"):
        diff.add_column(col, overflow="fold")
    for field, old, new in c.config_diff:
        diff.add_row(field, _fmt(old), _fmt(new))
    console.print(diff if c.config_diff else "no config changes")
    figs = Table(title="loss figures")
    for col in ("", "B", "A"):
        figs.add_column(col)
    fa, fb = c.current.figures(), c.previous.figures()
    for key in fa:
        figs.add_row(key, _fmt(fb[key]), _fmt(fa[key]))
    console.print(figs)
    console.print(f"[bold]verdict (A vs B):[/] {c.verdict.replace('last run', 'B')}")
    if args.html:
        out = write_report(a, b, Path(args.html))
        console.print(f"wrote {out}")
    return 0


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
