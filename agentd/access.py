"""May the submitter read or write this path? Judged the way the kernel would, without acting as them.

The daemon reads and writes files for whoever submitted a job over the control socket. It must not read
a file the submitter could not read (the API token, another team's dataset) nor write where they could
not (another team's outputs, the daemon's own state). The daemon cannot simply *become* the submitter
(it holds no capability to change its file-system user), so it answers the question from the file
system's metadata, the way the kernel does on open(2):

* every folder on the way (each component, following symlinks as the kernel does, `..` included) needs
  search (x) permission, and the last component needs read (files), read+search (folders) or
  write+search (the folder that gets written, or the nearest existing parent that will get the new
  folder);
* a component's permission is its owner/group/other mode bits, or its POSIX ACL when one is set
  (`system.posix_acl_access`, parsed here: named users, named groups and the mask as in
  `acl_permission_check`/`posix_acl_permission` of fs/namei.c and fs/posix_acl.c);
* uid 0 may do anything (CAP_DAC_OVERRIDE), as root may.

Messages name the path, the component that blocks and why (its mode, owner, group, ACL): metadata the
submitter can see anyway, never a byte of a file's content.

`output_dir` (and every other folder a job writes, e.g. `history_dir`) must also stay out of the
daemon's own folders (state, cache, runtime, the agent folder) and must not contain them: the run
history moves files around inside it, and the journal or the agent secret must never be among them.

Pure functions take what they decide on as arguments (`permitted`, `parse_posix_acl`, `overlap`); the thin
I/O shell (`access_problem`, `config_access_problems`, `sample_access_problems`) stats the real files.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

READ, WRITE, SEARCH = 4, 2, 1

# linux/posix_acl_xattr.h
ACL_XATTR = "system.posix_acl_access"
ACL_XATTR_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
MAX_SYMLINKS = 40  # the kernel's MAXSYMLINKS
MAX_TREE_ENTRIES = 20000  # a model folder is checked file by file; past this many, the rest is not

# Config fields a job writes into (cache_dir: the latent/text-encoder cache); every other path field is read.
WRITTEN_FIELDS = frozenset({"output_dir", "history_dir", "cache_dir"})
# Read fields whose files the job reads one by one through the dataset scan (checked file by file then,
# without a cap): the rest, when a folder, are checked whole here (a model, a checkpoint, a run to compare).
SCANNED_FIELDS = frozenset({"train_data_dir", "image_dir"})


@dataclass(frozen=True)
class Identity:
    """Who asks: a uid and every gid they hold (primary and supplementary), as SO_PEERCRED/SO_PEERGROUPS tell."""

    uid: int
    gids: frozenset[int] = field(default_factory=frozenset)
    user: Optional[str] = None

    @classmethod
    def from_submitter(cls, submitter: dict) -> "Identity":
        """From the journaled submitter ({uid, gid, groups, user}); unknown groups fall back to the group
        database (the user's groups at login, as `id` shows them)."""
        uid, gid = int(submitter["uid"]), int(submitter.get("gid", -1))
        groups = submitter.get("groups")
        if groups is None:
            groups = groups_from_database(uid, gid)
        gids = {int(g) for g in groups} | ({gid} if gid >= 0 else set())
        return cls(uid, frozenset(gids), submitter.get("user"))

    def describe(self) -> str:
        return f"uid {self.uid}" + (f" ({self.user})" if self.user else "")


def groups_from_database(uid: int, gid: int) -> list[int]:
    """A user's groups as the group database has them (what `id` shows at login)."""
    try:
        name = pwd.getpwuid(uid).pw_name
        return os.getgrouplist(name, gid if gid >= 0 else pwd.getpwuid(uid).pw_gid)
    except (KeyError, OSError):
        return [gid] if gid >= 0 else []


# --- pure decisions ---------------------------------------------------------------------------------

def parse_posix_acl(blob: bytes) -> list[tuple[int, int, int]]:
    """`system.posix_acl_access` as (tag, perm, id) entries. Raises ValueError on a malformed value."""
    if len(blob) < 4 or (len(blob) - 4) % 8:
        raise ValueError(f"POSIX ACL of {len(blob)} bytes is not a header plus 8-byte entries")
    (version,) = struct.unpack_from("<I", blob)
    if version != ACL_XATTR_VERSION:
        raise ValueError(f"POSIX ACL version {version}, expected {ACL_XATTR_VERSION}")
    return [struct.unpack_from("<HHI", blob, offset) for offset in range(4, len(blob), 8)]


def permitted(mode: int, owner: int, group: int, acl: Optional[list[tuple[int, int, int]]],
              who: Identity, want: int) -> bool:
    """Would the kernel grant `want` (READ|WRITE|SEARCH bits) on an inode with this mode/owner/group/ACL?"""
    if who.uid == 0:
        return True  # CAP_DAC_OVERRIDE (search and read/write; execute of a file is not asked here)
    if not acl:
        if who.uid == owner:
            bits = mode >> 6
        elif group in who.gids:
            bits = mode >> 3
        else:
            bits = mode
        return (bits & 7 & want) == want
    mask = next((perm for tag, perm, _ in acl if tag == ACL_MASK), 7)
    group_matched = False
    for tag, perm, ident in acl:
        if tag == ACL_USER_OBJ and who.uid == owner:
            return (perm & want) == want
        if tag == ACL_USER and ident == who.uid:
            return (perm & mask & want) == want
        if tag in (ACL_GROUP_OBJ, ACL_GROUP):
            gid = group if tag == ACL_GROUP_OBJ else ident
            if gid in who.gids:
                group_matched = True
                if (perm & want) == want:
                    return (mask & want) == want
        if tag == ACL_OTHER:
            return not group_matched and (perm & want) == want
    return False


def overlap(a: Path, b: Path) -> Optional[str]:
    """'inside' when a is b or under it, 'contains' when b is under a, else None (absolute paths)."""
    if a == b or b in a.parents:
        return "inside"
    if a in b.parents:
        return "contains"
    return None


def want_words(want: int) -> str:
    return "+".join(w for bit, w in ((READ, "read"), (WRITE, "write"), (SEARCH, "search (x)")) if want & bit)


# --- the file system --------------------------------------------------------------------------------

def read_acl(path: Path) -> Optional[list[tuple[int, int, int]]]:
    """The inode's access ACL, or None when it has none (or the file system keeps none)."""
    try:
        return parse_posix_acl(os.getxattr(path, ACL_XATTR, follow_symlinks=False))
    except OSError:
        return None  # ENODATA (no ACL: the mode bits decide), ENOTSUP (no ACLs on this file system)


def _describe_inode(path: Path, st: os.stat_result, acl) -> str:
    kind = "folder" if stat.S_ISDIR(st.st_mode) else "file"
    text = f"{kind} {path} is mode {stat.S_IMODE(st.st_mode):04o}, owner {_user(st.st_uid)}, group {_group(st.st_gid)}"
    if acl:
        named = [f"{'user' if t == ACL_USER else 'group'}:{_user(i) if t == ACL_USER else _group(i)}:{_rwx(p)}"
                 for t, p, i in acl if t in (ACL_USER, ACL_GROUP)]
        mask = next((_rwx(p) for t, p, _ in acl if t == ACL_MASK), None)
        text += f", ACL {' '.join(named) or '(no named entries)'}" + (f" mask {mask}" if mask else "")
    return text


def _rwx(perm: int) -> str:
    return "".join(c if perm & bit else "-" for c, bit in (("r", READ), ("w", WRITE), ("x", SEARCH)))


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Denied(Exception):
    """A component on the way does not let the submitter through. The message says which and why;
    `folder` is the folder that may not be entered, when that is the reason."""

    def __init__(self, message: str, folder: Optional[Path] = None):
        super().__init__(message)
        self.folder = folder


def resolve_as(path: Path, who: Identity) -> tuple[Path, bool]:
    """Walk `path` as the kernel would for `who`: (the resolved path, whether it exists).

    Each folder entered must grant `who` search permission, symlinks are followed (relative to their
    folder, absolute ones from /), `..` goes up. A missing component ends the walk: the rest is
    appended unresolved and exists is False. Raises Denied naming the folder that blocks.
    """
    pending = list(Path(os.path.abspath(path)).parts[1:])
    pending.reverse()  # a stack: the next component is pending[-1]
    current = Path("/")
    _enter(current, who)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent  # the parent was entered on the way down
            continue
        candidate = current / name
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return Path(candidate, *reversed(pending)), False
        except NotADirectoryError:
            raise Denied(f"{current} is not a folder") from None
        except OSError:
            # The daemon itself cannot look: it cannot read the file for anyone, and the config check
            # that follows says so. Nothing more to decide here.
            return Path(candidate, *reversed(pending)), True
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise Denied(f"too many levels of symbolic links at {candidate}")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path("/")
                parts = list(target.parts[1:])
            else:
                parts = list(target.parts)
            pending.extend(reversed(parts))
            continue
        current = candidate
        if pending:
            if not stat.S_ISDIR(st.st_mode):
                raise Denied(f"{current} is not a folder")
            _enter(current, who, st)
    return current, True


def _enter(folder: Path, who: Identity, st: Optional[os.stat_result] = None) -> None:
    st = st or os.stat(folder)
    acl = read_acl(folder)
    if not permitted(st.st_mode, st.st_uid, st.st_gid, acl, who, SEARCH):
        raise Denied(f"{who.describe()} may not enter {folder} (no search permission): "
                     f"{_describe_inode(folder, st, acl)}", folder)


def access_problem(path: Path, who: Identity, want: int) -> Optional[str]:
    """None when `who` may do `want` (READ or WRITE) with `path`, else why not.

    READ of a folder also needs search; WRITE means "may create and replace files in this folder",
    judged on the nearest existing folder when it does not exist yet. A missing path to READ is not
    a problem here (the config check reports it as missing).
    """
    try:
        real, exists = resolve_as(path, who)
    except Denied as e:
        return str(e)
    if not exists:
        if want != WRITE:
            return None
        parent = real
        while True:
            parent = parent.parent
            try:
                real_parent, parent_exists = resolve_as(parent, who)
            except Denied as e:
                return str(e)
            if parent_exists:
                real = real_parent
                break
    try:
        st = os.stat(real)
    except OSError:
        return None  # the daemon cannot see it either: the config check reports it
    acl = read_acl(real)
    need = want | SEARCH if stat.S_ISDIR(st.st_mode) else want
    if permitted(st.st_mode, st.st_uid, st.st_gid, acl, who, need):
        return None
    where = "" if real == Path(os.path.abspath(path)) else f" (it resolves to {real})"
    return f"{who.describe()} may not {want_words(need)} it{where}: {_describe_inode(real, st, acl)}"


def tree_access_problem(root: Path, who: Identity) -> Optional[str]:
    """READ of a folder and everything in it (a model folder, a checkpoint): the first entry refused."""
    problem = access_problem(root, who, READ)
    if problem or not root.is_dir():
        return problem
    seen = 0
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            seen += 1
            if seen > MAX_TREE_ENTRIES:
                return None
            entry = Path(folder, name)
            problem = access_problem(entry, who, READ)
            if problem:
                return f"{entry}: {problem}"
    return None


# --- a job's paths ----------------------------------------------------------------------------------

def config_paths(cfg, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """Every (field, path) a training config names, derived from its schema so that a new field cannot be
    missed: each Path-typed field (also `Union[list[str], Path]` such as sample_prompts when it is a file),
    inside nested sections and lists of them (e.g. `datasets[0].image_dir`), and the str fields that name a
    file only sometimes (STR_OR_PATH_FIELDS: `resume` when it is a path, `chat_template` when not inline)."""
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if name in STR_OR_PATH_FIELDS and isinstance(value, str):
            if STR_OR_PATH_FIELDS[name](value):
                yield f"{prefix}{name}", Path(value)
            continue
        yield from _paths_in(value, f"{prefix}{name}")


def _is_resume_path(value: str) -> bool:
    from trainer.config import RESUME_POLICIES

    return value not in RESUME_POLICIES and bool(value.strip())


def _is_template_file(value: str) -> bool:
    from trainer.api import is_inline_template

    return bool(value.strip()) and not is_inline_template(value)


def _is_comparison_run(value: str) -> bool:
    from trainer.config import COMPARE_KINDS

    return value not in COMPARE_KINDS and bool(value.strip())


# str-typed config fields that name a file or folder only for some values (every other path is Path-typed;
# tests/test_privileges.py walks the schema and fails on a path-like field that is neither). `compare_with`:
# the evaluation's (eval.compare_with) is a run folder unless previous/production/base; the report's
# top-level one is Path-typed and never reaches this table.
STR_OR_PATH_FIELDS = {"resume": _is_resume_path, "chat_template": _is_template_file,
                      "compare_with": _is_comparison_run}


def _paths_in(value, where: str) -> Iterator[tuple[str, Path]]:
    if isinstance(value, Path):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _paths_in(item, f"{where}[{i}]")
    elif hasattr(type(value), "model_fields"):
        yield from config_paths(value, f"{where}.")


def _field_base(field_name: str) -> str:
    """`datasets[0].image_dir` -> `image_dir`: the kind of path, whatever section holds it."""
    return field_name.rsplit(".", 1)[-1].split("[")[0]


def config_access_problems(cfg, who: Identity, daemon_folders: dict[str, Path],
                           daemon: Optional[Identity] = None) -> list[tuple[str, str, str, str]]:
    """(field, path, reason, fix) for every path of `cfg` that `who` may not use as the job would (and,
    for the folders a job writes, that the daemon itself, `daemon`, could not write)."""
    problems = []
    for field_name, path in config_paths(cfg):
        base = _field_base(field_name)
        if base in WRITTEN_FIELDS:
            reason = (daemon_folder_problem(path, daemon_folders) or access_problem(path, who, WRITE)
                      or link_out_problem(path))
            fix = (f"point {base} at a folder you ({who.describe()}) may write, outside the daemon's folders "
                   f"(e.g. under your workspace)")
            if reason is None and daemon is not None and daemon.uid != 0:
                reason = access_problem(path, daemon, WRITE)  # the daemon writes there too, as itself
                if reason:
                    reason = f"the daemon cannot write it: {reason}"
                    fix = ("give the folder to the socket's group with the setgid bit and group write "
                           "(e.g. install -d -m 2770 -g agentd FOLDER), as /srv/agentd is")
        else:
            reason = (access_problem(path, who, READ) if base in SCANNED_FIELDS
                      else tree_access_problem(path, who))
            fix = f"point {base} at a file you ({who.describe()}) may read, or grant read access to it"
        if reason:
            problems.append((field_name, str(path), reason, fix))
    return problems


def daemon_folder_problem(path: Path, daemon_folders: dict[str, Path]) -> Optional[str]:
    """Why a folder a job writes overlaps one of the daemon's own folders, or None."""
    candidates = {Path(os.path.abspath(path)), Path(os.path.realpath(path))}
    for what, folder in daemon_folders.items():
        for mine in {Path(os.path.abspath(folder)), Path(os.path.realpath(folder))}:
            for p in candidates:
                relation = overlap(p, mine)
                if relation == "inside":
                    return f"is inside the daemon's {what} folder {mine}"
                if relation == "contains":
                    return f"contains the daemon's {what} folder {mine}"
    return None


def link_out_problem(folder: Path) -> Optional[str]:
    """A symbolic link inside a folder the daemon will write to that leads out of it, or None.

    The submitter may write in their output folder; a link planted there (`logs -> /var/lib/agentd`)
    would make the daemon write, prune or move its own files on their behalf.
    """
    root = Path(os.path.realpath(folder))
    if not root.is_dir():
        return None
    seen = 0
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            seen += 1
            if seen > MAX_TREE_ENTRIES:
                return None
            entry = Path(here, name)
            if entry.is_symlink():
                target = Path(os.path.realpath(entry))
                if target != root and root not in target.parents:
                    return (f"it holds a symbolic link {entry} that leads out of it (to {target}): the daemon "
                            f"writes, prunes and moves files here, so links out of it are refused")
    return None


def sample_access_problems(sample_paths: Iterable[Path], who: Identity, limit: int = 5) -> list[str]:
    """The first `limit` training files (images, caption files, text files) `who` may not read."""
    problems = []
    for path in sample_paths:
        problem = access_problem(path, who, READ)
        if problem:
            problems.append(f"{path}: {problem}")
            if len(problems) >= limit:
                break
    return problems


def sample_files(checked) -> Iterator[Path]:
    """Every file the job will read for its training data: images/texts, their caption files and masks."""
    cfg = checked.config
    extensions = {".txt"} | {ext for _, ext in _caption_extensions(cfg)}
    for sample in checked.scan.samples:
        yield sample.path
        mask = getattr(sample, "mask", None)
        if mask is not None:
            yield Path(mask)
        if getattr(sample, "caption_from", "file") == "file" and getattr(cfg, "mode", None) != "text":
            for ext in extensions:
                caption = sample.path.with_suffix(ext)
                if caption != sample.path and os.path.lexists(caption):
                    yield caption


def _caption_extensions(cfg, prefix: str = "") -> Iterator[tuple[str, str]]:
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if name == "caption_extension" and isinstance(value, str) and value:
            yield prefix + name, value
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(type(item), "model_fields"):
                yield from _caption_extensions(item, f"{prefix}{name}.")


def readable_files_problems(paths: Iterable[Path], who: Identity, limit: int = 5) -> list[str]:
    """The first `limit` of `paths` `who` may not read; each folder is judged once (datasets are large)."""
    problems: list[str] = []
    folders_ok: set[Path] = set()
    for path in paths:
        problem = None
        if path.parent not in folders_ok:
            problem = access_problem(path.parent, who, SEARCH)
            if problem is None:
                folders_ok.add(path.parent)
        if problem is None:
            try:
                st = os.lstat(path)
            except OSError:
                continue  # the dataset check reports missing files
            if stat.S_ISLNK(st.st_mode):
                problem = access_problem(path, who, READ)
            elif not permitted(st.st_mode, st.st_uid, st.st_gid, read_acl(path), who, READ):
                problem = f"{who.describe()} may not read it: {_describe_inode(path, st, read_acl(path))}"
        if problem:
            problems.append(f"{path}: {problem}" if not problem.startswith(str(path)) else problem)
            if len(problems) >= limit:
                break
    return problems


def authorizer(daemon_folders: dict[str, Path]):
    """The scheduler's submit-time check: `authorize(cfg, checked, submitter)` raises ConfigError (with
    every path the submitter may not use) or returns. Called with checked=None before the dataset is
    scanned (so the daemon reads nothing the submitter may not), then with the scan's files."""
    from trainer.errors import ConfigError, Problem

    daemon = Identity(os.geteuid(), frozenset({os.getegid(), *os.getgroups()}), "the daemon")

    def authorize(cfg, checked, submitter: Optional[dict], source: Optional[str] = None) -> None:
        if not submitter or submitter.get("uid") is None:
            return  # a job from before submitters were recorded
        who = Identity.from_submitter(submitter)
        if checked is None:
            problems = [Problem(f, reason, fix, path) for f, path, reason, fix in
                        config_access_problems(cfg, who, daemon_folders, daemon)]
        else:
            problems = [Problem("train_data_dir", reason,
                                f"grant {who.describe()} read access to the training files, or remove them", None)
                        for reason in readable_files_problems(sample_files(checked), who)]
        if problems:
            raise ConfigError(problems, source)

    return authorize
