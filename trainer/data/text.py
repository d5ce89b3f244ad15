"""Text-mode data: read raw text, alpaca, sharegpt and OpenAI-messages records; render conversations with
the model's chat template; mark the tokens the loss trains on; cut or drop long samples; pack.

Formats (`dataset_format`), each a `.json` file (a list of records) or `.jsonl` file (one record per line),
or a folder of them:

    text       {"text": "..."}; also `.txt` files, one sample each (no chat template: the text as is + EOS)
    alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
               -> system?, history turns, user = instruction + "\\n" + input (LLaMA-Factory's join), assistant
    sharegpt   {"conversations": [{"from": "human"|"gpt"|..., "value": "..."}], "system"?: "..."}
    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight"?: 0|1}]}
               (OpenAI's fine-tuning format; `weight: 0` keeps an assistant turn out of the loss;
               `content` may be a list of {"type": "text", "text": ...} parts)
    auto       decided from the first record (`messages` -> messages, `conversations` -> sharegpt,
               `instruction`/`output` -> alpaca, `text` -> text) and said in a note; every record must agree.

A record that does not fit is a problem naming the file and the line (jsonl) or index (json), what is
missing and what the records look like; at most `MAX_RECORD_PROBLEMS` are listed, then a count.

Chat formats are rendered with the model's own chat template (`tokenizer.apply_chat_template`, or
`chat_template:` from the config). Which tokens are trained comes from the template itself, by rendering
prefixes of the conversation: for the assistant turn i, its span runs from the end of the render of
turns[:i] with the generation prompt to the end of the render of turns[:i+1], so it covers the answer and
whatever the template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, `</s>`): the model learns
to stop. The whole conversation is tokenized once, the way `apply_chat_template(tokenize=True)` does
(no extra special tokens), and a token is trained when its first character lies in a trained span
(character offsets of a fast tokenizer). A template that renders an earlier turn differently once later
turns follow (it would make those spans wrong) is refused with the sample's location. Every assistant
turn of a multi-turn conversation is trained (`train_on_prompt: true` trains every token).

Length: samples longer than `max_seq_length` tokens are cut to it (`truncation: cut`) or left out
(`drop`); `notes` say how many. Packing (`packing: true`) concatenates samples into rows of at most
`max_seq_length` tokens (best-fit decreasing, see `pack`); each row keeps its samples' lengths, so the loss restarts position ids
per sample and (where the model's attention supports it, see `packing_isolates`) attends within a sample
only.
"""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from trainer.data.images import Sample, Scan
from trainer.errors import Problem, content_free

FORMATS = ("auto", "text", "alpaca", "sharegpt", "messages")
CHAT_FORMATS = ("alpaca", "sharegpt", "messages")
DATA_SUFFIXES = (".json", ".jsonl", ".txt")
# sharegpt's role names as LLaMA-Factory and FastChat write them.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant")
MAX_RECORD_PROBLEMS = 10
MARK_START, MARK_END = "\u27e6", "\u27e7"  # ⟦ ⟧ around trained spans in `agentd validate`'s preview


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    content: str
    train: bool = True  # assistant turns only: in the loss (OpenAI's `weight: 0` says no)


@dataclass(frozen=True, eq=False)
class TextSample(Sample):
    """One training row: a record (or, packed, several) with its tokens.

    `caption` holds the record's canonical JSON (the dataset fingerprint reads it); `where` is
    file:line or file[index]; `ids`/`trained` are the token ids and a 0/1 mask of the tokens in the loss;
    `lengths` the length of each sample in the row (one entry unless packed)."""

    where: str = ""
    turns: tuple[Turn, ...] = ()
    ids: array = field(default_factory=lambda: array("i"))
    trained: bytes = b""
    lengths: tuple[int, ...] = ()
    fmt: str = "text"  # the dataset's format (a packed row: its samples')

    @property
    def chat(self) -> bool:
        """A conversation rendered with the chat template, not raw text."""
        return self.fmt in CHAT_FORMATS

    def labels(self) -> list[int]:
        return [t if m else -100 for t, m in zip(self.ids, self.trained)]


# ------------------------------------------------------------------------------------------------
# Reading records


def data_files(root: Path) -> list[Path]:
    """The data files under `root` (a file, or a folder searched recursively), sorted."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def read_records(path: Path, field_name: str) -> tuple[list[tuple[str, object]], list[Problem]]:
    """[(where, record)] of one file, or the problem that stops it (not JSON: file:line)."""
    fix_jsonl = "write one JSON object per line (JSON Lines); check quotes, commas and braces on that line"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [Problem(field_name, f"{path}: not UTF-8 text (undecodable byte at offset {e.start})",
                            "save the file as UTF-8")]
    except OSError as e:
        return [], [Problem(field_name, f"{path}: cannot read it ({e.strerror or type(e).__name__})",
                            "check the file's permissions")]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(str(path), {"text": text})], []
    if suffix == ".jsonl":
        out, problems = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(Problem(field_name, f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})",
                                        fix_jsonl))
        return out, problems
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [Problem(field_name, f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})",
                            "fix the JSON at that line (a .json file holds one list of records)")]
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}: a list under one key
    if not isinstance(data, list):
        return [], [Problem(field_name, f"{path}: a .json dataset must hold a list of records, not a "
                            f"{type(data).__name__}", "write [ {...}, {...} ] or use .jsonl (one record per line)")]
    return [(f"{path}[{i}]", r) for i, r in enumerate(data)], []


def record_format(record: object) -> str | None:
    """Which format a record looks like, from its keys (None: none)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def describe_record(record: object) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    keys = ", ".join(list(record)[:6]) or "no keys"
    fmt = record_format(record)
    return f"keys {keys}" + (f" ({fmt} format)" if fmt else "")


def _text_of(content: object) -> str | None:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def to_turns(fmt: str, record: dict) -> tuple[tuple[Turn, ...] | str, str | None]:
    """(turns, or the raw text for `text`; None) or (None, what is wrong) for one record of `fmt`."""
    if fmt == "text":
        text = record.get("text")
        return (text, None) if isinstance(text, str) else (None, 'has no "text" string')
    if fmt == "alpaca":
        return _alpaca(record)
    if fmt == "sharegpt":
        return _sharegpt(record)
    return _messages(record)


def _alpaca(r: dict):
    out, inst, inp = r.get("output"), r.get("instruction"), r.get("input", "")
    if not isinstance(out, str):
        return None, 'alpaca record has no "output" string (the answer to train on)'
    if not isinstance(inst, str):
        return None, 'alpaca record has no "instruction" string'
    if not isinstance(inp, str):
        return None, '"input" must be a string'
    turns = []
    if r.get("system"):
        if not isinstance(r["system"], str):
            return None, '"system" must be a string'
        turns.append(Turn("system", r["system"]))
    history = r.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
                                                for h in history):
        return None, '"history" must be a list of [user, assistant] string pairs'
    for q, a in history:
        turns += [Turn("user", q), Turn("assistant", a)]
    turns += [Turn("user", f"{inst}\n{inp}" if inp else inst), Turn("assistant", out)]
    return tuple(turns), None


def _sharegpt(r: dict):
    conv = r.get("conversations")
    if not isinstance(conv, list) or not conv:
        return None, 'sharegpt record has no "conversations" list'
    turns = []
    if isinstance(r.get("system"), str) and r["system"]:
        turns.append(Turn("system", r["system"]))
    for k, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
            return None, f'turn {k} is not a {{"from": ..., "value": "..."}} object'
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            return None, (f'turn {k} has an unknown role "from": {str(t["from"])[:40]!r}; accepted: '
                          f'{", ".join(SHAREGPT_ROLES)}')
        turns.append(Turn(role, t["value"]))
    return _check_conversation(tuple(turns))


def _messages(r: dict):
    msgs = r.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None, 'messages record has no "messages" list'
    turns = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            return None, f'message {k} is not a {{"role": ..., "content": ...}} object'
        if m["role"] not in MESSAGE_ROLES:
            return None, f'message {k} has role {str(m["role"])[:40]!r}; accepted: {", ".join(MESSAGE_ROLES)}'
        text = _text_of(m.get("content"))
        if text is None:
            return None, f'message {k} has no "content" text'
        turns.append(Turn(m["role"], text, m.get("weight", 1) != 0))
    return _check_conversation(tuple(turns))


def _check_conversation(turns: tuple[Turn, ...]):
    if turns[-1].role != "assistant":
        return None, (f"the last turn is the {turns[-1].role}'s, not the assistant's: there is no answer to "
                      "train on at the end")
    if any(t.role == "system" for t in turns[1:]):
        return None, "a system turn may only come first"
    return turns, None


@dataclass
class Records:
    """What reading a dataset gave: the samples (turns or text, no tokens yet), the format, problems."""

    samples: list[TextSample]
    fmt: str | None
    problems: list[Problem]
    notes: list[str]


def read_dataset(root: Path, fmt: str, field_name: str = "train_data_dir") -> Records:
    """Read every record under `root` in format `fmt` (or auto). Never raises: returns problems."""
    if not root.exists():
        return Records([], None, [Problem(field_name, "does not exist", "point it at a .json/.jsonl file or a "
                                          "folder of them", str(root))], [])
    files = data_files(root)
    if not files:
        return Records([], None, [Problem(field_name, "dataset is empty (no .json, .jsonl or .txt files)",
                                          "add data files", str(root))], [])
    problems: list[Problem] = []
    samples: list[TextSample] = []
    decided, decided_at, notes = (None if fmt == "auto" else fmt), None, []
    extra = 0

    def problem(message: str, fix: str) -> None:
        nonlocal extra
        if len(problems) < MAX_RECORD_PROBLEMS:
            problems.append(Problem(field_name, message, fix))
        else:
            extra += 1

    for path in files:
        records, file_problems = read_records(path, field_name)
        for p in file_problems:
            problem(p.message, p.fix)
        for where, record in records:
            looks = record_format(record)
            if decided is None:
                if looks is None:
                    problem(f"{where}: no known format ({describe_record(record)})",
                            "write records with messages (OpenAI), conversations (sharegpt), instruction+output "
                            "(alpaca) or text, or set dataset_format")
                    continue
                decided, decided_at = looks, where
                notes.append(f"dataset_format auto: {looks} (decided from {where}: {describe_record(record)})")
            if fmt == "auto" and looks != decided:
                problem(f"{where}: looks like {looks or 'no known format'} ({describe_record(record)}), but the "
                        f"dataset was decided to be {decided} from {decided_at}",
                        "keep one format per dataset, or split the files")
                continue
            if fmt != "auto" and path.suffix.lower() == ".txt" and decided != "text":
                problem(f"{where}: a .txt file is raw text, not {decided}", "use dataset_format: text or auto")
                continue
            if not isinstance(record, dict):
                problem(f"{where}: {describe_record(record)}", "each record must be a JSON object")
                continue
            turns, error = to_turns(decided, record)
            if error is not None:
                if fmt != "auto" and looks not in (decided, None):
                    error += f"; the records look like {looks} ({describe_record(record)})"
                    fix = f"set dataset_format: {looks} (or auto)"
                else:
                    fix = _FORMAT_FIX[decided]
                problem(f"{where}: {error}", fix)
                continue
            caption = json.dumps(record, sort_keys=True, ensure_ascii=False)
            if isinstance(turns, str):
                samples.append(TextSample(path, caption, where=where, turns=(Turn("text", turns),)))
            else:
                samples.append(TextSample(path, caption, where=where, turns=turns, fmt=decided))
    if extra:
        problems.append(Problem(field_name, f"... and {extra} more records with problems",
                                "fix the ones above first; the rest are likely the same mistake"))
    if not samples and not problems:
        problems.append(Problem(field_name, "dataset is empty (no records)", "add records", str(root)))
    return Records(samples, decided, problems, notes)


_FORMAT_FIX = {
    "text": 'write {"text": "..."} per record',
    "alpaca": 'write {"instruction": "...", "input": "...", "output": "..."} per record',
    "sharegpt": 'write {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "messages": 'write {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
}


# ------------------------------------------------------------------------------------------------
# Chat template and masks


def is_inline_template(value: str) -> bool:
    return "{%" in value or "{{" in value


def template_text(chat_template: str | None) -> str | None:
    """The config's `chat_template`: inline Jinja, or the text of the file it names (None: the model's)."""
    if chat_template is None or is_inline_template(chat_template):
        return chat_template
    return Path(chat_template).read_text(encoding="utf-8")


def template_syntax_problem(template: str | None) -> Problem | None:
    """The config's template parsed once (not per record): a syntax error is one problem, by line."""
    if template is None:
        return None
    from jinja2 import TemplateSyntaxError
    # transformers' own compiler: the environment apply_chat_template renders with ({% generation %} and
    # {% break %} are tags there), cached, so the encoder reuses it.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        return Problem("chat_template", content_free(e), "fix the template at that line (it is Jinja, as the "
                       "model's chat_template.jinja)", None)
    return None


def _template_error(e: Exception) -> str:
    """A chat template's failure on one record, without the template's bytes: our own mismatch message,
    the message a template passes to raise_exception (its author's words for the user, e.g. "roles must
    alternate"; the submitter may read the template: the access check saw to it), else `content_free`."""
    if isinstance(e, TemplateMismatch) or type(e).__name__ == "TemplateError":
        return f"{type(e).__name__}: {e}"
    return content_free(e)


class TemplateMismatch(ValueError):
    """The template renders an earlier turn differently once later turns follow."""


class Encoder:
    """Turns a `TextSample`'s turns into (ids, trained mask) with `tokenizer` and its chat template."""

    def __init__(self, tokenizer, template: str | None, train_on_prompt: bool):
        self.tok, self.template, self.train_on_prompt = tokenizer, template, train_on_prompt

    def render(self, turns, generation_prompt: bool = False) -> str:
        msgs = [{"role": t.role, "content": t.content} for t in turns]
        return self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def spans(self, turns: tuple[Turn, ...]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its trained assistant turns."""
        full = self.render(turns)
        spans = []
        for i, t in enumerate(turns):
            if t.role != "assistant" or not t.train:
                continue
            prompt = self.render(turns[:i], generation_prompt=True) if i else ""
            through = self.render(turns[: i + 1])
            if not full.startswith(through) or not through.startswith(prompt):
                raise TemplateMismatch(
                    f"the chat template renders turns 0..{i} differently once later turns follow, so the "
                    f"assistant spans cannot be found from it")
            spans.append((len(prompt), len(through)))
        return full, spans

    def encode(self, sample: TextSample) -> tuple[list[int], list[int]]:
        if sample.turns and sample.turns[0].role == "text":
            ids = self.tok(sample.turns[0].content, add_special_tokens=True)["input_ids"]
            eos = self.tok.eos_token_id
            if eos is not None and (not ids or ids[-1] != eos):
                ids = list(ids) + [eos]  # a real end: the model learns to stop (cut samples lose it)
            return list(ids), [1] * len(ids)
        text, spans = self.spans(sample.turns)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if self.train_on_prompt:
            return list(ids), [1] * len(ids)
        return list(ids), in_spans([a for a, _ in offsets], spans)

    def marked(self, sample: TextSample) -> str:
        """The rendered sample with the trained tokens between ⟦ and ⟧ (decoded token by token)."""
        out, inside = [], False
        for t, m in zip(sample.ids, sample.trained):
            if m and not inside:
                out.append(MARK_START)
            elif not m and inside:
                out.append(MARK_END)
            inside = bool(m)
            out.append(self.tok.decode([t]))
        if inside:
            out.append(MARK_END)
        return "".join(out)


def in_spans(starts: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character (ascending `starts`) lies in one of the sorted `spans`."""
    out, k = [], 0
    for a in starts:
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        out.append(int(k < len(spans) and spans[k][0] <= a))
    return out


# ------------------------------------------------------------------------------------------------
# Length and packing


def fit(ids: list[int], trained: list[int], max_len: int) -> tuple[list[int], list[int]]:
    return ids[:max_len], trained[:max_len]


def pack(samples: list[TextSample], max_len: int) -> list[TextSample]:
    """Rows of at most `max_len` tokens, filled best-fit decreasing (TRL's default strategy): the longest
    sample first, each into the fullest row it still fits. Rows come out nearly full (less padding than
    filling in data order); a row keeps its samples in data order and its lengths. Deterministic."""
    import bisect

    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].ids), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted: the fullest row that fits is a bisect away
    for i in order:
        need = len(samples[i].ids)
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (max_len - need, len(rows) - 1))
        else:
            room, r = free.pop(at)
            rows[r].append(i)
            bisect.insort(free, (room - need, r))
    out = []
    for members in sorted((sorted(r) for r in rows), key=lambda r: r[0]):
        cur = [samples[i] for i in members]
        ids, trained = array("i"), bytearray()
        for s in cur:
            ids.extend(s.ids)
            trained.extend(s.trained)
        out.append(TextSample(cur[0].path, "\n".join(s.caption for s in cur),
                              where=cur[0].where + (f" +{len(cur) - 1} packed" if len(cur) > 1 else ""),
                              turns=(), ids=ids, trained=bytes(trained), lengths=tuple(len(s.ids) for s in cur),
                              fmt=cur[0].fmt))
    return out


def packing_isolates(config) -> bool:
    """Whether packed samples can be kept from attending to each other for this model: transformers builds
    the mask with its masking utilities (`create_causal_mask`), which turn position ids that restart into a
    block-diagonal mask for eager, sdpa and flex attention, and into per-sample lengths for flash attention.
    Models with their own mask code (older or remote-code architectures) cannot."""
    import sys

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    try:
        cls = getattr(transformers, name) if name else None
    except (ImportError, AttributeError):
        cls = None
    return cls is not None and hasattr(sys.modules[cls.__module__], "create_causal_mask")


@lru_cache(maxsize=4)
def load_tokenizer(model_dir: str, identity: tuple):
    from transformers import AutoTokenizer

    from trainer.quiet import quiet_libraries

    quiet_libraries()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_for(model_dir: Path):
    """The model's tokenizer (cached per folder while its tokenizer files are unchanged)."""
    identity = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(model_dir).glob("*token*")))
    return load_tokenizer(str(model_dir), identity)


@dataclass
class Encoded:
    samples: list[TextSample]
    problems: list[Problem]
    notes: list[str]
    warnings: list[str]
    first: TextSample | None = None  # the first sample, before packing (validate shows it)


def encode_dataset(records: Records, tokenizer, *, template: str | None, max_len: int, truncation: str,
                   train_on_prompt: bool, packing: bool, field_name: str = "train_data_dir") -> Encoded:
    """Tokenize every sample, apply truncation, pack. Never raises: problems name the sample."""
    from jinja2 import TemplateError

    chat = records.fmt in CHAT_FORMATS
    problems, notes, warnings = [], [], []
    if chat and not (template or getattr(tokenizer, "chat_template", None)):
        return Encoded([], [Problem(
            "chat_template", f"the data is {records.fmt} (a chat format) but the model's tokenizer has no chat "
            "template (tokenizer_config.json has no chat_template and there is no chat_template.jinja)",
            "set chat_template: to the template the model was trained with (a .jinja file, e.g. the instruct "
            "model's chat_template.jinja, or inline Jinja), or train on raw text with dataset_format: text")],
            [], [])
    if chat and not getattr(tokenizer, "is_fast", False):
        return Encoded([], [Problem("base_model", "has a slow (Python) tokenizer: the trained spans need a fast "
                                    "tokenizer's character offsets", "add the model's tokenizer.json")], [], [])
    encoder = Encoder(tokenizer, template, train_on_prompt)
    out: list[TextSample] = []
    too_long = emptied = 0
    for s in records.samples:
        try:
            ids, trained = encoder.encode(s)
        except (TemplateError, TemplateMismatch) as e:
            if len(problems) < MAX_RECORD_PROBLEMS:
                problems.append(Problem("chat_template", f"{s.where}: {_template_error(e)}",
                                        "fix the record (e.g. roles must alternate user/assistant) or use a "
                                        "chat_template that renders it"))
            continue
        if len(ids) > max_len:
            too_long += 1
            if truncation == "drop":
                continue
            ids, trained = fit(ids, trained, max_len)
            if not any(trained):
                emptied += 1
        out.append(TextSample(s.path, s.caption, where=s.where, turns=s.turns, ids=array("i", ids),
                              trained=bytes(trained), lengths=(len(ids),), fmt=s.fmt))
    if too_long:
        did = "left out (truncation: drop)" if truncation == "drop" else "cut to it (truncation: cut)"
        notes.append(f"{too_long} of {len(records.samples)} samples are longer than max_seq_length {max_len} "
                     f"tokens and are {did}")
        if emptied:
            warnings.append(f"{emptied} samples cut at max_seq_length {max_len} keep none of their assistant "
                            "tokens and train nothing: raise max_seq_length or set truncation: drop")
    if not out and not problems:
        problems.append(Problem("max_seq_length", f"no sample fits in {max_len} tokens (truncation: drop)",
                                "raise max_seq_length or set truncation: cut", max_len))
    elif out and not problems and not any(any(s.trained) for s in out):
        problems.append(Problem("max_seq_length", f"no sample keeps a trained token within {max_len} tokens (every "
                                "answer lies beyond the cut): training would learn nothing",
                                "raise max_seq_length, or set truncation: drop to train on whole samples only",
                                max_len))
    first = out[0] if out else None
    if packing and out:
        packed = pack(out, max_len)
        fill = sum(len(s.ids) for s in out) / (len(packed) * max_len)
        notes.append(f"packing: {len(out)} samples in {len(packed)} rows of up to {max_len} tokens "
                     f"({fill:.0%} full)")
        out = packed
    return Encoded(out, problems, notes, warnings, first)


_SCANS: dict = {}  # the last scans of this process (the daemon checks a job at submit and again at its start)


def scan_text(cfg, root: Path | None = None, field_name: str = "train_data_dir") -> Scan:
    """The family's dataset scan for text mode: read, check, render, tokenize, cut/drop, pack.

    Without a readable model folder (preflight reports that) the records are only read and checked. The
    result is reused while the data files, the tokenizer files and the settings are unchanged."""
    root = Path(root or cfg.train_data_dir)
    key = _scan_key(cfg, root, field_name)
    if key is not None and key in _SCANS:
        return _SCANS[key]
    scan = _scan_text(cfg, root, field_name)
    if key is not None and not scan.problems:
        if len(_SCANS) >= 2:
            _SCANS.pop(next(iter(_SCANS)))
        _SCANS[key] = scan
    return scan


def _scan_key(cfg, root: Path, field_name: str) -> tuple | None:
    """What a scan depends on: the data files' and the model folder's names, sizes and mtimes, the template
    and the settings (None: cannot tell, do not reuse)."""
    try:
        files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in data_files(root)) \
            if root.exists() else None
        return (files, str(cfg.base_model), _folder_identity(Path(cfg.base_model)), template_text(cfg.chat_template),
                cfg.dataset_format, cfg.max_seq_length, cfg.truncation, cfg.train_on_prompt, cfg.packing, field_name)
    except (OSError, UnicodeDecodeError):  # the scan itself reports an unreadable template
        return None


def _folder_identity(folder: Path) -> tuple:
    if not folder.is_dir():
        return ()
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file())


def _scan_text(cfg, root: Path, field_name: str) -> Scan:
    records = read_dataset(root, cfg.dataset_format, field_name)
    scan = Scan([], records.problems, [], notes=list(records.notes)) if records.problems else None
    if scan is not None:
        return scan
    if not (Path(cfg.base_model) / "config.json").is_file():
        return Scan(records.samples, [], [], notes=list(records.notes))
    try:
        template = template_text(cfg.chat_template)
    except (OSError, UnicodeDecodeError) as e:
        return Scan([], [Problem("chat_template", f"cannot read the template file ({content_free(e)})",
                                 "point chat_template at a Jinja file, or write the template inline",
                                 cfg.chat_template)], [])
    syntax = template_syntax_problem(template)
    if syntax:
        return Scan([], [syntax], [])
    try:
        tok = tokenizer_for(Path(cfg.base_model))
    except Exception as e:  # the tokenizers library raises a bare Exception on a tokenizer.json it cannot parse
        return Scan([], [Problem("base_model", f"cannot load the tokenizer: {content_free(e)}",
                                 "check the model folder's tokenizer files (tokenizer.json, tokenizer_config.json)",
                                 str(cfg.base_model))], [])
    enc = encode_dataset(records, tok, template=template, max_len=cfg.max_seq_length, truncation=cfg.truncation,
                         train_on_prompt=cfg.train_on_prompt, packing=cfg.packing, field_name=field_name)
    notes = list(records.notes) + enc.notes
    warnings = list(enc.warnings)
    if cfg.packing and not enc.problems and not packing_isolates(_model_config(cfg.base_model)):
        warnings.append("packing: this model builds its attention mask without transformers' masking utilities, "
                        "so packed samples can attend to the samples before them in a row (position ids still "
                        "restart per sample); set packing: false for exact per-sample attention")
    if enc.first is not None and enc.first.chat and not enc.problems:
        warnings += _stop_warnings(enc.first, tok, Path(cfg.base_model))
    if enc.first is not None and not enc.problems:
        notes.append("first example as the model sees it (trained tokens between \u27e6 and \u27e7):\n"
                     + Encoder(tok, template, cfg.train_on_prompt).marked(enc.first))
    return Scan(enc.samples, enc.problems, warnings, notes=notes)


def stop_ids(tokenizer, model_dir: Path) -> set[int]:
    """The token ids generate() stops at: generation_config.json's eos_token_id (an id or a list), else the
    tokenizer's EOS."""
    ids: set[int] = set()
    try:
        eos = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    except (OSError, ValueError):
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _stop_warnings(first: TextSample, tokenizer, model_dir: Path) -> list[str]:
    """A template whose assistant turns end with no stop token makes a tuned model that never stops (the
    answers run on into a made-up next turn; LLaMA-Factory #5593)."""
    stops = stop_ids(tokenizer, model_dir)
    if any(t in stops and m for t, m in zip(first.ids, first.trained)):
        return []
    names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(stops)) or "none"
    return [f"the chat template closes assistant turns without a token generation stops at ({names}, from "
            "generation_config.json and the tokenizer's eos_token): the tuned model will not stop after its answer; "
            "use the chat template the model was trained with, or add its end-of-turn token to "
            "generation_config.json's eos_token_id"]


def _model_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)

