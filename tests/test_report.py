"""The report in a real browser (headless Chromium, Debian's package) and `agentd compare`.

Two finished tiny runs in one output_dir (the second with a changed learning_rate, so the first moved to
runs/). Chromium loads a test copy of report.html with a tiny script that writes every image's
naturalWidth into the DOM, then `--dump-dom` prints it; a screenshot is kept under tests/output/.
Without a chromium binary (`make test` installs it where it can) this one test is skipped, saying why.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, write_config

ARTIFACTS = ROOT / "tests" / "output"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMAGE_CHECK = """<script>
window.addEventListener('load', () => {
  const found = [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight}));
  const out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def rendered_in_chromium(browser: str, page: Path, tmp_path: Path) -> tuple[str, list[dict]]:
    """(the DOM once loaded, every image's alt and natural size: 0 when it did not decode) of `page` in
    headless chromium."""
    check = tmp_path / f"{page.stem}-check.html"
    check.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / f'{page.stem}-profile'}",
                          "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    return dom.stdout, json.loads(found.group(1).replace("&quot;", '"'))


@pytest.fixture(scope="module")
def two_runs(assets, built_once) -> Path:
    """output_dir with a finished run (learning_rate 1e-3) and the previous one (2e-3) in runs/ (built once,
    shared by the workers: the tests only read it)."""
    def build(folder: Path) -> None:
        cfg = write_config(folder, assets, max_train_steps=6, save_steps=6, validation_split=0.25, batch_size=2,
                           validate_every_n_steps=2, sample_prompts=["a red circle --s 3", "a blue square --s 3"],
                           sample_every_n_steps=3)
        for lr in ("2e-3", "1e-3"):
            cfg.write_text(re.sub(r"learning_rate: \S+", f"learning_rate: {lr}", cfg.read_text()))
            proc = subprocess.run([str(BIN / "lora-train"), "--config", str(cfg)], capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stderr

    return built_once("report-two-runs", build) / "out"


def test_report_is_self_contained_and_compares(two_runs):
    page = (two_runs / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page), "every image inline, nothing fetched"
    assert "Comparison with 20" in page and "learning_rate" in page
    assert re.search(r"validation loss [\d.]+ vs [\d.]+ last run: (better|worse|the same)", page)
    assert (two_runs / "logs/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (two_runs / "logs/summary.csv").read_text().splitlines()
    assert "val_loss" in summary[0].split(",")
    # The header names the device as `agentd status` does (not the CPU's architecture).
    assert "<tr><td>device</td><td>cpu</td></tr>" in page


def test_loss_legend_shows_every_series_line_and_gpu_device_label(two_runs):
    from trainer.runs.report import device_label, loss_figure, read_run

    legend = loss_figure(read_run(two_runs)).axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["loss", "loss (smoothed)", "validation loss", "learning rate"]
    for line in legend.get_lines():  # the raw loss is drawn at alpha 0.3, 0.8 px: its sample must still show
        assert (line.get_alpha() or 1.0) >= 0.6 and line.get_linewidth() >= 2.0, line.get_label()
    assert device_label({"type": "cuda", "name": "NVIDIA GeForce RTX 4090", "index": 1}) == \
        "NVIDIA GeForce RTX 4090 (cuda:1)"


def test_report_in_headless_chromium(two_runs, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary: install Debian's `chromium` package (make test does it when run as root)")
    dom, images = rendered_in_chromium(browser, two_runs / "report.html", tmp_path)
    assert len(images) >= 5, images  # loss chart, grid, overlay, both grids side by side
    assert all(i["width"] > 0 and i["height"] > 0 for i in images), f"an image did not decode: {images}"
    comparison = dom[dom.index('id="comparison"'):]
    assert "learning_rate" in comparison and "0.002" in comparison and "0.001" in comparison

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-2'}",
                           "--window-size=1200,3200", f"--screenshot={shot}", (two_runs / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    shutil.copy(two_runs / "report.html", ARTIFACTS / "report.html")


def test_agentd_compare(two_runs, tmp_path):
    agentd = str(BIN / "agentd")
    proc = subprocess.run([agentd, "compare", str(two_runs), "previous", "--html", str(tmp_path / "c.html")],
                          capture_output=True, text=True, timeout=120, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "learning_rate" in out and "0.002" in out and "0.001" in out
    assert "validation loss" in out and re.search(r"verdict \(A vs B\): validation loss [\d.]+ vs [\d.]+ B", out)
    assert 'id="comparison"' in (tmp_path / "c.html").read_text()
    (previous,) = (two_runs / "runs").iterdir()
    same = subprocess.run([agentd, "compare", str(previous), str(previous)], capture_output=True, text=True,
                          timeout=120)
    assert same.returncode == 0 and "no config changes" in same.stdout and "the same" in same.stdout
    bad = subprocess.run([agentd, "compare", str(two_runs), str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "is not a run folder" in bad.stderr
    none = subprocess.run([agentd, "compare", str(previous), "previous"], capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "has no previous run" in none.stderr


def test_compare_imports_no_torch(two_runs):
    code = ("import sys; from agentd.cli import main; main(['compare', sys.argv[1], 'previous']); "
            "assert 'torch' not in sys.modules, 'compare imported torch'")
    proc = subprocess.run([str(BIN / "python"), "-c", code, str(two_runs)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_compare_with_names_the_run_to_compare(two_runs, tmp_path, assets):
    (baseline,) = (two_runs / "runs").iterdir()
    cfg = write_config(tmp_path, assets, max_train_steps=2, save_steps=2, compare_with=str(baseline))
    proc = subprocess.run([str(BIN / "lora-train"), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "out/report.html").read_text()
    assert f"Comparison with {baseline.name}" in page
    assert "training loss (mean of the last 10 steps)" in page  # no validation here: the verdict says so
