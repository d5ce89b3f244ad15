"""Sample prompts (kohya's prompt-file syntax): what `sample_prompts` holds, parsed and checked.

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
When and how they are rendered: `trainer.training.sampling`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.config import SAMPLERS
from trainer.errors import Problem

OPTIONS = {"n": "negative", "w": "width", "h": "height", "s": "steps", "l": "guidance", "d": "seed", "ss": "sampler"}
DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 7.5


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

    def call_settings(self) -> tuple:
        """What one sampler call shares between its images (prompts alike here render in one batch)."""
        return (self.width, self.height, self.steps, self.guidance, self.sampler)


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
            elif key == "sampler" and value not in SAMPLERS:
                raise ValueError
            else:
                values[key] = value
        except ValueError:
            known = f" (one of {', '.join(SAMPLERS)})" if key == "sampler" else ""
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
