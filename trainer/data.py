"""Datasets: find the samples, check them all up front, load them one at a time.

Image datasets come in two layouts:
- a `metadata.csv` (Hugging Face imagefolder: `file_name,text`; also accepted: `filename|image|file`
  for the file column and `caption|prompt` for the caption column), file names relative to
  `train_data_dir`;
- no metadata file: every image in `train_data_dir` with a `.txt` caption beside it (kohya's
  convention; an image without one gets an empty caption and a warning).

Each image is converted to RGB, resized so its shorter side equals `resolution` (bicubic) and then
center-cropped (or randomly cropped, seeded) to `resolution` x `resolution`, then scaled to [-1, 1].

Text datasets: `.txt`/`.jsonl` files under `train_data_dir` (see `scan_text_dataset`).

The data order is not held here: the training loop derives each epoch's permutation from
(seed, epoch), so a resume never re-reads data to find its place.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import Problem

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
FILE_COLUMNS = ("file_name", "filename", "image", "file")
CAPTION_COLUMNS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str


@dataclass
class Scan:
    samples: list[Sample]
    problems: list[Problem]
    warnings: list[str]


def scan_image_dataset(data_dir: Path, metadata_path: Path | None, skip_bad: bool = False) -> Scan:
    """List the samples and check every image opens. Never raises: returns problems instead."""
    problems: list[Problem] = []
    warnings: list[str] = []
    if not data_dir.exists():
        return Scan([], [Problem("train_data_dir", "folder does not exist",
                                 "create it or point train_data_dir at your images", str(data_dir))], [])
    if not data_dir.is_dir():
        return Scan([], [Problem("train_data_dir", "is not a folder",
                                 "point train_data_dir at the folder that holds the images", str(data_dir))], [])
    listed_on: dict[Path, int] = {}  # image -> metadata line that names it: errors cite the line, not the name
    if metadata_path is not None:
        samples, meta_problems, listed_on = _read_metadata(data_dir, metadata_path)
        problems += meta_problems
    else:
        samples = []
        for img in sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            cap = img.with_suffix(".txt")
            if cap.exists():
                samples.append(Sample(img, cap.read_text(encoding="utf-8", errors="replace").strip()))
            else:
                warnings.append(f"{img.name}: no caption file {cap.name}; training with an empty caption")
                samples.append(Sample(img, ""))
    if problems:
        return Scan([], problems, warnings)

    good: list[Sample] = []
    for s in samples:
        reason = _image_problem(s.path)
        # A file named by the metadata is cited by its line: the name is the metadata file's content.
        which = f"the image on line {listed_on[s.path]} of {metadata_path}" if s.path in listed_on else str(s.path)
        if reason is None:
            good.append(s)
        elif skip_bad:
            warnings.append(f"skipped {which}: {reason}")
        else:
            problems.append(Problem("train_data_dir", f"{reason}: {which}",
                                    "fix or remove the file, or set skip_bad_images: true"))
    if not good and not problems:
        where = f"{metadata_path} lists none" if metadata_path else f"no {', '.join(sorted(IMAGE_EXTENSIONS))} files"
        problems.append(Problem("train_data_dir", f"dataset is empty ({where})",
                                "add images (with a metadata.csv or .txt captions)", str(data_dir)))
    return Scan(good, problems, warnings)


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


def _image_problem(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return "image file is missing"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"not a readable image ({type(e).__name__})"
    return None


def fingerprint(samples: list[Sample]) -> str:
    """Identity of the training data: file names, sizes, mtimes and captions (not file contents, which
    would re-read the whole dataset at every start)."""
    h = hashlib.sha256()
    for s in samples:
        st = s.path.stat()
        h.update(json.dumps([s.path.name, st.st_size, int(st.st_mtime), s.caption]).encode())
    return h.hexdigest()[:16]


class ImageDataset:
    """Loads one sample at a time as a (3, R, R) float tensor in [-1, 1] and its caption."""

    def __init__(self, samples: list[Sample], resolution: int, center_crop: bool = True,
                 random_flip: bool = False):
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, generator=None):
        import numpy as np
        import torch
        from PIL import Image

        s = self.samples[index]
        with Image.open(s.path) as im:
            im = im.convert("RGB")
            r = self.resolution
            scale = r / min(im.size)
            size = (max(r, round(im.size[0] * scale)), max(r, round(im.size[1] * scale)))
            im = im.resize(size, Image.Resampling.BICUBIC)
            if self.center_crop:
                left, top = (size[0] - r) // 2, (size[1] - r) // 2
            else:
                left = int(torch.randint(0, size[0] - r + 1, (1,), generator=generator))
                top = int(torch.randint(0, size[1] - r + 1, (1,), generator=generator))
            im = im.crop((left, top, left + r, top + r))
            if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), s.caption


def scan_text_dataset(data_dir: Path) -> Scan:
    """Text mode: each `.txt` file is one sample; each line of a `.jsonl` file with a "text" field is one."""
    if not data_dir.is_dir():
        return Scan([], [Problem("train_data_dir", "folder does not exist",
                                 "point train_data_dir at your .txt/.jsonl files", str(data_dir))], [])
    samples, problems = [], []
    for p in sorted(data_dir.rglob("*")):
        if p.suffix == ".txt":
            samples.append(Sample(p, p.read_text(encoding="utf-8", errors="replace")))
        elif p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    samples.append(Sample(p, str(json.loads(line)["text"])))
                except (ValueError, KeyError, TypeError):
                    problems.append(Problem("train_data_dir", f"{p}:{n}: not a JSON object with a \"text\" field",
                                            'write one {"text": "..."} object per line'))
    if not samples and not problems:
        problems.append(Problem("train_data_dir", "dataset is empty (no .txt or .jsonl files)",
                                "add text files", str(data_dir)))
    return Scan(samples, problems, [])
