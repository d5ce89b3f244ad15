"""The node's temporary-offline state: agentd's own mark, and the pure decision of what to post.

Jenkins keeps one "temporarily offline" flag per node and a cause, and what it does with the cause
depends on the version:

* before 2.482 (``hudson.model.Computer``: one ``offlineCause`` field for both purposes) a reconnecting
  agent clears the cause and a broken connection replaces it with a ``ChannelTermination``, while
  ``temporarilyOffline`` stays true;
* from 2.482 the temporary-offline cause is kept apart (``Node.temporaryOfflineCause``) and survives;
* from 2.483 ``offlineCauseReason`` comes back HTML-escaped (``hudson.Util.escape``: ``< > & " '``, runs
  of spaces as ``&nbsp;``, newlines as ``<br>``).

So the cause text alone cannot say whether agentd took the node offline. :class:`OfflineMark` remembers
it locally (a small JSON file under the daemon's ``state_dir``, written atomically), and
:func:`offline_action` decides with the mark, comparing reasons after undoing the escaping. A cause an
administrator set by hand (a user cause with another text) is theirs: agentd leaves it and forgets its mark.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

from trainer.runs.outputs import atomic_write_json

log = logging.getLogger(__name__)

OFFLINE_PREFIX = "agentd: "
MARK_FILE_NAME = "jenkins-offline-mark.json"

# OfflineCause classes a person (or agentd) sets through toggleOffline/changeOfflineCause or the CLI.
_USER_CAUSES = ("hudson.slaves.OfflineCause$UserCause", "hudson.slaves.OfflineCause$ByCLI")


def jenkins_unescape(text: str) -> str:
    """Undo ``hudson.Util.escape`` (Jenkins 2.483+ escapes ``offlineCauseReason``)."""
    return html.unescape(text.replace("<br>", "\n")).replace("\xa0", " ")


def reason_kind(reason: Optional[str]) -> Optional[str]:
    """What a reason is about, without its numbers: the text before the first ':' with digits folded.

    ``"other processes hold more than max_foreign_vram_mib (4096 MiB) on every GPU: GPU 0 20123 MiB"``
    and the same with 20480 MiB are one kind; "agentd is draining: ..." is another. A new kind is worth
    a request to the controller; new numbers inside the same kind are not.
    """
    if reason is None:
        return None
    text = reason[len(OFFLINE_PREFIX):] if reason.startswith(OFFLINE_PREFIX) else reason
    return re.sub(r"\d+(?:\.\d+)?", "#", text.split(":", 1)[0]).strip()


def offline_message(reason: Optional[str]) -> Optional[str]:
    """The cause text agentd posts for a reason."""
    return None if reason is None else OFFLINE_PREFIX + reason


def _cause_class(info: Mapping) -> Optional[str]:
    cause = info.get("offlineCause")
    return cause.get("_class") if isinstance(cause, Mapping) else None


def cause_is_ours(info: Mapping, mark: Optional[str]) -> bool:
    """Whether the node's current temporary-offline state is agentd's doing.

    Ours when the (unescaped) cause text is the one agentd posted or starts with ``agentd:``, or when
    agentd holds a mark and the cause is no longer a user's (cleared or replaced by a reconnect or a broken
    connection before Jenkins 2.482).
    """
    reason = jenkins_unescape(info.get("offlineCauseReason") or "")
    if reason.startswith(OFFLINE_PREFIX.strip()):
        return True
    if mark is None:
        return False
    if reason == mark:
        return True
    return not (reason and _cause_class(info) in _USER_CAUSES)


def offline_action(info: Mapping, wanted: Optional[str], mark: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """What to post so the node's *temporary* offline state matches, and agentd's mark afterwards.

    ``info`` is the node's api/json; ``wanted`` the cause text agentd wants (None: online); ``mark`` the
    cause text agentd posted last (None: agentd did not take the node offline). Returns (action, mark) with
    action ``'toggle'``, ``'change-cause'`` or None. Decides on ``temporarilyOffline``, never on ``offline``
    (also true when the agent is merely disconnected).
    """
    temporarily_offline = bool(info.get("temporarilyOffline"))
    if not temporarily_offline:
        return ("toggle", wanted) if wanted is not None else (None, None)
    if not cause_is_ours(info, mark):
        return None, None                    # an administrator's: leave it, and it is no longer ours
    if wanted is None:
        return "toggle", None
    current = jenkins_unescape(info.get("offlineCauseReason") or "")
    if current == wanted or (current and reason_kind(current) == reason_kind(wanted)):
        return None, mark or current
    return "change-cause", wanted


@dataclass
class OfflineMark:
    """agentd took node ``node`` of controller ``url`` offline with cause text ``reason`` at ``at``."""

    url: str
    node: str
    reason: str
    at: float


class OfflineMarkStore:
    """The mark, persisted under the daemon's state folder (or only in memory without one)."""

    def __init__(self, state_dir: Optional[Path], url: str, node: str):
        self.path = Path(state_dir) / MARK_FILE_NAME if state_dir is not None else None
        self.url, self.node = url, node
        self._mark: Optional[OfflineMark] = self._load()

    def _load(self) -> Optional[OfflineMark]:
        if self.path is None:
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            mark = OfflineMark(str(data["url"]), str(data["node"]), str(data["reason"]), float(data["at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s (%s): agentd assumes it did not take the node offline",
                        self.path, e)
            return None
        if (mark.url, mark.node) != (self.url, self.node):
            return None                          # a mark for another controller or node name
        return mark

    @property
    def reason(self) -> Optional[str]:
        return self._mark.reason if self._mark else None

    def as_dict(self) -> Optional[dict]:
        return asdict(self._mark) if self._mark else None

    def set(self, reason: Optional[str]) -> None:
        """Remember (or, with None, forget) that agentd holds the node offline with ``reason``."""
        if reason == self.reason:
            return
        self._mark = OfflineMark(self.url, self.node, reason, time.time()) if reason is not None else None
        if self.path is None:
            return
        if self._mark is None:
            self.path.unlink(missing_ok=True)
        else:
            atomic_write_json(self.path, asdict(self._mark))
