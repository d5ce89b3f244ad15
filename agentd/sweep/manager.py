"""The daemon's sweeps: Optuna's ask-and-tell around ordinary agentd jobs.

One thread per running sweep (`SweepRun`), polling every POLL_S:
- ask: while fewer than `parallel` of its trials run on this box and the study has fewer than `trials`
  trials, ask Optuna for one, mark it with this box (`study.BOX_ATTR`) and submit its config as a job
  (queued, gated, journaled, resumable like any other) into `<folder>/trials/NNN`, with `sweep` set so the
  journal and run.json name the sweep and trial;
- watch: read each trial job's new events from the journal, forward them to `agentd sweep run`, report
  every validation loss to Optuna and, when the pruner says so, cancel the job (it checkpoints at its
  next step: pruned, not failed); at its `finished` event tell Optuna complete (with the objective),
  pruned or failed.

The trial <-> job mapping needs no table of its own: a trial's folder is fixed by its number and the
journal knows the job training into each folder (`Journal.job_for_output`). After a restart (even a
kill -9) the sweep resumes from the Optuna storage, the truth for trial states: this box's trials still
RUNNING there are watched again (the job was re-queued by the scheduler and resumes from its
checkpoint; a job that ended meanwhile is told from its `finished` event); one asked but never
submitted (killed in between) is submitted now with the values Optuna recorded. Finished trials stay.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agentd.events import SweepFinished, SweepTrial
from agentd.scheduler import SubmitRefused
from agentd.sweep import study as st
from agentd.sweep.spec import Sweep, corners, load_sweep, parallel_warning, suggest
from trainer.api import atomic_write_json
from trainer.errors import ConfigError

log = logging.getLogger("agentd.sweep")

POLL_S = 0.5


@dataclass
class Watch:
    """A trial this box runs: its job, how far its events were read, its validation losses."""

    number: int
    trial_id: int
    job_id: str | None
    params: dict
    seq: int = 0
    val_losses: list = field(default_factory=list)
    reported: set = field(default_factory=set)
    pruning: bool = False


class SweepManager:
    def __init__(self, scheduler, journal, state_dir: Path, password_file: Path | None):
        self.scheduler, self.journal = scheduler, journal
        self.box = st.box_id(state_dir)
        self.password_file = password_file
        self.runs: dict[str, SweepRun] = {}
        self.lock = threading.Lock()

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip() or None

    def start(self) -> list[str]:
        """Resume the sweeps the journal says were running (after a stop or a crash)."""
        resumed = []
        for rec in self.journal.sweeps("running"):
            try:
                sweep = load_sweep(Path(rec["source"]), rec["text"], rec["base_text"])
                self._launch(sweep, rec["submitter"], rec["env"], rec["text"])
                resumed.append(rec["name"])
            except Exception as e:
                log.error("sweep %s cannot resume: %s", rec["name"], e)
                self.journal.sweep_end(rec["name"], "failed", f"cannot resume: {e}")
        return resumed

    def run(self, source: str, text: str, base_text: str, submitter: dict, env: dict) -> "SweepRun":
        """Check a sweep file for its submitter and start it (SubmitRefused: nothing started). `text`,
        `base_text`: the sweep file and its base config as the submitter read them (the daemon never reads
        a config on a submitter's behalf). The same file while its sweep runs is followed, not started
        twice; another file of the same name is refused."""
        try:
            sweep = load_sweep(Path(source), text, base_text)
            # The submitter's access to the base config's data and the trial folders, before anything runs.
            first = corners(sweep.spec)[0]
            self.scheduler.runner.check(sweep.trial_config(0, first), str(sweep.base_path), submitter)
            st.load_study(sweep, self.password())  # a PostgreSQL study that does not open: refused now
        except ConfigError as e:
            raise SubmitRefused("invalid_config", e.render(), e.to_dict()) from None
        with self.lock:
            running = self.runs.get(sweep.spec.name)
            if running is not None and running.thread.is_alive() and running.text == text \
                    and running.sweep.source == sweep.source:
                running.attached = True
                return running  # the same file again (a second matrix cell on this box): follow it
            if not self.journal.sweep_start(name=sweep.spec.name, source=sweep.source, text=text,
                                            base_text=sweep.base_text, folder=str(sweep.folder),
                                            submitter=submitter, env=env):
                raise SubmitRefused("invalid_config", f"{sweep.source}: name: a sweep named {sweep.spec.name!r} is "
                                   "running already\n    fix: wait for it, `agentd sweep stop "
                                   f"{sweep.spec.name}`, or give this sweep another name")
            run = self._launch(sweep, submitter, env, text, locked=True)
        warning = parallel_warning(sweep.spec.parallel, len(self.scheduler.slots))
        if warning:
            run.warnings.append(warning)
        return run

    def _launch(self, sweep: Sweep, submitter: dict, env: dict, text: str, locked: bool = False) -> "SweepRun":
        run = SweepRun(self, sweep, submitter, env, text)
        if locked:
            self.runs[sweep.spec.name] = run
        else:
            with self.lock:
                self.runs[sweep.spec.name] = run
        run.thread.start()
        return run

    def owner(self, name: str, build_uid: int | None):
        """The running sweep's owner for agentd.permissions (None: no such sweep running here). A sweep the
        build user submitted has no one capability to hold, so only operators stop it."""
        from agentd.permissions import Owner

        run = self.get(name)
        if run is None:
            return None
        sub = run.submitter or {}
        owner = Owner(uid=sub.get("uid"), user=sub.get("user"), job_name=run.env.get("JOB_NAME"),
                      build_number=run.env.get("BUILD_NUMBER"))
        if build_uid is not None and owner.uid == build_uid:
            return Owner(uid=None, user=owner.user, capability_sha256="", job_name=owner.job_name,
                         build_number=owner.build_number)
        return owner

    def get(self, name: str) -> "SweepRun | None":
        with self.lock:
            return self.runs.get(name)

    def sweep(self, name: str) -> Sweep:
        """A sweep this daemon ran or runs (SubmitRefused not_found otherwise)."""
        run = self.get(name)
        if run is not None:
            return run.sweep
        rec = next((r for r in self.journal.sweeps() if r["name"] == name), None)
        if rec is None:
            raise SubmitRefused("not_found", f"no sweep {name!r} on this daemon")
        try:
            return load_sweep(Path(rec["source"]), rec["text"], rec["base_text"])
        except ConfigError as e:
            raise SubmitRefused("invalid_config", e.render()) from None

    def status(self, name: str) -> dict:
        from agentd.sweep.report import summary

        sweep = self.sweep(name)
        rec = next((r for r in self.journal.sweeps() if r["name"] == name), {})
        study = st.load_study(sweep, self.password(), create=False)
        return {"name": name, "state": rec.get("state"), "folder": str(sweep.folder), **summary(sweep, study)}

    def report(self, name: str, html: bool) -> dict:
        from agentd.sweep.report import write_report

        sweep = self.sweep(name)
        study = st.load_study(sweep, self.password(), create=False)
        return write_report(sweep, study, html=html)

    def stop(self, name: str) -> str:
        run = self.get(name)
        if run is None or not run.thread.is_alive():
            raise SubmitRefused("bad_state", f"sweep {name!r} is not running on this daemon")
        run.request_stop()
        return "stopping"

    def shutdown(self) -> None:
        """The daemon stops: each sweep thread ends where it is (its running trials end interrupted and
        resume, with the sweep, at the next start)."""
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.daemon_stopping.set()
        for run in runs:
            run.thread.join(30)


class SweepRun:
    def __init__(self, manager: SweepManager, sweep: Sweep, submitter: dict, env: dict, text: str):
        self.m, self.sweep, self.submitter, self.env, self.text = manager, sweep, submitter, env, text
        self.attached = False  # a later `agentd sweep run` of the same file follows this one
        self.name = sweep.spec.name
        self.watched: dict[int, Watch] = {}
        self.stopping = False
        self.daemon_stopping = threading.Event()
        self.subscribers: list[queue.Queue] = []
        self.sub_lock = threading.Lock()
        self.ended: dict | None = None
        self.warnings: list[str] = []
        self.thread = threading.Thread(target=self._main, name=f"sweep-{self.name}", daemon=True)

    # --- followers ----------------------------------------------------------------------------------
    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self.sub_lock:
            if self.ended is not None:
                q.put({"event": self.ended})
                q.put(None)
            else:
                self.subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self.sub_lock:
            if q in self.subscribers:
                self.subscribers.remove(q)

    def _publish(self, msg: dict | None) -> None:
        with self.sub_lock:
            for q in self.subscribers:
                q.put(msg)

    def _say(self, number: int, state: str, params: dict, value=None, detail=None) -> None:
        ev = SweepTrial(sweep=self.name, trial=number, state=state, params=params, value=value, detail=detail)
        log.info("sweep %s: %s", self.name, ev.line())
        self._publish({"event": ev.to_dict()})

    def request_stop(self) -> None:
        self.stopping = True
        for w in list(self.watched.values()):
            if w.job_id:
                self.m.scheduler.cancel(w.job_id, why=f"sweep {self.name} stopped")

    # --- the loop -----------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.study = st.load_study(self.sweep, self.m.password())
            self._recover()
            while not self.daemon_stopping.is_set():
                self._poll()
                if not self.stopping:
                    self._ask()
                if not self.watched and (self.stopping or self._all_asked()):
                    self._finish("stopped" if self.stopping else "finished")
                    return
                self.daemon_stopping.wait(POLL_S)
        except Exception as e:
            log.exception("sweep %s failed", self.name)
            self._finish("failed", f"{type(e).__name__}: {e}")

    def _all_asked(self) -> bool:
        return len(st.sweep_trials(self.study, self.sweep.spec.trials)) >= self.sweep.spec.trials

    def _recover(self) -> None:
        import optuna

        for t in st.sweep_trials(self.study, self.sweep.spec.trials):
            if t.state != optuna.trial.TrialState.RUNNING or t.user_attrs.get(st.BOX_ATTR) != self.m.box:
                continue
            rec = self.m.journal.job_for_output(str(self.sweep.trial_folder(t.number)))
            w = Watch(t.number, t._trial_id, rec["id"] if rec else None, dict(t.params),
                      reported=set(t.intermediate_values))
            self.watched[t.number] = w
            if rec is None:
                self._submit(w)
            else:
                self._say(t.number, "resumed", w.params, detail=f"watching {rec['id']} ({rec['state']})")

    def _ask(self) -> None:
        import optuna

        spec = self.sweep.spec
        while len(self.watched) < spec.parallel and not self._all_asked():
            trial = self.study.ask()
            if trial.number >= spec.trials:  # another box asked at the same moment: never run it
                trial.set_user_attr(st.SURPLUS_ATTR, True)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return
            trial.set_user_attr(st.BOX_ATTR, self.m.box)
            params = {name: suggest(trial, name, p) for name, p in spec.parameters.items()}
            w = Watch(trial.number, trial._trial_id, None, params)
            self.watched[trial.number] = w
            self._submit(w)

    def _submit(self, w: Watch) -> None:
        sweep = self.sweep
        try:
            w.job_id, _ = self.m.scheduler.submit(
                config_path=str(sweep.base_path), config_text=sweep.trial_config_text(w.number, w.params),
                env=self.env, submitter=self.submitter,
                sweep={"name": self.name, "trial": w.number, "folder": str(sweep.folder)})
        except SubmitRefused as e:
            self._tell(w, "fail", None, f"refused: {e.message}")
            return
        self._say(w.number, "started", w.params, detail=f"as {w.job_id} in {sweep.trial_folder(w.number)}")

    def _poll(self) -> None:
        import optuna

        for w in list(self.watched.values()):
            if w.job_id is None:
                continue
            for ev in self.m.journal.events(w.job_id, w.seq):
                w.seq = ev.get("seq", w.seq)
                self._publish({"trial": w.number, "event": ev})
                kind = ev.get("type")
                if kind == "validation":
                    w.val_losses.append(ev["val_loss"])
                    if not w.pruning:
                        trial = optuna.trial.Trial(self.study, w.trial_id)
                        if ev["step"] not in w.reported:  # replayed after a restart: reported already
                            w.reported.add(ev["step"])
                            trial.report(ev["val_loss"], ev["step"])
                        # asked again on a replay too: a prune decided just before a crash still stops it
                        if trial.should_prune():
                            w.pruning = True
                            why = (f"pruned by sweep {self.name}: validation loss {ev['val_loss']:.4f} at step "
                                   f"{ev['step']} is worse than the median of earlier trials")
                            self._say(w.number, "pruning", w.params, detail=why)
                            self.m.scheduler.cancel(w.job_id, why=f"pruned by sweep {self.name}")
                elif kind == "finished":
                    self._finished(w, ev)
                    break

    def _finished(self, w: Watch, ev: dict) -> None:
        outcome = ev.get("outcome")
        steps = ev.get("step")
        if outcome == "succeeded":
            value, why = st.objective_value(self.sweep, Path(ev.get("output_dir") or ""), w.val_losses)
            self._tell(w, "complete" if value is not None else "fail", value, why or None, steps)
        elif outcome == "cancelled" and w.pruning:
            self._tell(w, "pruned", None, f"stopped at step {steps}", steps)
        else:
            self._tell(w, "fail", None, f"job {outcome}: {ev.get('error')}", steps)

    def _tell(self, w: Watch, state: str, value, detail: str | None, steps: int | None = None) -> None:
        import optuna

        states = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                  "fail": optuna.trial.TrialState.FAIL}
        trial = optuna.trial.Trial(self.study, w.trial_id)
        for key, v in (("job_id", w.job_id), ("steps", steps), ("output_dir", str(self.sweep.trial_folder(w.number))),
                       ("detail", detail)):
            if v is not None:
                trial.set_user_attr(key, v)
        self.study.tell(w.number, value if state == "complete" else None, state=states[state])
        self.watched.pop(w.number, None)
        self._say(w.number, state, w.params, value=value, detail=detail)
        self._write_best()

    def _write_best(self) -> None:
        """best.json in the sweep folder: what `SWEEP:best` resolves to (agentd.sweep.best)."""
        try:
            best = self.study.best_trial
        except ValueError:
            return
        atomic_write_json(self.sweep.folder / "best.json",
                          {"sweep": self.name, "trial": best.number, "value": best.value, "params": best.params,
                           "output_dir": best.user_attrs.get("output_dir",
                                                             str(self.sweep.trial_folder(best.number)))})

    def _finish(self, outcome: str, error: str | None = None) -> None:
        from agentd.sweep.report import summary, write_report

        counts, best, report = {}, None, None
        try:
            study = self.study
            s = summary(self.sweep, study)
            counts, best = s["counts"], s["best"]
            report = write_report(self.sweep, study, html=True)["html"]
        except Exception as e:
            log.exception("sweep %s: report failed", self.name)
            error = error or f"report failed: {e}"
        self.m.journal.sweep_end(self.name, outcome, error)
        ev = SweepFinished(sweep=self.name, outcome=outcome if not error else f"{outcome} ({error})", counts=counts,
                           best_trial=best["number"] if best else None, best_value=best["value"] if best else None,
                           report=report)
        log.info("%s", ev.line())
        with self.sub_lock:
            self.ended = ev.to_dict()
        self._publish({"event": self.ended})
        self._publish(None)
