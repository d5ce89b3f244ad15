"""Samples while training: the prompts (kohya's prompt-file syntax), when to sample, and the grid.

Prompts come from `sample_prompts`: a list in the config, or a text file with one prompt per line
(blank lines and lines starting with `#` are skipped). Each prompt may carry kohya's options
(sd-scripts' `--sample_prompts` syntax):

    a red circle on white --n blurry, text --w 512 --h 512 --s 20 --l 7.5 --d 42 --ss euler_a

    --n  negative prompt          --s  denoising steps (default 20)
    --w  width  (default: resolution, rounded down to a multiple of 8)
    --h  height (default: resolution)   --l  guidance scale (default 7.5)
    --d  seed (default: the config's seed + the prompt's index)   --ss  sampler (default sample_sampler)

Every prompt has a fixed seed, so successive samples of one prompt differ only by what was trained.
Text mode samples greedy completions of the prompts (the options other than the prompt are ignored).

Files: `samples/step-<N>/<prompt index>.png|.txt` per round (step 0 = `sample_at_start`), and
`samples/grid.png` (rows: prompts, columns: the rounds), written at the end of the run. A prompt that
fails to sample (out of memory, a sampler that rejects the options) is a warning event, never a failed
job. The rendering itself is the model family's `Task.render_sample` hook.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.errors import Problem

OPTIONS = {"n": "negative", "w": "width", "h": "height", "s": "steps", "l": "guidance", "d": "seed", "ss": "sampler"}
DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 7.5

# kohya's sampler names -> (diffusers scheduler class, extra config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    sampler: str = "ddim"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_prompt(text: str, index: int, *, resolution: int, seed: int, sampler: str,
                 where: str) -> SamplePrompt:
    """One prompt line in kohya's syntax. Raises ValueError naming the option (with `where`)."""
    head, *args = text.split(" --")
    values: dict = {"prompt": head.strip(), "width": resolution // 8 * 8, "height": resolution // 8 * 8,
                    "seed": seed + index, "sampler": sampler}
    for arg in args:
        name, _, value = arg.strip().partition(" ")
        if name not in OPTIONS:  # said by position: the file's text is not echoed (it may be anyone's file)
            raise ValueError(f"{where}: option {args.index(arg) + 1} is not a known option (known: "
                             f"{', '.join('--' + o for o in OPTIONS)})")
        key, value = OPTIONS[name], value.strip()
        try:
            if key in ("width", "height", "steps", "seed"):
                values[key] = int(value)
                if key != "seed" and values[key] <= 0:
                    raise ValueError
            elif key == "guidance":
                values[key] = float(value)
            elif key == "sampler" and value not in SCHEDULERS:
                raise ValueError
            else:
                values[key] = value
        except ValueError:
            known = f" (one of {', '.join(SCHEDULERS)})" if key == "sampler" else ""
            raise ValueError(f"{where}: the value of --{name} is not a valid {key}{known}") from None
    if key_dims := [k for k in ("width", "height") if values[k] % 8]:
        raise ValueError(f"{where}: --{key_dims[0][0]} must be a multiple of 8 (got {values[key_dims[0]]})")
    if not values["prompt"]:
        raise ValueError(f"{where}: the prompt is empty")
    return SamplePrompt(**values)


def load_prompts(cfg) -> tuple[list[SamplePrompt], list[Problem]]:
    """The config's sample prompts, parsed; or the problems (file missing, unknown option with its line)."""
    src = cfg.sample_prompts
    kw = dict(resolution=cfg.resolution or 512, seed=cfg.seed, sampler=cfg.sample_sampler)
    if isinstance(src, list):
        lines = [(f"sample_prompts[{i}]", t) for i, t in enumerate(src)]
    else:
        path = Path(src)
        if path.suffix.lower() in (".json", ".toml"):
            return [], [Problem("sample_prompts", f"{path.suffix} prompt files are not read (only kohya's text syntax)",
                                "write one prompt per line, options as --n --w --h --s --l --d --ss, in a .txt file",
                                str(path))]
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], [Problem("sample_prompts", "prompt file does not exist",
                                "point sample_prompts at a text file (one prompt per line) or give a list", str(path))]
        except (OSError, UnicodeDecodeError) as e:
            return [], [Problem("sample_prompts", f"cannot read the prompt file ({type(e).__name__})",
                                "make it a readable UTF-8 text file", str(path))]
        lines = [(f"{path}:{n}", t) for n, t in enumerate(text.splitlines(), 1)
                 if t.strip() and not t.lstrip().startswith("#")]
    prompts, problems = [], []
    for where, line in lines:
        try:
            prompts.append(parse_prompt(line.strip(), len(prompts), where=where, **kw))
        except ValueError as e:
            problems.append(Problem("sample_prompts", str(e), "fix the prompt line: options are --n --w --h --s "
                                    "--l --d --ss, each followed by a value"))
    return prompts, problems


def problems(cfg) -> list[Problem]:
    """Preflight: the prompt file and every prompt line must parse."""
    found = load_prompts(cfg)[1]
    if not cfg.sample_prompts and (cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_start):
        found.append(Problem("sample_prompts", "is empty, but sampling is scheduled",
                             "give sample_prompts (a list or a prompt file), or remove sample_every_n_*"))
    return found


def due(cfg, step: int, *, epoch_done: int | None = None, total_steps: int | None = None) -> bool:
    """Whether to sample after optimizer step `step` (pure). `epoch_done`: the 1-based epoch that just
    ended at this step, if one did. The final step always samples (when there are prompts)."""
    if not cfg.sample_prompts:
        return False
    if step == 0:
        return cfg.sample_at_start
    if total_steps is not None and step == total_steps:
        return True
    if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
        return True
    return bool(cfg.sample_every_n_epochs and epoch_done and epoch_done % cfg.sample_every_n_epochs == 0)


def round_dir(samples_dir: Path, step: int) -> Path:
    return Path(samples_dir) / f"step-{step:08d}"


def sample_round(task, prompts: list[SamplePrompt], samples_dir: Path, step: int, warn) -> tuple[list[Path], float]:
    """Render every prompt once (one call to the task's hook per prompt); a prompt that fails becomes
    a `warn(message)` call. Returns the files written and the seconds it took."""
    t0 = time.perf_counter()
    folder = round_dir(samples_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, p in enumerate(prompts):
        try:
            written.append(task.render_sample(p, folder / f"{i:02d}"))
        except Exception as e:  # out of memory, a sampler that rejects the options: a warning, not a failure
            _free_cuda_after(e)
            warn(f"sample {i} ({p.prompt[:40]!r}) at step {step} failed: {type(e).__name__}: {str(e)[:200]}")
    return written, time.perf_counter() - t0


def _free_cuda_after(e: Exception) -> None:
    if "out of memory" in str(e).lower():
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass


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

    from trainer.runs.outputs import atomic_write_bytes

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
