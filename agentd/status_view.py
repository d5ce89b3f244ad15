"""Rendering `agentd status`: plain text (pipes, logs) and a rich layout (TTY).

Only formats the snapshot the daemon sent; a missing metric shows N/A, never a crash.
"""
from __future__ import annotations

import time

NA = "N/A"


def _num(v, fmt="{}", na=NA) -> str:
    return na if v is None else fmt.format(v)


def _dur(seconds) -> str:
    if seconds is None:
        return NA
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _ago(ts) -> str:
    if not ts:
        return NA
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def gpu_line(slot: dict) -> str:
    g = slot.get("gpu")
    holder = f"job {slot['job']}" if slot.get("job") else "free"
    if g is None:
        return f"{slot['name']:<8} {'CPU' if slot['index'] < 0 else NA:<28} {holder}"
    if not g.get("healthy", True):
        return f"{slot['name']:<8} {g.get('name') or NA:<28} UNHEALTHY: {g.get('error') or NA}"
    mem = f"{_num(g.get('memory_used_mib'))}/{_num(g.get('memory_total_mib'))} MiB"
    util = _num(g.get("utilization_pct"), "{}%")
    temp = _num(g.get("temperature_c"), "{}C")
    holders = [f"{p.get('name') or '?'} (pid {p.get('pid')}, {_num(p.get('used_mib'))} MiB)"
               for p in (g.get("processes") or [])]
    others = f"; processes: {', '.join(holders)}" if holders else ""
    return f"{slot['name']:<8} {g.get('name') or NA:<28} {mem:<20} util {util:<5} {temp:<5} {holder}{others}"


def running_line(r: dict) -> str:
    loss = _num(r.get("loss"), "{:.4f}")
    speed = _num(r.get("it_s"), "{:.2f} it/s")
    who = r.get("build_url") or (r.get("submitter") or {}).get("user") or NA
    stop = " (stopping)" if r.get("stopping") else ""
    return (f"{r['id']} {r.get('name') or ''} on {r.get('slot')}: step {_num(r.get('step'), na='0')}/"
            f"{_num(r.get('total_steps'), na='?')} loss {loss} {speed} ETA {_dur(r.get('eta_s'))}{stop}"
            f"\n    config {r.get('config')}\n    by {who}")


def render_plain(s: dict) -> str:
    d = s["daemon"]
    lines = [f"agentd {d['version']}  pid {d['pid']}  up {_dur(d['uptime_s'])}  socket {d['socket']}"
             + ("  DRAINING" if d.get("draining") else "")]
    j = s.get("jenkins") or {}
    jline = f"jenkins: {j.get('state', NA)}"
    if j.get("url"):
        jline += f" {j['url']} node {j.get('node_name', NA)}"
    if j.get("last_error"):
        jline += f" (last error: {j['last_error']})"
    lines.append(jline)
    if s.get("agent"):
        a = s["agent"]
        lines.append(f"agent.jar: {a.get('state', NA)} pid {_num(a.get('pid'))} restarts {_num(a.get('restarts'))}")
    lines.append("slots:")
    lines += ["  " + gpu_line(sl) for sl in s["slots"]]
    lines.append("running:" if s["running"] else "running: none")
    lines += ["  " + running_line(r).replace("\n", "\n  ") for r in s["running"]]
    lines.append(f"queue: {len(s['queue'])}")
    lines += [f"  {q['position']}. {q['id']} {q.get('state')} {q.get('config')}" for q in s["queue"]]
    lines.append("recent:" if s["recent"] else "recent: none")
    for r in s["recent"]:
        est = f" est {_num(r.get('estimate_mib'), '{:.0f}')} / peak {_num(r.get('peak_mib'), '{:.0f}')} MiB"
        err = f" - {r['error'].splitlines()[0][:100]}" if r.get("error") and r["outcome"] != "succeeded" else ""
        lines.append(f"  {r['id']} {r['outcome']:<9} {_ago(r.get('ended'))} loss {_num(r.get('loss'), '{:.4f}')}"
                     f"{est} {r.get('name') or ''}{err}")
    return "\n".join(lines)


def rich_renderable(s: dict):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    d = s["daemon"]
    j = s.get("jenkins") or {}
    head = (f"[bold]agentd {d['version']}[/] pid {d['pid']} up {_dur(d['uptime_s'])} · {d['socket']}"
            + (" · [yellow]DRAINING[/]" if d.get("draining") else "")
            + f"\njenkins: {j.get('state', NA)}" + (f" · {j.get('url')}" if j.get("url") else "")
            + (f" · [red]{j['last_error']}[/]" if j.get("last_error") else ""))
    slots = Table(title="slots", expand=True)
    for col in ("slot", "device", "memory", "util", "temp", "job"):
        slots.add_column(col)
    for sl in s["slots"]:
        g = sl.get("gpu") or {}
        slots.add_row(sl["name"], g.get("name") or ("CPU" if sl["index"] < 0 else NA),
                      f"{_num(g.get('memory_used_mib'))}/{_num(g.get('memory_total_mib'))} MiB" if g else NA,
                      _num(g.get("utilization_pct"), "{}%"), _num(g.get("temperature_c"), "{}C"),
                      sl.get("job") or ("[red]unhealthy[/]" if not sl.get("healthy", True) else "free"))
    running = Table(title="running", expand=True)
    for col in ("job", "step", "loss", "speed", "ETA", "config / build"):
        running.add_column(col)
    for r in s["running"]:
        running.add_row(r["id"], f"{_num(r.get('step'), na='0')}/{_num(r.get('total_steps'), na='?')}",
                        _num(r.get("loss"), "{:.4f}"), _num(r.get("it_s"), "{:.2f} it/s"), _dur(r.get("eta_s")),
                        f"{r.get('config')}\n{r.get('build_url') or ''}")
    queue = Table(title=f"queue ({len(s['queue'])})", expand=True)
    for col in ("#", "job", "state", "config"):
        queue.add_column(col)
    for q in s["queue"]:
        queue.add_row(str(q["position"]), q["id"], q.get("state") or "", q.get("config") or "")
    recent = Table(title="recent", expand=True)
    for col in ("job", "outcome", "ended", "loss", "est/peak MiB", "name"):
        recent.add_column(col)
    for r in s["recent"]:
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(r["outcome"], "white")
        recent.add_row(r["id"], f"[{colour}]{r['outcome']}[/]", _ago(r.get("ended")), _num(r.get("loss"), "{:.4f}"),
                       f"{_num(r.get('estimate_mib'), '{:.0f}')}/{_num(r.get('peak_mib'), '{:.0f}')}",
                       r.get("name") or "")
    return Group(Panel(head), slots, running, queue, recent)


def render_rich(s: dict) -> None:
    from rich.console import Console

    Console().print(rich_renderable(s))
