"""Datasets: find the samples, check them all up front, load them one at a time.

Where image samples come from (`scan_image_subsets`), in kohya's conventions:
- `train_data_dir` holding images: one subset. Captions from a `metadata.csv` (Hugging Face imagefolder:
  `file_name,text`; also `filename|image|file` and `caption|prompt`), else a caption file beside each
  image (`caption_extension`, default `.txt`); an image without either trains with an empty caption
  (warned).
- `train_data_dir` holding no images but `N_name` folders: one subset per folder, seen N times per epoch
  (repeats), `name` being the caption of images without a caption file (kohya's class tokens). `0_x` and
  `x_y` folders are errors that say how to rename them; a folder with no images is an error naming it.
- `datasets:` in the config: subsets listed explicitly (`image_dir`, `num_repeats`, `metadata_path`,
  `caption_extension`, `class_tokens`, `is_reg`, `mask_dir`, caption options).

Each `Sample` carries its subset's repeats, is_reg, caption options and its geometry: the original size,
the size it is resized to and the (bucket) size it is cropped to. Without buckets an image is resized so
its shorter side equals `resolution` (bicubic) and center-cropped (or randomly cropped, seeded) to a
square. With `enable_bucket` it goes to kohya's bucket (`select_bucket`, see DESIGN.md "Facts for the
image-data work").

One epoch (`epoch_items`): every training image `repeats` times, plus as many regularization (is_reg)
items as there are training items (kohya's balance: the reg pool is cycled or cut). The epoch's batches
(`epoch_batches`) are a pure function of (samples, seed, epoch, batch_size): a permutation of the items
drawn from (seed, epoch), grouped so every batch holds one bucket, the batches then shuffled with the same
generator. So a resume recomputes its place without re-reading data.

Captions (`process_caption`): prefix/suffix, then kohya's dropout, keep_tokens / keep_tokens_separator,
shuffle and tag dropout; every random draw comes from the step generator the loop passes in (resumable).

SDXL's `time_ids`: `ImageDataset.load_item` returns an `ImageItem` whose `original_size` (the file's
height, width), `crop_top_left` (top, left of the crop in the resized image) and `target_size` (the
bucket's height, width) are what the pipeline really did to that sample.

Text datasets (raw text, alpaca, sharegpt, OpenAI messages): `trainer.data.text`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainer.errors import Problem

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
FILE_COLUMNS = ("file_name", "filename", "image", "file")
CAPTION_COLUMNS = ("text", "caption", "prompt")


# kohya's folder convention: "<repeats>_<name>" (name: class tokens, may hold further underscores).
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's caption options of one subset (see TrainConfig for each)."""

    shuffle_caption: bool = False
    caption_separator: str = ", "
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""

    @property
    def random(self) -> bool:
        """Whether a caption changes from one use to the next."""
        return bool(self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate)


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    subset: int = 0                               # index of its subset (lint groups by it)
    size: tuple[int, int] | None = None           # the file's (width, height)
    resized: tuple[int, int] | None = None        # (width, height) it is resized to
    bucket: tuple[int, int] | None = None         # (width, height) it is cropped to and trained at
    repeats: int = 1
    is_reg: bool = False
    mask: Path | None = None                      # masked_loss from a mask_dir
    captions: CaptionOptions | None = None        # None: no caption options
    caption_from: str = ""                        # metadata | file | class_tokens | none


@dataclass(frozen=True)
class Subset:
    """One folder of images and how to read it (from train_data_dir, an N_name folder or `datasets:`)."""

    image_dir: Path
    metadata_path: Path | None = None
    num_repeats: int = 1
    caption_extension: str = ".txt"
    class_tokens: str | None = None
    is_reg: bool = False
    mask_dir: Path | None = None
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    field_name: str = "train_data_dir"            # the config key problems are reported under


@dataclass
class Scan:
    samples: list[Sample]
    problems: list[Problem]
    warnings: list[str]
    notes: list[str] = field(default_factory=list)  # what the scan decided or found (validate prints them)
    subsets: list[Subset] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Subsets: where the images are


def subsets_of(cfg) -> tuple[list[Subset], list[Problem], list[str]]:
    """The subsets a config describes (datasets:, N_name folders, or one folder), with problems/warnings."""
    top = CaptionOptions(**cfg.caption_options)
    if cfg.datasets:
        out = []
        for n, d in enumerate(cfg.datasets):
            own = {k: v for k, v in d.model_dump().items() if k in cfg.caption_options and v is not None}
            out.append(Subset(d.image_dir, d.metadata_path, d.num_repeats, d.caption_extension or cfg.caption_extension,
                              d.class_tokens, d.is_reg, d.mask_dir, replace(top, **own), f"datasets[{n}]"))
        return out, [], []
    data_dir = cfg.train_data_dir
    plain = Subset(data_dir, cfg.metadata_path, 1, cfg.caption_extension, None, False, cfg.mask_dir, top)
    if cfg.metadata_path is not None or not data_dir.is_dir() or _images_in(data_dir):
        warnings = []
        m = REPEAT_FOLDER.match(data_dir.name)
        if m and cfg.metadata_path is None and data_dir.is_dir():
            warnings.append(f"train_data_dir is itself a kohya N_name folder ({data_dir.name}): its {m.group(1)} "
                            f"repeats are not applied; point train_data_dir at its parent ({data_dir.parent}) "
                            "to use them")
        return [plain], [], warnings
    return repeat_folders(data_dir, cfg.caption_extension, cfg.mask_dir, top)


def repeat_folders(data_dir: Path, caption_extension: str = ".txt", mask_dir: Path | None = None,
                   captions: CaptionOptions | None = None) -> tuple[list[Subset], list[Problem], list[str]]:
    """kohya's layout: each `N_name` subfolder of `data_dir` is a subset with N repeats and class tokens `name`."""
    captions = captions or CaptionOptions()
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    subsets, problems, empty = [], [], []
    for folder in folders:
        m = REPEAT_FOLDER.match(folder.name)
        if m is None or int(m.group(1)) == 0:
            why = ("has 0 repeats" if m else "does not start with a repeat count")
            name = m.group(2) if m else folder.name
            problems.append(Problem("train_data_dir", f"subfolder {folder.name!r} {why}: kohya's folders are named "
                                    "N_name, N (a positive integer) being how often its images are seen per epoch",
                                    f"rename it to e.g. 1_{name} (or 10_{name} for 10 repeats)", str(folder)))
            continue
        if not _images_in(folder):
            empty.append(folder.name)
            continue
        subsets.append(Subset(folder, None, int(m.group(1)), caption_extension, m.group(2), False,
                              mask_dir / folder.name if mask_dir else None, captions))
    if empty:
        problems.append(Problem("train_data_dir", f"holds N_name folders with no images inside: {', '.join(empty)}",
                                f"put the images ({', '.join(sorted(IMAGE_EXTENSIONS))}) directly in those folders, "
                                "or remove them", str(data_dir)))
    if not folders:
        problems.append(Problem("train_data_dir", f"dataset is empty (no {', '.join(sorted(IMAGE_EXTENSIONS))} files "
                                "and no N_name folders)", "add images (with a metadata.csv or .txt captions), or "
                                "N_name folders of images (kohya's layout)", str(data_dir)))
    return subsets, problems, []


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_subsets(cfg) -> Scan:
    """Every sample of every subset the config describes, checked, with its geometry (buckets)."""
    subsets, problems, warnings = subsets_of(cfg)
    samples: list[Sample] = []
    for n, sub in enumerate(subsets):
        scan = _scan_subset(sub, n, cfg.skip_bad_images, masked=cfg.masked_loss and not cfg.alpha_mask)
        samples += scan.samples
        problems += scan.problems
        warnings += scan.warnings
    warnings += keep_tokens_warnings(samples, subsets)
    if cfg.resolution and not problems:
        samples = [assign_geometry(s, cfg) for s in samples]
        too_small = [s.path.name for s in samples if s.bucket and min(s.bucket) == 0]
        if too_small:  # bucket_no_upscale keeps sizes: a side under one step would be cropped to nothing
            problems.append(Problem("bucket_no_upscale", f"{len(too_small)} image(s) have a side shorter than "
                                    f"bucket_reso_steps ({cfg.bucket_reso_steps} px): {', '.join(too_small[:5])}",
                                    "remove or enlarge them, or set bucket_no_upscale: false", True))
        if samples and all(s.is_reg for s in samples):
            problems.append(Problem("datasets", "holds only regularization (is_reg) images",
                                    "add a subset of training images (is_reg: false)", None))
    return Scan(samples if not problems else [], problems, warnings, subsets=subsets)


def keep_tokens_warnings(samples: list[Sample], subsets: list[Subset]) -> list[str]:
    """keep_tokens larger than a caption's tag count: those captions keep everything (nothing shuffles)."""
    out = []
    for n, sub in enumerate(subsets):
        keep = sub.captions.keep_tokens
        short = [(s.path.name, count) for s in samples if s.subset == n and keep
                 and 0 < (count := sum(len(part) for part in caption_tags(process_caption(s.caption, sub.captions),
                                                                          sub.captions))) < keep]
        if short:
            first = ", ".join(f"{name} ({count} tags)" for name, count in short[:5])
            out.append(f"{sub.field_name} ({sub.image_dir.name}): keep_tokens is {keep} but {len(short)} caption(s) "
                       f"have fewer tags: {first}")
    return out


def assign_geometry(s: Sample, cfg) -> Sample:
    """The sample with its resized size and bucket under the config's resolution and bucket settings."""
    if s.size is None:
        return s
    if cfg.enable_bucket:
        resos = make_bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
        bucket, resized = select_bucket(*s.size, resos, cfg.resolution, cfg.bucket_reso_steps, cfg.bucket_no_upscale)
    else:
        bucket, resized = square_geometry(*s.size, cfg.resolution)
    return replace(s, bucket=bucket, resized=resized)


def scan_image_dataset(data_dir: Path, metadata_path: Path | None, skip_bad: bool = False) -> Scan:
    """One plain folder (metadata.csv or caption files): `_scan_subset` of it."""
    return _scan_subset(Subset(data_dir, metadata_path), 0, skip_bad)


def _scan_subset(sub: Subset, index: int, skip_bad: bool = False, masked: bool = False) -> Scan:
    """List one subset's samples and check every image opens. Never raises: returns problems instead."""
    data_dir, metadata_path, where = sub.image_dir, sub.metadata_path, sub.field_name
    problems: list[Problem] = []
    warnings: list[str] = []
    if not data_dir.exists():
        return Scan([], [Problem(where, "folder does not exist",
                                 f"create it or point {where} at your images", str(data_dir))], [])
    if not data_dir.is_dir():
        return Scan([], [Problem(where, "is not a folder",
                                 f"point {where} at the folder that holds the images", str(data_dir))], [])
    listed_on: dict[Path, int] = {}  # image -> metadata line that names it: errors cite the line, not the name
    if metadata_path is not None:
        samples, meta_problems, listed_on = _read_metadata(data_dir, metadata_path)
        problems += meta_problems
    else:
        samples = []
        for img in _images_in(data_dir):
            cap = img.with_suffix(sub.caption_extension)
            if cap.exists():
                samples.append(Sample(img, cap.read_text(encoding="utf-8", errors="replace").strip(),
                                      caption_from="file"))
            elif sub.class_tokens:
                samples.append(Sample(img, sub.class_tokens, caption_from="class_tokens"))
            else:
                warnings.append(f"{img.name}: no caption file {cap.name}; training with an empty caption")
                samples.append(Sample(img, "", caption_from="none"))
    if problems:
        return Scan([], problems, warnings)

    good: list[Sample] = []
    captions = sub.captions if sub.captions != CaptionOptions() else None
    for s in samples:
        reason, size = _image_problem(s.path)
        # A file named by the metadata is cited by its line: the name is the metadata file's content.
        which = f"the image on line {listed_on[s.path]} of {metadata_path}" if s.path in listed_on else str(s.path)
        mask = _mask_file(sub.mask_dir, s.path) if masked and sub.mask_dir else None
        if reason is None and masked and mask is None:
            reason = (f"has no mask in {sub.mask_dir} (masked_loss)" if sub.mask_dir
                      else f"has no mask folder: set mask_dir for {where} (masked_loss)")
        if reason is None:
            good.append(replace(s, subset=index, size=size, repeats=sub.num_repeats, is_reg=sub.is_reg, mask=mask,
                                captions=captions, caption_from=s.caption_from or "metadata"))
        elif skip_bad:
            warnings.append(f"skipped {which}: {reason}")
        else:
            problems.append(Problem(where, f"{reason}: {which}",
                                    "fix or remove the file, or set skip_bad_images: true"))
    if not good and not problems:
        what = f"{metadata_path} lists none" if metadata_path else f"no {', '.join(sorted(IMAGE_EXTENSIONS))} files"
        problems.append(Problem(where, f"dataset is empty ({what})",
                                "add images (with a metadata.csv or .txt captions)", str(data_dir)))
    return Scan(good, problems, warnings, subsets=[sub])


def _mask_file(mask_dir: Path, image: Path) -> Path | None:
    """The mask for `image`: a file of the same stem in `mask_dir` (any image extension)."""
    return next((mask_dir / (image.stem + ext) for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp")
                 if (mask_dir / (image.stem + ext)).is_file()), None)



def _read_metadata(data_dir: Path, metadata_path: Path) -> tuple[list[Sample], list[Problem], dict[Path, int]]:
    """Samples from the CSV, problems, and the line that names each image.

    Errors describe the file by position and count (line N, column K, how many columns), never by its
    bytes: the path may name a file the submitter cannot read, and the daemon must not echo it.
    """
    if not metadata_path.is_file():
        return [], [Problem("metadata_path", "file does not exist",
                            "create the CSV or remove metadata_path to use .txt captions", str(metadata_path))], {}
    fix_encoding = "save it as UTF-8 CSV with a header line, e.g. 'file_name,text'"
    try:
        with metadata_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as e:
        return [], [Problem("metadata_path", f"is not UTF-8 text (undecodable byte at offset {e.start})",
                            fix_encoding, str(metadata_path))], {}
    except csv.Error as e:
        return [], [Problem("metadata_path", f"is not valid CSV ({_csv_error_kind(e)})", fix_encoding,
                            str(metadata_path))], {}
    except OSError as e:
        return [], [Problem("metadata_path", f"cannot read it: {e.strerror or type(e).__name__}", fix_encoding,
                            str(metadata_path))], {}
    file_col = next((c for c in FILE_COLUMNS if c in header), None)
    cap_col = next((c for c in CAPTION_COLUMNS if c in header), None)
    if file_col is None or cap_col is None:
        return [], [Problem("metadata_path", _header_problem(header, file_col, cap_col),
                            f"the header (line 1) needs a file column ({'|'.join(FILE_COLUMNS)}) and a caption "
                            f"column ({'|'.join(CAPTION_COLUMNS)}), e.g. 'file_name,text'", str(metadata_path))], {}
    samples, problems, listed_on = [], [], {}
    for line_no, row in rows:
        row = {(k or "").strip(): (v or "") for k, v in row.items()}
        name = row.get(file_col, "").strip()
        if not name:
            problems.append(Problem("metadata_path", f"line {line_no} has an empty {file_col}",
                                    "fill in the file name or delete the line", str(metadata_path)))
            continue
        sample = Sample(data_dir / name, row.get(cap_col, "").strip())
        samples.append(sample)
        listed_on.setdefault(sample.path, line_no)
    return samples, problems, listed_on


def _header_problem(header: list[str], file_col: str | None, cap_col: str | None) -> str:
    """What is wrong with the header line, by count and position (its text is the file's content)."""
    if not header or header == [""]:
        return "has no header line (line 1 is empty)"
    found = []
    if file_col is not None:
        found.append(f"the file column is column {header.index(file_col) + 1}")
    if cap_col is not None:
        found.append(f"the caption column is column {header.index(cap_col) + 1}")
    missing = [what for what, col in (("file", file_col), ("caption", cap_col)) if col is None]
    return (f"header (line 1) has {len(header)} column{'s' if len(header) != 1 else ''} and no "
            f"{' and no '.join(missing)} column" + (f" ({'; '.join(found)})" if found else ""))


def _csv_error_kind(e: csv.Error) -> str:
    """csv's messages name characters, not content; keep only the known phrase and the line."""
    text = str(e)
    known = {"field larger than field limit": "a field is larger than the CSV field limit",
             "line contains NUL": "a line contains a NUL byte",
             "new-line character seen in unquoted field": "a new-line inside an unquoted field",
             "unexpected end of data": "the file ends inside a quoted field",
             "expected after": "a quote is followed by a character other than the delimiter"}
    kind = next((v for k, v in known.items() if k in text), "malformed")
    return kind


def _image_problem(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(what is wrong or None, the image's (width, height)): reads the header and verifies the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return "image file is missing", None
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"not a readable image ({type(e).__name__})", None
    return None, size


def fingerprint(samples: list[Sample]) -> str:
    """Identity of the training data: file names, sizes, mtimes and captions (not file contents, which
    would re-read the whole dataset at every start), and each sample's repeats/is_reg when not the default
    (an N_name folder renamed changes the data)."""
    h = hashlib.sha256()
    for s in samples:
        st = s.path.stat()
        row = [s.path.name, st.st_size, int(st.st_mtime), s.caption]
        if s.repeats != 1 or s.is_reg:
            row += [s.path.parent.name, s.repeats, s.is_reg]
        h.update(json.dumps(row).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Buckets (kohya's rule, sd-scripts library/model_util.py and train_util.BucketManager)


def make_bucket_resolutions(resolution: int, min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """Every (width, height) bucket: area <= resolution^2, sides multiples of `step` within [min, max]."""
    max_area = resolution * resolution
    resos = {(int(math.sqrt(max_area) // step) * step,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def select_bucket(width: int, height: int, resos: list[tuple[int, int]], resolution: int, step: int,
                  no_upscale: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket (w, h), resized (w, h)) for an image of `width` x `height`, as kohya's BucketManager does.

    Upscaling allowed: the bucket of nearest aspect ratio (its own size if that is a bucket); the image is
    scaled to cover it. `no_upscale`: an image larger than resolution^2 is shrunk to that area (aspect kept,
    the side whose rounding keeps the aspect best rounded to the step); a smaller one keeps its size; the
    bucket is the resized size rounded down to the step (so the image is cropped, never padded)."""
    aspect = width / height
    if not no_upscale:
        reso = (width, height)
        if reso not in set(resos):
            reso = min(resos, key=lambda r: abs(r[0] / r[1] - aspect))  # first of equals, like numpy argmin
        scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
        return reso, (int(width * scale + 0.5), int(height * scale + 0.5))
    max_area = resolution * resolution

    def round_to_step(x: float) -> int:
        x = int(x + 0.5)
        return x - x % step

    if width * height > max_area:
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        b_w = round_to_step(resized_w)
        b_h_in_w = round_to_step(b_w / aspect)
        b_h = round_to_step(resized_h)
        b_w_in_h = round_to_step(b_h * aspect)
        if b_h_in_w and b_h and abs(b_w / b_h_in_w - aspect) < abs(b_w_in_h / b_h - aspect):
            resized = (b_w, int(b_w / aspect + 0.5))
        else:
            resized = (int(b_h * aspect + 0.5), b_h)
    else:
        resized = (width, height)
    return (resized[0] - resized[0] % step, resized[1] - resized[1] % step), resized


def square_geometry(width: int, height: int, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Without buckets: shorter side resized to `resolution` (bicubic), then a square crop."""
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return (resolution, resolution), resized


# ------------------------------------------------------------------------------------------------
# Epochs and batches


def epoch_items(samples: list[Sample]) -> list[int]:
    """The sample indices one epoch holds: each training sample `repeats` times, then regularization items
    as many as training items (kohya: the reg pool, each `repeats` times, cycled or cut to that count)."""
    train = [i for i, s in enumerate(samples) if not s.is_reg for _ in range(s.repeats)]
    reg = [i for i, s in enumerate(samples) if s.is_reg for _ in range(s.repeats)]
    return train + ([reg[k % len(reg)] for k in range(len(train))] if reg else [])


def epoch_batches(samples: list[Sample], seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """One epoch's micro-batches: a permutation of `epoch_items` from (seed, epoch), grouped so each batch
    holds one bucket (sizes sorted, each bucket's last batch may be short), then the batches shuffled.
    One bucket (no buckets): simply the permutation cut into batches."""
    import torch

    items = epoch_items(samples)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
    by_bucket: dict = {}
    for i in order:
        by_bucket.setdefault(samples[i].bucket, []).append(i)
    if len(by_bucket) <= 1:
        return _cut(order, batch_size)
    batches = [b for key in sorted(by_bucket) for b in _cut(by_bucket[key], batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def bucket_batches(samples: list[Sample], indices: list[int], batch_size: int) -> list[list[int]]:
    """`indices` (in order) cut into batches of one bucket each (validation)."""
    by_bucket: dict = {}
    for i in indices:
        by_bucket.setdefault(samples[i].bucket, []).append(i)
    return [b for key in by_bucket for b in _cut(by_bucket[key], batch_size)]


def _cut(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------------
# Captions


def caption_tags(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, shuffled/droppable, kept at the end) tags of a caption (kohya's keep_tokens rules)."""
    sep = opts.caption_separator

    def split(text: str) -> list[str]:
        return [t.strip() for t in text.split(sep.strip() or sep) if t.strip()]

    if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
        parts = caption.split(opts.keep_tokens_separator)
        return split(parts[0]), split(parts[1]), split(opts.keep_tokens_separator.join(parts[2:]))
    tags = split(caption)
    return tags[:opts.keep_tokens], tags[opts.keep_tokens:], []


def process_caption(caption: str, opts: CaptionOptions | None, generator=None) -> str:
    """The caption as trained: prefix/suffix, then (with a generator) caption dropout, tag shuffle and tag
    dropout, all drawn from `generator`. Without a generator: the fixed part only (prefix/suffix)."""
    if opts is None:
        return caption
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"
    if generator is None or not opts.random:
        if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
            return opts.caption_separator.join(t for part in caption_tags(caption, opts) for t in part)
        return caption
    import torch

    if opts.caption_dropout_rate and float(torch.rand(1, generator=generator)) < opts.caption_dropout_rate:
        return ""
    fixed, flex, tail = caption_tags(caption, opts)
    if opts.shuffle_caption and len(flex) > 1:
        flex = [flex[j] for j in torch.randperm(len(flex), generator=generator).tolist()]
    if opts.caption_tag_dropout_rate:
        keep = torch.rand(len(flex), generator=generator) >= opts.caption_tag_dropout_rate
        flex = [t for t, k in zip(flex, keep.tolist()) if k]
    return opts.caption_separator.join(fixed + flex + tail)


@dataclass(frozen=True)
class ImageItem:
    """One loaded training image and what the data pipeline did to it (SDXL conditions on the geometry:
    its `time_ids` are original_size + crop_top_left + target_size, all (height, width) / (top, left))."""

    pixels: object                    # (3, H, W) float tensor in [-1, 1]
    caption: str                      # the fixed caption (prefix/suffix); per-step draws: ImageDataset.caption
    original_size: tuple[int, int]    # the file's (height, width)
    crop_top_left: tuple[int, int]    # (top, left) of the crop in the resized image (mirrored when flipped)
    target_size: tuple[int, int]      # (height, width) trained on (the bucket)
    mask: object = None               # masked_loss: (1, H, W) float tensor in [0, 1], cropped like the pixels
    loss_weight: float = 1.0          # prior_loss_weight for regularization images, else 1


class ImageDataset:
    """Loads one sample at a time: pixels cropped to its bucket (or the square), in [-1, 1], its caption,
    geometry, mask and loss weight (`ImageItem`)."""

    def __init__(self, samples: list[Sample], resolution: int, center_crop: bool = True,
                 random_flip: bool = False, *, alpha_mask: bool = False, masked_loss: bool = False,
                 prior_loss_weight: float = 1.0):
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.masked_loss = masked_loss
        self.alpha_mask = alpha_mask
        self.prior_loss_weight = prior_loss_weight

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, generator=None):
        """(pixels, caption) of sample `index`."""
        item = self.load_item(index, generator)
        return item.pixels, item.caption

    def caption(self, index: int, generator=None) -> str:
        """The caption sample `index` trains with this time (caption options drawn from `generator`; without
        one, the fixed caption)."""
        s = self.samples[index]
        return process_caption(s.caption, s.captions, generator)

    def loss_weight(self, index: int) -> float:
        return self.prior_loss_weight if self.samples[index].is_reg else 1.0

    def geometry(self, index: int, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket, resized) of sample `index`, both (width, height) (computed when the scan did not)."""
        s = self.samples[index]
        if s.bucket is not None and s.resized is not None and s.size == image_size:
            return s.bucket, s.resized
        return square_geometry(*image_size, self.resolution)

    def resized_size(self, index: int) -> tuple[int, int]:
        """(width, height) sample `index` is resized to before its crop (from the scan's geometry)."""
        return self.geometry(index, self.image_size(index))[1]

    def fixed_geometry(self, index: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(original size, crop top-left, target size), as (height, width) / (top, left), of the center
        crop of sample `index` without a flip: what `load_item` does when nothing is random (cached latents)."""
        size = self.image_size(index)
        (bw, bh), (rw, rh) = self.geometry(index, size)
        return (size[1], size[0]), ((rh - bh) // 2, (rw - bw) // 2), (bh, bw)

    def image_size(self, index: int) -> tuple[int, int]:
        """The file's (width, height): from the scan, else read from the image's header."""
        s = self.samples[index]
        if s.size is not None:
            return s.size
        from PIL import Image

        with Image.open(s.path) as im:
            return im.size

    def center_mask(self, index: int):
        """masked_loss: the mask of sample `index` as `load_item` crops it without randomness (cached latents)."""
        return self.load_item(index).mask

    def load_item(self, index: int, generator=None) -> ImageItem:
        """Sample `index` with its geometry; random crops and flips draw from `generator`."""
        import numpy as np
        import torch
        from PIL import Image

        s = self.samples[index]
        with Image.open(s.path) as im:
            mask = None
            if self.masked_loss:
                mask = self._mask_image(im, s)
            im = im.convert("RGB")
            original = (im.size[1], im.size[0])
            (bw, bh), size = self.geometry(index, im.size)
            im = im.resize(size, Image.Resampling.BICUBIC)
            if self.center_crop:
                left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
            else:
                left = int(torch.randint(0, size[0] - bw + 1, (1,), generator=generator))
                top = int(torch.randint(0, size[1] - bh + 1, (1,), generator=generator))
            box = (left, top, left + bw, top + bh)
            im = im.crop(box)
            mask = mask.resize(size, Image.Resampling.BILINEAR).crop(box) if mask is not None else None
            if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
                left = size[0] - left - bw  # kohya: the crop as seen in the flipped image
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        mask_t = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
        return ImageItem(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), self.caption(index), original,
                         (top, left), (bh, bw), mask_t, self.loss_weight(index))

    def _mask_image(self, im, s: Sample):
        """The mask as a greyscale PIL image the size of `im`: its alpha channel, or the mask_dir file."""
        from PIL import Image

        if s.mask is not None:
            with Image.open(s.mask) as m:
                return m.convert("L").resize(im.size, Image.Resampling.BILINEAR)
        if im.mode in ("RGBA", "LA") or "transparency" in im.info:
            return im.convert("RGBA").getchannel("A")
        return Image.new("L", im.size, 255)  # no alpha: all of it trains (lint warns)
