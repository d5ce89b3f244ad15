"""The daemon's side of releases: promote, list, rollback, verify, backup, restore, keep and resolve.

The daemon holds the targets' credentials; clients ask over the control socket (`release` and `backup`
ops, agentd.server). One lock per name (a file lock under the state folder): two promotes of one name run
one after the other and take different versions. Every change starts by cleaning what an interrupted
promote left (`_repair`): a `pending` record without an end has its copies removed and gets an `aborted`
record, so the registry never names a version whose files are missing.

Who may do what (the one place this is decided for releases; see PERMISSIONS):
a submitter may promote a run whose output folder (run.json, the LoRA, eval/decision.json) they can read;
restore writes only into a folder they can write; list, verify, rollback and backup are open to every
member of the socket's group (the socket's mode is the access control, as for cancel and drain).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from agentd.release import ReleaseError
from agentd.release.artifact import LocalArtifact, read_artifact, release_name
from agentd.release.credentials import read_credential
from agentd.release.registry import (after_promote, check_name, empty_aliases, evaluation_summary, gate,
                                     next_version, release_ref, rollback_plan, unfinished, versions)
from agentd.release.targets import Storage, make_target

log = logging.getLogger("agentd.release")

# op action -> who may ask (the checks are in `check_permission`)
PERMISSIONS = {
    "promote": "a submitter who can read the run's output folder",
    "list": "any member of the socket's group",
    "verify": "any member of the socket's group",
    "rollback": "any member of the socket's group",
    "backup": "any member of the socket's group",
    "restore": "a submitter who can write the destination folder",
}


def check_permission(action: str, path: Path | None, submitter: dict | None) -> None:
    """Raises ReleaseError(code not_permitted) when `submitter` may not do `action` with `path`."""
    from agentd.access import WRITE, Identity, access_problem, tree_access_problem

    if action not in PERMISSIONS:
        raise ReleaseError(f"unknown action {action!r}; actions: {', '.join(PERMISSIONS)}", "bad_request")
    if path is None or not submitter or submitter.get("uid") is None:
        return
    who = Identity.from_submitter(submitter)
    if action == "promote":
        problem = tree_access_problem(path, who)
    elif action == "restore":
        problem = access_problem(path, who, WRITE)
    else:
        return
    if problem:
        raise ReleaseError(f"{who.describe()} may not {action} {path}: {problem}", "not_permitted")


class Releases:
    def __init__(self, settings, state_dir: Path, cache_dir: Path, environ=None):
        self.settings = settings
        self.targets = {n: make_target(n, t, read_credential(n, t, environ)) for n, t in settings.targets.items()}
        self.registry: Storage = self.targets[settings.registry]
        self.lock_dir = Path(state_dir) / "release-locks"
        self.kept_path = Path(state_dir) / "kept.jsonl"  # runs backed up without a release (`keep: true`)
        self._backup_lock = threading.Lock()  # the daily pass and `agentd backup` one at a time
        self.cache_dir = Path(cache_dir) / "releases"

    # --- the registry ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str):
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_dir / f"{name}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one promote/rollback of a name at a time; the others wait
            yield

    def records(self, name: str) -> list[dict]:
        raw = self.registry.get(f"{name}/registry.jsonl") or b""
        out = []
        for line in raw.decode().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("registry %s: skipping a torn line (a write cut short)", name)
        return out

    def aliases(self, name: str) -> dict:
        raw = self.registry.get(f"{name}/aliases.json")
        return {**empty_aliases(), **(json.loads(raw) if raw else {})}

    def _append(self, name: str, record: dict) -> None:
        self.registry.append(f"{name}/registry.jsonl", json.dumps({**record, "at": round(time.time(), 3)},
                                                                  sort_keys=True))

    def _set_aliases(self, name: str, aliases: dict) -> None:
        self.registry.put(f"{name}/aliases.json", json.dumps(aliases, sort_keys=True).encode())

    def _repair(self, name: str) -> list[str]:
        """End every promote that never ended: remove its copies, record it aborted. Returns what was done."""
        done = []
        for rel in unfinished(self.records(name)):
            leftovers = []
            for t in rel.get("targets") or []:
                if t not in self.targets:
                    continue
                try:
                    self.targets[t].remove(rel)
                except ReleaseError as e:
                    leftovers.append(f"{t} ({e})")
            error = "interrupted: the daemon stopped during this promote; its copies were removed"
            if leftovers:
                error += f", except on {', '.join(leftovers)} (incomplete: no manifest)"
            self._append(name, {"event": "aborted", "version": rel["version"], "error": error})
            done.append(f"v{rel['version']}: {error}")
            log.warning("release %s v%d: %s", name, rel["version"], error)
        return done

    # --- promote ---------------------------------------------------------------------------------
    def promote(self, run_dir: Path, *, name: str | None = None, to: list[str] | None = None, force: bool = False,
                reason: str | None = None, by: str | None = None, alias: str = "production") -> dict:
        run_dir = Path(run_dir)
        run = read_run(run_dir)
        name = name or run.get("name")
        check_name(name)
        if alias not in ("production", "candidate"):
            raise ReleaseError(f"alias {alias!r}: promote as production or candidate", "bad_request")
        to = list(to or self.settings.promote_targets())
        unknown = [t for t in to if t not in self.targets]
        if unknown:
            raise ReleaseError(f"unknown target {', '.join(unknown)}: targets are {', '.join(sorted(self.targets))} "
                               "(release.targets in agentd.yaml)", "bad_request")
        if force and not (reason or "").strip():
            raise ReleaseError("--force needs --reason TEXT: the registry records why the gate was overridden",
                               "bad_request")
        lora = run_lora(run_dir, run)
        local = read_artifact(lora)
        decision = read_decision(run_dir)
        with self.lock(name):
            repaired = self._repair(name)
            records, aliases = self.records(name), self.aliases(name)
            states = versions(records)
            production = states.get(aliases["production"]) if aliases["production"] is not None else None
            if production is not None and production.get("sha256") == local.sha256 and alias == "production":
                raise ReleaseError(f"{lora} is already in production as {name} v{production['version']}", "bad_state")
            refusal = gate(name, decision, production, _against_sha(decision)) if alias == "production" else None
            if refusal and not force:
                raise ReleaseError(f"promote of {run_dir} as {name} refused: {refusal}. To release it anyway: "
                                   "--force --reason TEXT", "refused",
                                   metrics=(decision or {}).get("metrics") or {})
            version = next_version(records)
            rel = release_record(name, version, run_dir, run, local, decision, to, by, alias,
                                 forced=bool(refusal) and force, reason=reason, refusal=refusal)
            for t in to:
                self.targets[t].check(rel)  # refuse before anything is copied
            self._append(name, {"event": "pending", "version": version, "artifact": rel["artifact"],
                                "files": rel["files"], "targets": to, "by": by, "name": name})
            done: list[str] = []
            for t in to:
                try:
                    self.targets[t].publish(rel, local)
                    done.append(t)
                except ReleaseError as e:
                    self._undo(name, rel, done + [t])
                    where = f"production stays v{aliases['production']}" if aliases["production"] else \
                        "no version is in production"
                    self._append(name, {"event": "aborted", "version": version, "error": str(e)})
                    raise ReleaseError(f"release {name} v{version} failed at target {t}: {e}. Nothing was released "
                                       f"({where}; the copies on {', '.join(done + [t])} were removed)",
                                       "release_failed", target=t) from None
            self._append(name, {"event": "released", **rel})
            new_aliases = after_promote(aliases, version, alias)
            self._set_aliases(name, new_aliases)
        log.info("released %s v%d (%s) from %s by %s to %s%s", name, version, rel["artifact"], run_dir, by,
                 ", ".join(to), f", forced: {reason}" if rel["forced"] else "")
        return {"name": name, "version": version, "artifact": rel["artifact"], "sha256": rel["sha256"],
                "targets": to, "aliases": new_aliases, "forced": rel["forced"], "repaired": repaired}

    def _undo(self, name: str, rel: dict, targets: list[str]) -> None:
        for t in reversed(targets):
            try:
                self.targets[t].remove(rel)
            except ReleaseError as e:
                log.warning("release %s v%d: removing the copy on %s failed (it stays incomplete: no manifest): %s",
                            name, rel["version"], t, e)

    # --- list, rollback, verify ------------------------------------------------------------------
    def list(self, name: str) -> dict:
        check_name(name)
        records = self.records(name)
        if not records:
            raise ReleaseError(f"no release named {name} in the registry ({self.settings.registry})", "not_found")
        return {"name": name, "aliases": self.aliases(name),
                "versions": [_public(v) for _, v in sorted(versions(records).items())]}

    def rollback(self, name: str, to: int | None = None, by: str | None = None) -> dict:
        check_name(name)
        with self.lock(name):
            repaired = self._repair(name)
            records, aliases = self.records(name), self.aliases(name)
            if not records:
                raise ReleaseError(f"no release named {name} in the registry", "not_found")
            target, new_aliases = rollback_plan(aliases, records, to)
            rel = versions(records)[target]
            for t in rel["targets"]:
                self.targets[t].activate(rel)  # servers load/refresh the old version again; nothing is copied
            self._append(name, {"event": "rollback", "from": aliases["production"], "to": target, "by": by})
            self._set_aliases(name, new_aliases)
        log.info("rolled %s back from v%s to v%d by %s", name, aliases["production"], target, by)
        return {"name": name, "from": aliases["production"], "to": target, "aliases": new_aliases,
                "repaired": repaired}

    def verify(self, name: str) -> dict:
        """Every released version's copy on each of its targets against the manifest; every server lists the
        production version. A promote that never ended is reported (the next promote or rollback cleans it)."""
        check_name(name)
        records = self.records(name)
        if not records:
            raise ReleaseError(f"no release named {name} in the registry", "not_found")
        aliases = self.aliases(name)
        problems, checked = [], []
        for version, rel in sorted(versions(records).items()):
            if rel["state"] == "pending":
                problems.append(f"v{version}: a promote was interrupted (the daemon stopped); the next promote or "
                                "rollback of this name removes its copies")
                continue
            if rel["state"] != "released":
                continue
            for t in rel["targets"]:
                if t not in self.targets:
                    problems.append(f"v{version}: target {t} is no longer in agentd.yaml")
                    continue
                problems += [f"v{version}: {p}" for p in
                             self.targets[t].verify(rel, live=version == aliases["production"])]
                checked.append(f"v{version}@{t}")
        if aliases["production"] is not None and \
                versions(records).get(aliases["production"], {}).get("state") != "released":
            problems.append(f"production names v{aliases['production']}, which is not a released version")
        return {"name": name, "problems": problems, "checked": checked, "aliases": aliases}

    # --- backup, restore, resolve ----------------------------------------------------------------
    def _backup_target(self) -> Storage:
        if self.settings.backup is None:
            raise ReleaseError("no backup target: set release.backup in agentd.yaml to a folder or s3 target",
                               "bad_request")
        return self.targets[self.settings.backup]

    def backup(self) -> dict:
        """Copy every released version missing or damaged on the backup target there (from a copy that
        hashes right), verify it, and copy each name's registry and aliases alongside."""
        backup = self._backup_target()
        with self._backup_lock:
            return self._backup_all(backup)

    def _backup_all(self, backup: Storage) -> dict:
        copied, verified, problems = [], [], []
        for name in self.registry.names():
            for version, rel in sorted(versions(self.records(name)).items()):
                if rel["state"] != "released":
                    continue
                if not backup.verify(rel):
                    verified.append(f"{name} v{version}")
                    continue
                try:
                    with tempfile.TemporaryDirectory(dir=self._tmp_root()) as tmp:
                        local = self._fetch_any(rel, Path(tmp), exclude=self.settings.backup)
                        backup.publish(rel, local)
                    left = backup.verify(rel)
                except ReleaseError as e:
                    left = [str(e)]
                if left:
                    problems += left
                else:
                    copied.append(f"{name} v{version}")
            for key in ("registry.jsonl", "aliases.json"):
                data = self.registry.get(f"{name}/{key}")
                if data is not None and backup is not self.registry:
                    backup.put(f"{name}/{key}", data)
        log.info("backup to %s: %d copied, %d already there, %d problem(s)", self.settings.backup, len(copied),
                 len(verified), len(problems))
        return {"target": self.settings.backup, "copied": copied, "verified": verified, "problems": problems}

    def keep(self, run_dir: Path) -> dict:
        """Copy a run's LoRA to the backup target whether or not it is released (`keep: true`), as
        kept/<run id>-<sha256[:12]>(.safetensors) with its manifest, and remember it (state_dir/kept.jsonl)."""
        backup = self._backup_target()
        run = read_run(Path(run_dir))
        local = read_artifact(run_lora(Path(run_dir), run))
        stem = f"{run.get('run_id') or 'run'}-{local.sha256[:12]}"
        rel = {"name": "kept", "version": 0, "artifact": stem if local.is_folder else f"{stem}.safetensors",
               "sha256": local.sha256, "files": local.files, "run_dir": str(run_dir), "run_id": run.get("run_id")}
        backup.publish(rel, local)
        problems = backup.verify(rel)
        if problems:
            raise ReleaseError("; ".join(problems))
        with open(self.kept_path, "a") as f:
            f.write(json.dumps(rel, sort_keys=True) + "\n")
        return {"artifact": rel["artifact"], "target": self.settings.backup}

    def backed_up(self) -> set[str]:
        """sha256 of every released or kept LoRA whose copy on the backup target verifies (gc prunes only
        checkpoints of these)."""
        if self.settings.backup is None:
            return set()
        backup = self.targets[self.settings.backup]
        candidates = [rel for name in self.registry.names() for rel in versions(self.records(name)).values()
                      if rel["state"] == "released"]
        if self.kept_path.is_file():
            candidates += [json.loads(line) for line in self.kept_path.read_text().splitlines() if line.strip()]
        return {rel["sha256"] for rel in candidates if not backup.verify(rel)}

    def restore(self, name: str, version: int, dest: Path) -> Path:
        check_name(name)
        rel = versions(self.records(name)).get(version)
        if rel is None or rel["state"] != "released":
            raise ReleaseError(f"{name} v{version} is not a released version (agentd release list {name})",
                               "not_found")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return self._backup_target().fetch(rel, dest)

    def resolve(self, name: str) -> tuple[Path, str] | None:
        """The production LoRA of `name` as a local path, hash-checked, and its NAME@vN (`compare_with:
        production` of the evaluation: trainer.api.ResolveRelease, passed to run_job and run_decision as
        `resolve_release`). None when there is none."""
        try:
            check_name(name)
            records = self.records(name)
        except ReleaseError:
            return None
        production = self.aliases(name)["production"]
        if production is None:
            return None
        rel = versions(records)[production]
        cached = self.cache_dir / rel["artifact"]
        ref = release_ref(name, production)
        if cached.exists() and read_artifact(cached).sha256 == rel["sha256"]:
            return cached, ref
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            local = self._fetch_any(rel, Path(tmp))
            if cached.is_dir():
                shutil.rmtree(cached)
            cached.unlink(missing_ok=True)
            local.root.replace(cached)
        return cached, ref

    def _tmp_root(self) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir

    def _fetch_any(self, rel: dict, dest: Path, exclude: str | None = None) -> LocalArtifact:
        """This version from the first storage target that has a copy matching its manifest."""
        errors = []
        for t in rel["targets"]:
            target = self.targets.get(t)
            if t == exclude or not isinstance(target, Storage):
                continue
            try:
                return read_artifact(target.fetch(rel, dest))
            except ReleaseError as e:
                errors.append(str(e))
        raise ReleaseError(f"{rel['name']} v{rel['version']}: no storage target holds a good copy"
                           + (f": {'; '.join(errors)}" if errors else " (it went to servers only)"))


# --- reading a run folder --------------------------------------------------------------------------

def read_run(run_dir: Path) -> dict:
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        raise ReleaseError(f"{run_dir} is not a run folder (no run.json): give the output_dir of a finished job",
                           "bad_request") from None
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{run_dir}/run.json cannot be read: {type(e).__name__}", "bad_request") from None
    if run.get("status") != "succeeded":
        raise ReleaseError(f"the run in {run_dir} is {run.get('status') or 'unfinished'}, not succeeded: only a "
                           "finished run can be released", "bad_state")
    return run


def run_lora(run_dir: Path, run: dict) -> Path:
    """The run's LoRA: `<name>.safetensors` (image) or the PEFT folder `<name>-peft` (text)."""
    for candidate in (run_dir / f"{run.get('name')}.safetensors", run_dir / f"{run.get('name')}-peft"):
        if candidate.exists():
            return candidate
    raise ReleaseError(f"the run in {run_dir} has no LoRA ({run.get('name')}.safetensors or {run.get('name')}-peft/)",
                       "bad_state")


def read_decision(run_dir: Path) -> dict | None:
    path = run_dir / "eval" / "decision.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path} cannot be read ({type(e).__name__}): evaluate the run again",
                           "bad_request") from None


def _against_sha(decision: dict | None) -> str | None:
    lora = ((decision or {}).get("against") or {}).get("lora")
    if lora and Path(lora).exists():
        return read_artifact(Path(lora)).sha256
    return None


def release_record(name, version, run_dir, run, local: LocalArtifact, decision, to, by, alias, *, forced, reason,
                   refusal) -> dict:
    fields = run.get("training_fields") or {}
    family = fields.get("model_family") or ("causal_lm" if fields.get("mode") == "text" else None)
    modules_to_save = None
    if local.is_folder and (local.root / "adapter_config.json").is_file():
        modules_to_save = json.loads((local.root / "adapter_config.json").read_text()).get("modules_to_save")
    return {"name": name, "version": version, "artifact": release_name(name, version, local.sha256, local.is_folder),
            "is_folder": local.is_folder, "sha256": local.sha256, "size": local.size, "files": local.files,
            "run_id": run.get("run_id"), "run_dir": str(run_dir), "commit": (run.get("git") or {}).get("commit"),
            "build_url": (run.get("jenkins") or {}).get("BUILD_URL"), "family": family,
            "base_model": fields.get("base_model"), "base_fingerprint": base_fingerprint(fields.get("base_model")),
            "lora_rank": fields.get("lora_rank"), "modules_to_save": modules_to_save,
            "evaluation": evaluation_summary(decision), "by": by, "reason": reason, "forced": forced,
            "gate": refusal, "targets": to, "alias": alias}


def base_fingerprint(base_model: str | None) -> str | None:
    """sha256 (first 16) of the base model's config files (model_index.json / config.json and its components'),
    or of a single-file checkpoint's size and name: which base a LoRA needs, without hashing gigabytes."""
    if not base_model:
        return None
    import hashlib

    path = Path(base_model)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.glob("*.json")) + sorted(path.glob("*/config.json")):
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + p.read_bytes())
    elif path.is_file():
        h.update(f"{path.name}\0{path.stat().st_size}".encode())
    else:
        return None
    return h.hexdigest()[:16]


def _public(v: dict) -> dict:
    keep = ("version", "state", "artifact", "sha256", "size", "run_id", "run_dir", "commit", "build_url", "family",
            "base_model", "evaluation", "by", "reason", "forced", "targets", "alias", "error", "at")
    return {k: v.get(k) for k in keep if k in v}

