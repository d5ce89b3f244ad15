"""The job's console, for `agentd run` and `lora-train` alike: plain lines, or a live display on a terminal.

Plain (the Jenkins console, CI, a pipe, a file, `--plain`): one line per event, `format_event`'s, exactly
as every reader of the events shows them. Live (a person at a terminal): the same lines for every event
but the steps, which drive a progress row at the bottom instead (step/total and a bar, epoch, loss and its
smoothed value, it/s, ETA), so the last event line (a checkpoint, a sample, a warning) stands right above
it. Nothing is hidden: every line a plain console shows but the logged steps is printed in full, and
what is written to stderr meanwhile (a library's error, a traceback) is printed above the row too
(rich's Live redirects it). The display stops at the job's `finished`, leaving its last state.

`live_wanted` decides which (pure); `Console` renders typed events (trainer.events) or their dicts.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from trainer.events import Finished, Step, format_duration, from_dict

# Set in CI systems' builds (Jenkins sets JENKINS_URL and BUILD_NUMBER, most others CI=true): their consoles
# keep one line per event even when a pseudo-terminal is attached.
CI_VARIABLES = ("JENKINS_URL", "BUILD_NUMBER", "GITHUB_ACTIONS", "GITLAB_CI")


def live_wanted(is_tty: bool, env: Mapping[str, str], plain: bool = False) -> bool:
    """Whether a console shows the live display: only on a terminal, never in CI, never with --plain."""
    if plain or not is_tty:
        return False
    if env.get("CI", "").lower() not in ("", "0", "false") or any(env.get(v) for v in CI_VARIABLES):
        return False
    return env.get("TERM") != "dumb"


def progress_row(ev: Step) -> str:
    """The text of the live row for a step (the bar is drawn beside it)."""
    return (f"step {ev.step}/{ev.total_steps}  epoch {ev.epoch}  loss {ev.loss:.4f} (smoothed {ev.loss_mean:.4f})  "
            f"{ev.it_s or 0:.2f} it/s  ETA {format_duration(ev.eta_s)}")


class Console:
    """A reporter (`emit`) and the place a command's own messages go (`say`), plain or live."""

    def __init__(self, stream=None, *, plain: bool = False, env: Mapping[str, str] | None = None):
        self.stream = stream or sys.stdout
        self.live = live_wanted(self.stream.isatty(), os.environ if env is None else env, plain)
        self._display = None  # rich.live.Live while a job is stepping
        self._last: Step | None = None

    def emit(self, ev) -> None:
        ev = from_dict(ev)
        if self.live and isinstance(ev, Step):
            self._show(ev)
            return
        if isinstance(ev, Finished):
            self.close()  # the job's last line goes below its last progress row
        line = ev.line()
        if line is not None:
            self.say(line)

    def say(self, text: str) -> None:
        """A line above the live row (or simply a line)."""
        if self._display is not None:
            self._display.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the live display, leaving its last row on the screen."""
        if self._display is not None:
            self._display.stop()
            self._display = None

    def _show(self, ev: Step) -> None:
        self._last = ev
        if self._display is None:
            from rich.console import Console as RichConsole
            from rich.live import Live

            self._display = Live(self, console=RichConsole(file=self.stream), refresh_per_second=8,
                                 redirect_stdout=False, redirect_stderr=True, transient=False)
            self._display.start()
        self._display.refresh()

    def __rich__(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        ev = self._last
        row = Table.grid(padding=(0, 1))
        row.add_column(no_wrap=True)
        row.add_column(overflow="fold")  # a narrow terminal folds the figures onto a second line, cuts none
        row.add_row(ProgressBar(total=max(ev.total_steps, 1), completed=ev.step, width=20), progress_row(ev))
        return row
