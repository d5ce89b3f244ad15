"""Rendering `agentd status`: plain text (pipes, logs) and a rich layout (TTY).

Only formats the typed status the daemon built (`agentd.status_model.Status`, rebuilt on the client
side with `Status.from_dict`); a missing metric shows N/A, never a crash.
"""
from __future__ import annotations

import time

from agentd.status_model import JenkinsInfo, RunningJob, SlotInfo, Status, Submitter
from trainer.events import format_duration

NA = "N/A"


def _num(v, fmt="{}", na=NA) -> str:
    return na if v is None else fmt.format(v)


def _ago(ts) -> str:
    if not ts:
        return NA
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _status(s) -> Status:
    return s if isinstance(s, Status) else Status.from_dict(s)


def jenkins_line(j: JenkinsInfo) -> str:
    line = f"jenkins: {j.state}"
    if j.url:
        line += f" {j.url} node {j.node_name or NA}"
    if j.controller_version:
        line += f" (Jenkins {j.controller_version})"
    if j.offline_reason:
        line += f" (offline: {j.offline_reason})"
    if j.controller_version_note:
        line += f" ({j.controller_version_note})"
    if j.last_error and j.last_error != j.controller_version_note:
        line += f" (last error: {j.last_error})"
    return line


def agent_line(j: JenkinsInfo) -> str | None:
    a = j.agent
    if a is None:
        return None
    extra = f" last error: {a.last_error}" if a.last_error else ""
    if a.gave_up_reason:
        extra += f" (not restarted: {a.gave_up_reason})"
    return f"agent.jar: {a.state} pid {_num(a.pid)} restarts {_num(a.restarts)}{extra}"


def gpu_line(slot: SlotInfo) -> str:
    g = slot.gpu
    holder = f"job {slot.job}" if slot.job else "free"
    if not slot.healthy:
        name = (g or {}).get("name") or ("CPU" if slot.index < 0 else NA)
        return f"{slot.name:<8} {name:<28} UNHEALTHY: {slot.unhealthy_reason or (g or {}).get('error') or NA}"
    if g is None:
        return f"{slot.name:<8} {'CPU' if slot.index < 0 else NA:<28} {holder}"
    mem = f"{_num(g.get('memory_used_mib'))}/{_num(g.get('memory_total_mib'))} MiB"
    util = _num(g.get("utilization_pct"), "{}%")
    temp = _num(g.get("temperature_c"), "{}C")
    holders = [f"{p.get('name') or '?'} (pid {p.get('pid')}, {_num(p.get('used_mib'))} MiB)"
               for p in (g.get("processes") or [])]
    others = f"; processes: {', '.join(holders)}" if holders else ""
    own = f" agentd {_num(slot.agentd_vram_mib)} MiB"
    return (f"{slot.name:<8} {g.get('name') or NA:<28} {mem:<20} util {util:<5} {temp:<5}{own} {holder}{others}"
            f"\n           {slot.uuid or 'UUID ' + NA}")


def owner(submitter: Submitter, build_url: str | None = None) -> str:
    """Who owns a job (agentd.permissions): the submitting user, and the build it came from."""
    who = submitter.user or (f"uid {submitter.uid}" if submitter.uid is not None else NA)
    return f"{who} ({build_url})" if build_url else who


def running_line(r: RunningJob) -> str:
    loss = _num(r.loss, "{:.4f}")
    speed = _num(r.it_s, "{:.2f} it/s")
    who = owner(r.submitter, r.build_url)
    stop = f" ({r.stopping}...)" if r.stopping else ""
    prio = f" priority {r.priority}" if r.priority else ""
    attempt = f" attempt {r.attempt}" if r.attempt > 1 else ""
    device = f" ({r.device_uuid})" if r.device_uuid else ""
    device += f" ({r.part})" if r.part else ""
    return (f"{r.id} {r.name or ''} on {r.slot}{device}: step {_num(r.step, na='0')}/"
            f"{_num(r.total_steps, na='?')} loss {loss} {speed} ETA {format_duration(r.eta_s, NA)}"
            f"{prio}{attempt}{stop}"
            f"\n    config {r.config}\n    by {who}")


def cache_line(s: Status) -> str:
    c = s.model_cache
    where = (f"{c.on_device} on a GPU ({c.device_mib:.0f} MiB, to host memory in {_num(c.device_expires_in_s)} s)"
             if c.on_device else "none on a GPU")
    return (f"warm models: {c.entries} ({where}; host memory {c.host_mib:.0f} MiB; warm_vram_ttl_s "
            f"{c.warm_vram_ttl_s:g})  hits {c.hits} misses {c.misses}")


def render_plain(snapshot) -> str:
    s = _status(snapshot)
    d = s.daemon
    lines = [f"agentd {d.version}  pid {d.pid}  up {format_duration(d.uptime_s, NA)}  socket {d.socket}"
             + ("  DRAINING" if d.draining else "")]
    lines.append(jenkins_line(s.jenkins))
    agent = agent_line(s.jenkins)
    if agent:
        lines.append(agent)
    lines.append("slots:")
    lines += ["  " + gpu_line(sl) for sl in s.slots]
    lines.append(cache_line(s))
    lines.append("running:" if s.running else "running: none")
    lines += ["  " + running_line(r).replace("\n", "\n  ") for r in s.running]
    lines.append(f"queue: {len(s.queue)}")
    for q in s.queue:
        prio = f" priority {q.priority}" if q.priority else ""
        lines.append(f"  {q.position}. {q.id} {q.state}{prio} waited {format_duration(q.waited_s, NA)} {q.config}"
                     f" by {owner(q.submitter, q.build_url)}")
    if s.paused:
        lines.append(f"paused: {len(s.paused)}")
        lines += [f"  {p.id} at step {_num(p.step)}/{_num(p.total_steps)} {p.config} by "
                  f"{owner(p.submitter, p.build_url)} (agentd resume {p.id})" for p in s.paused]
    lines.append("recent:" if s.recent else "recent: none")
    for r in s.recent:
        est = f" est {_num(r.estimate_mib, '{:.0f}')} / peak {_num(r.peak_mib, '{:.0f}')} MiB"
        retries = f" infra retries {r.infra_retries}" if r.infra_retries else ""
        err = f" - {r.error.splitlines()[0][:100]}" if r.error and r.outcome != "succeeded" else ""
        lines.append(f"  {r.id} {r.outcome:<9} {_ago(r.ended)} loss {_num(r.loss, '{:.4f}')}"
                     f"{est}{retries} {r.name or ''} by {owner(r.submitter)}{err}")
    return "\n".join(lines)


def rich_renderable(snapshot):
    from rich.console import Group
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    s = _status(snapshot)
    d, j = s.daemon, s.jenkins
    head = (f"[bold]agentd {d.version}[/] pid {d.pid} up {format_duration(d.uptime_s, NA)} · {escape(d.socket)}"
            + (" · [yellow]DRAINING[/]" if d.draining else "")
            + "\n" + escape(jenkins_line(j))
            + (f"\n{escape(agent_line(j))}" if j.agent else "")
            + f"\n{escape(cache_line(s))}")
    slots = Table(title="slots", expand=True)
    for col in ("slot", "device", "memory", "agentd", "util", "temp", "job"):
        slots.add_column(col)
    for sl in s.slots:
        g = sl.gpu or {}
        device = (g.get("name") or ("CPU" if sl.index < 0 else NA)) + (f"\n{sl.uuid}" if sl.uuid else "")
        holder = sl.job or "free"
        if not sl.healthy:
            holder = f"[red]unhealthy[/]: {escape(sl.unhealthy_reason or NA)}"
        slots.add_row(sl.name, device,
                      f"{_num(g.get('memory_used_mib'))}/{_num(g.get('memory_total_mib'))} MiB" if g else NA,
                      f"{_num(sl.agentd_vram_mib)} MiB", _num(g.get("utilization_pct"), "{}%"),
                      _num(g.get("temperature_c"), "{}C"), holder)
    running = Table(title="running", expand=True)
    for col in ("job", "step", "loss", "speed", "ETA", "prio", "owner", "config / build"):
        running.add_column(col)
    for r in s.running:
        running.add_row(r.id + (f" ({r.stopping}...)" if r.stopping else "") + (f"\n{r.part}" if r.part else ""),
                        f"{_num(r.step, na='0')}/{_num(r.total_steps, na='?')}",
                        _num(r.loss, "{:.4f}"), _num(r.it_s, "{:.2f} it/s"), format_duration(r.eta_s, NA),
                        str(r.priority), escape(owner(r.submitter)),
                        f"{r.config}\n{r.build_url or ''}")
    queue = Table(title=f"queue ({len(s.queue)})", expand=True)
    for col in ("#", "job", "state", "prio", "waited", "owner", "config"):
        queue.add_column(col)
    for q in s.queue:
        queue.add_row(str(q.position), q.id, q.state, str(q.priority), format_duration(q.waited_s, NA),
                      escape(owner(q.submitter)), q.config or "")
    parts = [Panel(head), slots, running, queue]
    if s.paused:
        paused = Table(title=f"paused ({len(s.paused)})", expand=True)
        for col in ("job", "step", "owner", "config"):
            paused.add_column(col)
        for p in s.paused:
            paused.add_row(p.id, f"{_num(p.step)}/{_num(p.total_steps)}", escape(owner(p.submitter)), p.config or "")
        parts.append(paused)
    recent = Table(title="recent", expand=True)
    for col in ("job", "outcome", "ended", "loss", "est/peak MiB", "owner", "name"):
        recent.add_column(col)
    for r in s.recent:
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(r.outcome, "white")
        recent.add_row(r.id, f"[{colour}]{r.outcome}[/]", _ago(r.ended), _num(r.loss, "{:.4f}"),
                       f"{_num(r.estimate_mib, '{:.0f}')}/{_num(r.peak_mib, '{:.0f}')}", escape(owner(r.submitter)),
                       r.name or "")
    parts.append(recent)
    return Group(*parts)


def render_rich(snapshot) -> None:
    from rich.console import Console

    Console().print(rich_renderable(snapshot))
