"""A node's ``config.xml``: decode it correctly and change only the elements agentd owns, in place.

Jenkins serves ``computer/NAME/config.xml`` as ``application/xml`` without a charset (XStream writes the
bytes with an XML declaration naming the encoding, UTF-8 in practice), so the body must be decoded from
the declaration, not guessed: requests' ``.text`` would guess, and mangle non-ASCII descriptions or paths.

:func:`plan_reconfig` compares the config with the :class:`NodeSpec` and, when something differs, rewrites
only the text of the owned elements (description, remoteFS, numExecutors, mode, label, the launcher's
fields) by byte offsets found with expat. Everything else (node properties, retention strategy, comments,
quoting, whitespace, element order, unknown launcher fields) goes back to Jenkins byte for byte.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from dataclasses import dataclass
from typing import Optional, Union
from xml.sax.saxutils import escape

import jenkins

JNLP_LAUNCHER = jenkins.LAUNCHER_JNLP
SSH_LAUNCHER = jenkins.LAUNCHER_SSH
SSH_HOST_KEY_STRATEGY = "hudson.plugins.sshslaves.verifiers.KnownHostsFileKeyVerificationStrategy"

_DECLARATION = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


class ConfigError(ValueError):
    """config.xml cannot be read (not XML, unknown encoding)."""


@dataclass(frozen=True)
class NodeSpec:
    """The node as agentd wants it. ``launcher_fields`` are the launcher's child elements to enforce."""

    name: str
    description: str
    executors: int
    labels: tuple[str, ...]
    remote_fs: str
    launcher_class: str
    launcher_fields: tuple[tuple[str, str], ...]
    manage_launcher: bool = True
    mode: str = "EXCLUSIVE"

    def create_params(self) -> dict:
        """``launcher_params`` for python-jenkins' ``create_node`` (a fresh dict: it mutates its argument)."""
        fields = dict(self.launcher_fields)
        if self.launcher_class == SSH_LAUNCHER:
            params: dict = {"host": fields["host"], "port": int(fields["port"]),
                            "credentialsId": fields["credentialsId"],
                            "sshHostKeyVerificationStrategy": {"stapler-class": SSH_HOST_KEY_STRATEGY,
                                                               "$class": SSH_HOST_KEY_STRATEGY}}
            if "javaPath" in fields:
                params["javaPath"] = fields["javaPath"]
            return params
        return {"webSocket": fields.get("webSocket") == "true",
                "workDirSettings": {"disabled": False, "workDirPath": "", "internalDir": "remoting",
                                    "failIfWorkDirIsMissing": False}}


def xml_encoding(data: bytes) -> str:
    """The encoding the XML declaration names (UTF-8 when there is none, as XML says)."""
    match = _DECLARATION.match(data)
    return match.group(1).decode("ascii") if match else "utf-8"


def decode_xml(data: bytes) -> str:
    """The document as text, decoded with the declaration's encoding."""
    encoding = xml_encoding(data)
    try:
        return data.decode(encoding)
    except LookupError:
        raise ConfigError(f"config.xml declares an unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config.xml is not valid {encoding} ({e.reason} at byte {e.start})") from None


@dataclass
class _Element:
    """Byte offsets of one element: ``<tag ...>`` is [start, open_end), text is [open_end, close_start),
    ``</tag>`` is [close_start, end). A self-closing ``<tag/>`` has open_end == close_start == end."""

    start: int
    open_end: int
    close_start: int
    end: int
    text: str
    attributes: dict
    self_closing: bool


def _scan(data: bytes) -> dict[tuple[str, ...], _Element]:
    """The first element at each path (root, its children, the launcher's children), with byte offsets."""
    parser = xml.parsers.expat.ParserCreate()
    parser.buffer_text = True
    stack: list[tuple[tuple[str, ...], int, dict, list[str]]] = []
    found: dict[tuple[str, ...], _Element] = {}

    def start(tag: str, attributes: dict) -> None:
        path = (stack[-1][0] if stack else ()) + (tag,)
        stack.append((path, parser.CurrentByteIndex, attributes, []))

    def end(tag: str) -> None:
        path, begin, attributes, text = stack.pop()
        if len(path) > 3 or path in found:
            return
        open_end = data.index(b">", begin) + 1
        self_closing = data[open_end - 2:open_end] == b"/>"
        if self_closing:
            close_start = end_at = open_end
        else:
            close_start = parser.CurrentByteIndex
            end_at = data.index(b">", close_start) + 1
        found[path] = _Element(begin, open_end, close_start, end_at, "".join(text), attributes, self_closing)

    def chars(text: str) -> None:
        if stack:
            stack[-1][3].append(text)

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, chars
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as e:
        raise ConfigError(f"config.xml is not XML ({e})") from None
    return found


def _launcher_xml(spec: NodeSpec, indent: str) -> str:
    inner = indent + "  "
    lines = [f'<launcher class="{spec.launcher_class}">']
    if spec.launcher_class == JNLP_LAUNCHER:
        lines += [f"{inner}<workDirSettings>", f"{inner}  <disabled>false</disabled>",
                  f"{inner}  <internalDir>remoting</internalDir>",
                  f"{inner}  <failIfWorkDirIsMissing>false</failIfWorkDirIsMissing>", f"{inner}</workDirSettings>"]
    lines += [f"{inner}<{tag}>{escape(text)}</{tag}>" for tag, text in spec.launcher_fields]
    if spec.launcher_class == SSH_LAUNCHER:
        lines.append(f'{inner}<sshHostKeyVerificationStrategy class="{SSH_HOST_KEY_STRATEGY}"/>')
    lines.append(f"{indent}</launcher>")
    return "\n".join(lines)


def _line_start(data: bytes, offset: int) -> Optional[int]:
    """Where the line holding ``offset`` starts, when only whitespace precedes ``offset`` on it."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return line_start if data[line_start:offset].strip() == b"" else None


def _indent_of(data: bytes, offset: int) -> Optional[str]:
    line_start = _line_start(data, offset)
    return data[line_start:offset].decode("ascii") if line_start is not None else None


def plan_reconfig(config_xml: Union[bytes, str], spec: NodeSpec) -> tuple[list[str], Union[bytes, str]]:
    """Compare a node's ``config.xml`` with the spec: (names of the fields that differ, updated XML).

    An empty list means nothing to do. Labels compare as sets (order and spacing do not matter). Only the
    differing elements' bytes change; a missing element is added before the root's closing tag. Returns
    the same type it was given (bytes in the document's encoding, or str).
    """
    given_text = isinstance(config_xml, str)
    data = config_xml.encode("utf-8") if given_text else config_xml
    encoding = "utf-8" if given_text else xml_encoding(data)
    elements = _scan(data)
    roots = [path for path in elements if len(path) == 1]
    if not roots:
        raise ConfigError("config.xml has no root element")
    root = roots[0]
    children = [element for path, element in elements.items() if len(path) == 2]
    child_indent = (_indent_of(data, children[0].start) if children else None) or "  "
    edits: list[tuple[int, int, str]] = []   # (start, end, replacement), applied back to front
    changed: list[str] = []

    def insert_before_close(element: _Element, lines: list[str], indent: str) -> None:
        """Add child elements just before ``element``'s closing tag, one per line when it is pretty-printed."""
        if element.self_closing:
            open_tag = data[element.start:element.open_end - 2].decode(encoding).rstrip()
            edits.append((element.start, element.end, f"{open_tag}>" + "".join(lines) + f"</{_tag(element)}>"))
            return
        line_start = _line_start(data, element.close_start)
        if line_start is None:
            edits.append((element.close_start, element.close_start, "".join(lines)))
        else:
            edits.append((line_start, line_start, "".join(f"{indent}{line}\n" for line in lines)))

    def _tag(element: _Element) -> str:
        return re.match(rb"<([^\s/>]+)", data[element.start:element.open_end]).group(1).decode(encoding)

    def set_text(path: tuple[str, ...], value: str) -> None:
        element = elements[path]
        if element.self_closing:
            open_tag = data[element.start:element.open_end - 2].decode(encoding).rstrip()
            edits.append((element.start, element.end, f"{open_tag}>{escape(value)}</{path[-1]}>"))
        else:
            edits.append((element.open_end, element.close_start, escape(value)))

    owned = (("description", spec.description, lambda t: t == spec.description),
             ("remoteFS", spec.remote_fs, lambda t: t == spec.remote_fs),
             ("numExecutors", str(spec.executors), lambda t: t.strip() == str(spec.executors)),
             ("mode", spec.mode, lambda t: t.strip() == spec.mode),
             ("label", " ".join(spec.labels), lambda t: set(t.split()) == set(spec.labels)))
    missing: list[str] = []
    for tag, value, same in owned:
        element = elements.get(root + (tag,))
        if element is not None and same(element.text):
            continue
        changed.append(tag)
        if element is None:
            missing.append(f"<{tag}>{escape(value)}</{tag}>")
        else:
            set_text(root + (tag,), value)

    if spec.manage_launcher:
        launcher = elements.get(root + ("launcher",))
        if launcher is None or launcher.attributes.get("class") != spec.launcher_class:
            changed.append("launcher")
            if launcher is None:
                missing.append(_launcher_xml(spec, child_indent))
            else:
                edits.append((launcher.start, launcher.end, _launcher_xml(spec, child_indent)))
        else:
            missing_fields = []
            for tag, text in spec.launcher_fields:
                element = elements.get(root + ("launcher", tag))
                if element is not None and element.text.strip() == text:
                    continue
                changed.append(f"launcher.{tag}")
                if element is None:
                    missing_fields.append(f"<{tag}>{escape(text)}</{tag}>")
                else:
                    set_text(root + ("launcher", tag), text)
            if missing_fields:
                insert_before_close(launcher, missing_fields, child_indent * 2)
    if missing:
        insert_before_close(elements[root], missing, child_indent)
    if not changed:
        return [], config_xml
    out = data
    for start, end, text in sorted(edits, key=lambda e: e[0], reverse=True):
        out = out[:start] + text.encode(encoding, "xmlcharrefreplace") + out[end:]
    return changed, out.decode("utf-8") if given_text else out
