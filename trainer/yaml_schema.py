"""YAML file -> pydantic model, with every problem reported together (field, value, line, fix).

Used by the training config (trainer.config) and the daemon's settings (agentd.settings), so both
report bad input the same way. Unknown keys name the closest valid key of the model they sit in.
"""
from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from trainer.errors import ConfigError, Problem

_FIXES = {
    "missing": "add this key",
    "greater_than": "use a positive value",
    "greater_than_equal": "use a value at or above the minimum",
    "less_than": "use a smaller value",
    "int_parsing": "write a whole number",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number, e.g. 2e-4",
    "bool_parsing": "write true or false",
    "string_pattern_mismatch": "use letters, digits, '.', '_' or '-'",
    "too_short": "give at least one value",
}


def read_yaml_mapping(text: str, source: str, empty_fix: str) -> tuple[dict, dict[tuple, int]]:
    """Parse YAML text that must be a mapping; returns it and the line of every key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        msg = getattr(e, "problem", None) or str(e)
        raise ConfigError([Problem("<yaml>", f"YAML syntax error: {msg}",
                                   "fix the YAML syntax at that line (indentation, quotes, colons)",
                                   line=line)], source)
    if raw is None:
        raise ConfigError([Problem("<file>", "the file is empty", empty_fix)], source)
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError([Problem("<top level>", f"expected a mapping of key: value, found a {kind}",
                                   "remove the leading '- ' list markers so each key sits at the top level",
                                   line=1)], source)
    return raw, key_lines(node)


def key_lines(node) -> dict[tuple, int]:
    """(key, subkey, ...) -> 1-based line of that key in the YAML text."""
    out: dict[tuple, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (k.value,)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):  # list items as pydantic locates them: ("datasets", "0", ...)
            for i, item in enumerate(n.value):
                out[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    walk(node, ())
    return out


def resolve_relative(raw: dict, fields, base_dir: Path) -> dict:
    """Make the named path fields absolute, relative to `base_dir` (the file's folder)."""
    raw = dict(raw)
    for key in fields:
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            p = Path(value).expanduser()
            raw[key] = str(p if p.is_absolute() else (base_dir / p).resolve())
    return raw


def validate_model(model: type[BaseModel], raw: dict, lines: dict[tuple, int], source: str):
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(problems_from(e, model, lines), source) from None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The (nested) pydantic model that holds the key at `loc`."""
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None:
            break
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            break
        model = sub
    return model


def problems_from(err: ValidationError, model: type[BaseModel], lines: dict[tuple, int]) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        kind = e["type"]
        if kind == "value_error" and not loc:
            # Cross-field checks raise a JSON list of (field, message, fix, value).
            try:
                items = json.loads(str(e["ctx"]["error"]))
            except (KeyError, ValueError):
                items = [("<config>", e["msg"], "", None)]
            for field, message, fix, value in items:
                problems.append(Problem(field, message, fix, value, _line_for(tuple(field.split(".")), lines)))
            continue
        field = ".".join(loc) or "<config>"
        line = _line_for(loc, lines)
        if kind == "extra_forbidden":
            fix = unknown_key_fix(loc[-1], list(_model_at(model, loc).model_fields))
            problems.append(Problem(field, "unknown key", fix, None, line))
            continue
        fix = _FIXES.get(kind, "")
        if kind == "literal_error":
            fix = f"use one of: {e['ctx']['expected']}"
        value = e.get("input") if kind != "missing" else None
        if isinstance(value, dict):
            value = None
        message = "required key is missing" if kind == "missing" else e["msg"].lower()
        problems.append(Problem(field, message, fix, value, line))
    return problems


def unknown_key_fix(name: str, valid: list[str]) -> str:
    """The fix for an unknown key: the closest valid key, else the list of valid ones."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"remove it; valid keys here: {', '.join(valid)}"


def line_of(field: str, lines: dict[tuple, int]) -> int | None:
    """The line of a problem's field as the checks name it ("lora_rank", "optimizer.name", "datasets[1].image_dir")."""
    return _line_for(tuple(re.findall(r"[^.\[\]]+", field)), lines)


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None
