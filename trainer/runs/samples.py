"""The samples folder of a run: `samples/step-<N>/<prompt index>.png|.txt` per round (step 0 =
`sample_at_start`) and `samples/grid.png` (rows: prompts, columns: the rounds), written at the end of the run.
"""
from __future__ import annotations

from pathlib import Path

from trainer.data.prompts import SamplePrompt
from trainer.runs.outputs import atomic_write_bytes


def round_dir(samples_dir: Path, step: int) -> Path:
    return Path(samples_dir) / f"step-{step:08d}"


def rounds(samples_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each sampling round on disk, in step order."""
    if not Path(samples_dir).is_dir():
        return []
    out = []
    for p in Path(samples_dir).iterdir():
        if p.is_dir() and p.name.startswith("step-"):
            try:
                out.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(out)


def write_grid(samples_dir: Path, prompts: list[SamplePrompt]) -> Path | None:
    """samples/grid.png: one row per prompt, one column per round (labelled with its step), written
    atomically. None when no round holds an image (text mode)."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    cols = [(step, folder) for step, folder in rounds(samples_dir) if any(folder.glob("*.png"))]
    if not cols or not prompts:
        return None
    cell = max(64, min(256, max(max(p.width, p.height) for p in prompts)))  # readable even for a 32 px model
    label_h, pad, left = 14, 2, 150  # a step label above each cell; the prompt's text in a left column
    grid = Image.new("RGB", (left + len(cols) * (cell + pad) + pad, len(prompts) * (cell + label_h + pad) + pad),
                     "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        y = pad + r * (cell + label_h + pad) + label_h
        words, lines = prompt.prompt.split(), [""]
        for w in words:  # wrap to ~22 characters a line, at most as many lines as the cell holds
            lines[-1:] = [f"{lines[-1]} {w}".strip()] if len(lines[-1]) + len(w) < 22 else [lines[-1], w]
        for i, line in enumerate(lines[: cell // 12]):
            draw.text((4, y + i * 12), line, fill="black")
    for c, (step, folder) in enumerate(cols):
        for r in range(len(prompts)):
            x, y = left + pad + c * (cell + pad), pad + r * (cell + label_h + pad)
            draw.text((x + 2, y), f"step {step}", fill="black")
            f = folder / f"{r:02d}.png"
            if f.is_file():
                with Image.open(f) as im:
                    grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y + label_h))
            else:
                draw.rectangle([x, y + label_h, x + cell - 1, y + label_h + cell - 1], outline="red")
                draw.text((x + 4, y + label_h + cell // 2), "failed", fill="red")
    buf = BytesIO()
    grid.save(buf, format="PNG")
    path = Path(samples_dir) / "grid.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def text_samples(samples_dir: Path) -> list[tuple[int, list[str]]]:
    """Text mode: (step, [completion of each prompt]) per round, for the report."""
    return [(step, [f.read_text(encoding="utf-8", errors="replace") for f in sorted(folder.glob("*.txt"))])
            for step, folder in rounds(samples_dir) if any(folder.glob("*.txt"))]
