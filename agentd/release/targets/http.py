"""HTTP for the server targets (stdlib urllib): JSON in and out, every failure a ReleaseError that names
the target, the route and what to check. The secret goes into one header and into nothing else."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

from agentd.release import ReleaseError
from agentd.release.targets import partial_copies, temporary_path


class Server:
    """A server target's HTTP client and its LoRA folder."""

    def __init__(self, name: str, settings, secret, auth: str):
        self.name = name
        self.url = settings.url.rstrip("/")
        self.lora_dir = Path(settings.lora_dir)
        self.timeout = settings.timeout_s
        self.settings = settings
        self._header = None
        if secret is not None:
            value = secret.reveal()
            self._header = ("Basic " + base64.b64encode(value.encode()).decode()) if auth == "basic" \
                else f"Bearer {value}"

    def call(self, method: str, route: str, body: dict | None = None, ok=(200,)) -> tuple[int, object]:
        """(status, parsed JSON or text) for a status in `ok`; other answers raise with what to check."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + route, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._header:
            req.add_header("Authorization", self._header)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (socket.timeout, TimeoutError):
            raise ReleaseError(f"target {self.name}: {method} {route} timed out after {self.timeout:g} s: check that "
                               f"the server at {self.url} is up and not overloaded (release.targets.{self.name}."
                               "timeout_s)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ReleaseError(f"target {self.name}: {self.url} is unreachable ({type(reason).__name__}): check that "
                               f"the server runs and release.targets.{self.name}.url") from None
        text = raw.decode("utf-8", "replace")
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        if status in ok:
            return status, payload
        if status in (401, 403):
            raise ReleaseError(f"target {self.name}: {method} {route} answered {status}: the server refused "
                               f"agentd's credential: check release.targets.{self.name}.credential", "target_auth")
        if status >= 500:
            raise ReleaseError(f"target {self.name}: {method} {route} answered {status} (server error): check the "
                               f"server's log at {self.url}")
        raise ReleaseError(f"target {self.name}: {method} {route} answered {status}: {_detail(payload)}",
                           "target_refused", status=status)

    # --- what every server target does the same way ------------------------------------------------
    def publish(self, rel: dict, local) -> None:
        """Copy the artifact into the LoRA folder, then have the server take it (the target's `activate`)."""
        self.copy_in(rel, local)
        self.activate(rel)

    def verify(self, rel: dict, live: bool = False) -> list[str]:
        """The copy in the LoRA folder is there and, `live`, the server lists it (its `_listed`)."""
        copy = self.lora_dir / rel["artifact"]
        problems = [] if copy.exists() else [f"{self.name}: {copy} is missing"]
        if live and (problem := self._listed(rel)):
            problems.append(problem)
        return problems

    def require_listed(self, rel: dict) -> None:
        problem = self._listed(rel)
        if problem:
            raise ReleaseError(problem)

    def _listed(self, rel: dict) -> str | None:
        """None when the server lists the artifact; else what is wrong and what to check (per server)."""
        raise NotImplementedError

    # --- the LoRA folder ---------------------------------------------------------------------------
    def copy_in(self, rel: dict, local) -> Path:
        """Copy the artifact into the LoRA folder under its versioned name: temporary name, fsync, rename."""
        dest = self.lora_dir / rel["artifact"]
        if not self.lora_dir.is_dir():
            raise ReleaseError(f"target {self.name}: LoRA folder {self.lora_dir} does not exist: fix "
                               f"release.targets.{self.name}.lora_dir")
        tmp = temporary_path(dest)
        try:
            if local.is_folder:
                shutil.copytree(local.root, tmp)
            else:
                with open(local.root, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                    fout.flush()
                    os.fsync(fout.fileno())
            os.replace(tmp, dest)
        except OSError as e:
            _remove(tmp)
            raise ReleaseError(f"target {self.name}: cannot write {dest}: {e.strerror}: check the folder's free "
                               "space and that the daemon may write it") from None
        return dest

    def remove_copy(self, rel: dict) -> None:
        _remove(self.lora_dir / rel["artifact"])
        for partial in partial_copies(self.lora_dir / rel["artifact"]):  # a copy cut short by a killed daemon
            _remove(partial)

    def check_safetensors_lora(self, rel: dict) -> None:
        """A1111/Forge and ComfyUI load one .safetensors file of a family they serve (not a PEFT folder)."""
        self.family_problem(rel, self.settings.families)
        if rel.get("is_folder"):
            raise ReleaseError(f"target {self.name} takes .safetensors LoRAs; {rel['name']} is a PEFT folder",
                               "bad_request")

    def family_problem(self, rel: dict, families: list[str]) -> None:
        if rel.get("family") not in families:
            raise ReleaseError(f"target {self.name} serves {', '.join(families)} LoRAs, and {rel['name']} is a "
                               f"{rel.get('family')} LoRA: release it to a server of its family (--to), or fix "
                               f"release.targets.{self.name}.families", "bad_request")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _detail(payload) -> str:
    if isinstance(payload, dict):
        for key in ("message", "detail", "error"):
            value = payload.get(key)
            if isinstance(value, dict):
                value = value.get("message")
            if value:
                return str(value)[:300]
    return str(payload)[:300]

