"""The job console a person sees: plain lines (CI, pipes), the live display on a terminal, and no third-party
noise in it.

The terminal test runs `agentd run` in a real pseudo-terminal (tmux, Debian's package: `make test` installs
it where it can, else that test skips saying why), records every byte written to the pane (`pipe-pane`)
and reads the final screen (`capture-pane`); the same job followed through a pipe at the same time (the
second `agentd run` of the config attaches to it) must print today's plain lines.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN, ROOT, write_config
from tests.daemon_harness import DaemonProc
from trainer.console import Console, live_wanted
from trainer.events import Checkpoint, Finished, Started, Step, WarningEvent

ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][A-Z0-9]|[=>78])")

EVENTS = [
    Started(name="demo", total_steps=6, device="cpu", samples=24, batch_size=4, grad_accum=1),
    Step(step=1, total_steps=6, epoch="1/2", loss=0.61234, loss_mean=0.61234, lr=1e-4, it_s=2.0, eta_s=2.5),
    Step(step=2, total_steps=6, epoch="1/2", loss=0.5, loss_mean=0.6, lr=1e-4, it_s=2.0, eta_s=2.0, logged=False),
    WarningEvent(message="3 captions are empty"),
    Checkpoint(step=3, path="/out/checkpoints/step-00000003"),
    Step(step=3, total_steps=6, epoch="1/2", loss=0.5, loss_mean=0.6, lr=1e-4, it_s=2.0, eta_s=1.5),
    Finished(outcome="succeeded", output_dir="/out", final_loss=0.5),
]
# What a Jenkins console shows for EVENTS (the plain lines as they were before the live display existed).
PLAIN = """\
training demo: 6 steps on cpu (24 samples, batch 4 x 1)
step 1/6  epoch 1/2  loss 0.6123 (mean 0.6123)  lr 1.00e-04  2.00 it/s  ETA 0:00:02
WARNING: 3 captions are empty
checkpoint step 3 -> /out/checkpoints/step-00000003
step 3/6  epoch 1/2  loss 0.5000 (mean 0.6000)  lr 1.00e-04  2.00 it/s  ETA 0:00:01
succeeded (final loss 0.5000) -> /out
"""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty,env,plain,live", [
    (True, {"TERM": "xterm-256color"}, False, True),
    (False, {"TERM": "xterm-256color"}, False, False),  # a pipe or a file
    (True, {"TERM": "xterm", "CI": "true"}, False, False),
    (True, {"TERM": "xterm", "JENKINS_URL": "https://ci.example/"}, False, False),
    (True, {"TERM": "xterm", "BUILD_NUMBER": "12"}, False, False),
    (True, {"TERM": "xterm", "CI": "false"}, False, True),
    (True, {"TERM": "dumb"}, False, False),
    (True, {"TERM": "xterm"}, True, False),  # --plain
])
def test_live_display_only_on_a_terminal_outside_ci(tty, env, plain, live):
    assert live_wanted(tty, env, plain) is live


def test_plain_console_prints_todays_lines():
    out = io.StringIO()
    console = Console(out, env={"TERM": "xterm"})
    for ev in EVENTS:
        console.emit(ev.to_dict())  # as they come over the socket
    assert out.getvalue() == PLAIN


def test_live_console_shows_progress_and_hides_no_warning_or_error(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    out = Terminal()
    console = Console(out, env={"TERM": "xterm-256color"})
    assert console.live
    for ev in EVENTS[:4]:
        console.emit(ev)
    print("Traceback: a library's error on stderr", file=sys.stderr)  # while the display runs
    for ev in EVENTS[4:]:
        console.emit(ev)
    text = ANSI.sub("", out.getvalue())
    for line in PLAIN.splitlines():  # every line but the steps', in full
        if not line.startswith("step "):
            assert line in text, line
    assert "lr 1.00e-04" not in text  # the steps drive the progress row instead of printing lines
    assert "step 1/6  epoch 1/2  loss 0.6123 (smoothed 0.6123)  2.00 it/s  ETA 0:00:02" in text
    assert "step 3/6  epoch 1/2  loss 0.5000 (smoothed 0.6000)  2.00 it/s  ETA 0:00:01" in text
    assert "Traceback: a library's error on stderr" in text
    assert sys.stderr is sys.__stderr__ or not hasattr(sys.stderr, "rich_proxied_file")  # the display stopped


def test_third_party_import_noise_is_filtered_and_the_rest_shows(tmp_path):
    # The demo's path (agentd demo -> the tiny SD pipeline) imports diffusers' pipelines, whose image
    # processors (CLIP's, SigLIP's) make transformers warn about torchvision, and `import peft` makes
    # bitsandbytes log a kernel download failure on this CPU: none of it may reach the console; other
    # warnings must.
    script = (
        "import logging, warnings\n"
        "from trainer.api import quiet_third_party\n"
        "quiet_third_party()\n"
        "from transformers import CLIPImageProcessor, SiglipImageProcessor\n"
        "import peft\n"
        "warnings.warn('a warning of ours', UserWarning)\n"
        "logging.getLogger('somelib').warning('another library warns')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["<string>:6: UserWarning: a warning of ours", "another library warns"], proc.stderr


def _tmux() -> str | None:
    return shutil.which("tmux")


@pytest.mark.skipif(_tmux() is None, reason="tmux is not installed (`make test` installs Debian's tmux as root)")
def test_agentd_run_live_in_a_terminal_and_plain_through_a_pipe(tmp_path, assets):
    (tmp_path / "job").mkdir()
    (tmp_path / "daemon").mkdir()
    cfg = write_config(tmp_path / "job", assets, max_train_steps=12, save_steps=6)
    daemon = DaemonProc(tmp_path / "daemon").start()
    server = f"agentd-test-{tmp_path.name}"
    tmux = [_tmux(), "-L", server, "-f", "/dev/null"]
    raw, done = tmp_path / "pane.raw", tmp_path / "done"
    command = (f"env -u CI -u JENKINS_URL -u BUILD_NUMBER TERM=xterm-256color {BIN / 'agentd'} run {cfg} "
               f"--socket {daemon.socket}; echo $? > {done}; sleep 600")
    try:
        subprocess.run(tmux + ["new-session", "-d", "-s", "t", "-x", "80", "-y", "50", command], check=True)
        subprocess.run(tmux + ["pipe-pane", "-t", "t", "-o", f"cat >> {raw}"], check=True)
        piped = daemon.run("run", str(cfg))  # the same job, through a pipe: it attaches (or submits first)
        deadline = time.monotonic() + 300
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        screen = subprocess.run(tmux + ["capture-pane", "-p", "-J", "-t", "t", "-S", "-200"], capture_output=True,
                                text=True, check=True).stdout
        job_id = re.search(r"job-\d+", piped.stdout)[0]
        logs = daemon.run("logs", job_id)
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
        daemon.stop()
    assert done.read_text().strip() == "0", screen
    assert piped.returncode == 0, piped.stdout + piped.stderr

    # Piped: today's plain lines, byte for byte the lines `agentd logs` formats from the journal's events.
    lines = piped.stdout.splitlines()
    assert re.fullmatch(rf"(submitted {job_id}|attached to {job_id}, already queued or running for this "
                        r"output folder)", lines[0])
    assert lines[1:] == [line[len("HH:MM:SS "):] for line in logs.stdout.splitlines()]
    assert any(re.fullmatch(r"step 12/12  epoch \S+  loss \d\.\d{4} \(mean \d\.\d{4}\)  lr \S+  [\d.]+ it/s  "
                            r"ETA 0:00:00", line) for line in lines), piped.stdout
    others = [line for line in lines[1:] if not line.startswith("step ")]

    # The terminal: the progress row was redrawn in place (several steps in the bytes written, one row on
    # the final screen), every other line printed in full above it, no plain step line.
    drawn = {int(m) for m in re.findall(r"step (\d+)/12  epoch", ANSI.sub("", raw.read_text(errors="replace")))}
    assert len(drawn) >= 3, drawn
    shown = [line.rstrip() for line in screen.splitlines()]  # -J: lines the terminal wrapped, joined
    rows = [line for line in shown if "(smoothed" in line]
    assert len(rows) == 1 and "step 12/12" in rows[0], screen
    # 80 columns: the figures that do not fit fold onto a second line under the text, none cut off.
    folded = shown[shown.index(rows[0]) + 1]  # rich's own fold: a line of its own, under the text
    assert folded.startswith(" " * 21) and folded.strip(), screen
    assert re.search(r"step 12/12  epoch \S+  loss [\d.]+ \(smoothed [\d.]+\)\s+[\d.]+\s+it/s\s+ETA\s+0:00:00",
                     rows[0] + " " + folded.strip()), screen
    assert not any(re.match(r"step \d+/12  epoch .* lr ", line) for line in shown), screen
    for line in others:
        assert line in shown, (line, screen)
    last = next(i for i, line in enumerate(shown) if line.startswith("succeeded (final loss"))
    assert shown.index(f"checkpoint step 12 -> {tmp_path / 'job/out/checkpoints/step-00000012'}") < \
        shown.index(rows[0]) < last
