"""The ``jenkins:`` section of agentd.yaml, and the API token it points to.

The token is never a setting value itself: the settings name *where* it is (a file, an environment
variable or a systemd credential), so that agentd.yaml can be world-readable and shown by
``agentd status`` without leaking anything. :func:`read_token` resolves it into a :class:`Secret`,
whose ``repr``/``str`` is ``***`` so that it cannot reach a log line, an error or a status by accident.
"""

from __future__ import annotations

import os
import socket
import stat
import logging
from pathlib import Path
from typing import Literal, Mapping, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agentd.jenkins.labels import is_valid_label

log = logging.getLogger(__name__)

# Characters Jenkins refuses in a node name (jenkins.model.Jenkins.checkGoodName).
_BAD_NODE_NAME_CHARS = set('?*/\\%!@#$^&|<>[]:;')


class Secret:
    """A string that must never be shown: ``repr``, ``str`` and ``format`` all give ``***``.

    Call :meth:`reveal` at the single place the real value is needed (the HTTP client, the 0600
    secret file). Equality compares the hidden values so tests and change detection still work.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        """The real value. Pass it straight to the consumer; never log or format it."""
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # pickling would write the value somewhere we do not control
        raise TypeError("Secret cannot be pickled")


class TokenError(ValueError):
    """The API token could not be read. The message names the source and path, never the token."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _seconds(default: float, description: str):
    """A duration setting in seconds: positive, with its default and its description."""
    return Field(default=default, gt=0, description=description)


class SshLauncherSettings(_Model):
    """Settings for ``launcher: ssh``: the controller connects to this box over SSH by itself."""

    credentials_id: str = Field(
        description="ID of the Jenkins credential (SSH user + private key) the controller logs in with.")
    host: Optional[str] = Field(
        default=None,
        description="Host name or address the controller connects to; default: this machine's FQDN.")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port on this box.")
    java_path: Optional[str] = Field(
        default=None,
        description="Java executable on this box for the SSH launcher; default: Jenkins's choice.")


class WatchSettings(_Model):
    """Config-folder trigger: a new or changed ``*.yaml``/``*.yml`` under ``dir`` starts a Jenkins build."""

    dir: Path = Field(description="Folder to watch (recursively) for training configs.")
    job: str = Field(description="Jenkins job to build (a parameterized job; folders as 'a/b').")
    parameter: str = Field(
        default="CONFIG_FILE", description="Build parameter that receives the config file's absolute path.")
    debounce_s: float = _seconds(
        2.0, "A file must be unchanged (no event, same size and mtime) this long before it is used; "
             "this is what skips partial writes and editor save sequences.")


class JenkinsSettings(_Model):
    """The ``jenkins:`` section of agentd.yaml. With ``url`` unset the whole link is disabled."""

    url: Optional[str] = Field(
        default=None,
        description="Controller root URL, e.g. https://ci.example.com/. None disables the link.")
    user: Optional[str] = Field(default=None, description="Jenkins user the API token belongs to.")
    token_file: Optional[Path] = Field(
        default=None, description="File holding the user's API token (should be mode 0600).")
    token_env: Optional[str] = Field(
        default=None, description="Name of an environment variable holding the API token.")
    token_credential: Optional[str] = Field(
        default=None,
        description="Name of a systemd credential (LoadCredential=NAME:/path in the unit), "
                    "read from $CREDENTIALS_DIRECTORY/NAME.")
    verify_tls: bool = Field(default=True, description="Verify the controller's TLS certificate.")
    ca_bundle: Optional[Path] = Field(
        default=None, description="CA bundle (PEM) to verify the controller with, for a private CA.")
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="Name of this box's node in Jenkins; default: host name.")
    remote_fs: str = Field(
        default="/srv/agentd/jenkins",
        description="Node's remote root directory (the agent's -workDir): owned by agent_user, outside the "
                    "daemon's state folder.")
    labels: list[str] = Field(
        default_factory=list, description="Extra labels, added to the ones derived from the GPUs.")
    launcher: Literal["inbound", "ssh", "none"] = Field(
        default="inbound",
        description="inbound: agentd runs agent.jar and connects out; ssh: the controller connects over SSH; "
                    "none: agentd only registers the node and keeps its labels and online state.")
    websocket: bool = Field(
        default=False,
        description="inbound: connect agent.jar over WebSocket (-webSocket), through HTTP(S) only.")
    ssh: Optional[SshLauncherSettings] = Field(default=None, description="Required when launcher is 'ssh'.")
    agent_jar_dir: Path = Field(
        default=Path("/srv/agentd/agent"),
        description="Where agent.jar is cached and the agent secret file is kept (0600, or 0640 with "
                    "agent_user: then the folder's group must be the build user's, setgid).")
    agent_user: Optional[str] = Field(
        default=None,
        description="Run agent.jar, hence every build on this node, as this user (agentd-build in the shipped "
                    "settings); it must not be the daemon's user, or builds can read the API token. Needs "
                    "CAP_SETUID/CAP_SETGID (the unit grants them). None: agent.jar runs as the daemon's user.")
    java: str = Field(
        default="java",
        description="Java command for agent.jar (split like a shell word list, so 'java -Xmx512m' works).")
    timeout_s: float = _seconds(15.0, "HTTP timeout for each request to the controller.")
    sync_interval_s: float = _seconds(
        60.0, "How often the node is checked against the desired state (catches a controller restart).")
    retry_min_s: float = _seconds(
        2.0, "First retry delay after a failure (jitter shortens each delay by up to half).")
    retry_max_s: float = _seconds(300.0, "Longest retry delay (exponential backoff cap).")
    agent_restart_min_s: float = _seconds(1.0, "First delay before restarting agent.jar.")
    agent_restart_max_s: float = _seconds(60.0, "Longest delay before restarting agent.jar.")
    agent_stable_s: float = _seconds(
        60.0, "agent.jar running this long counts as healthy: its restart backoff resets.")
    agent_stop_timeout_s: float = _seconds(
        10.0, "Wait this long after SIGTERM before SIGKILL when stopping agent.jar.")
    watch: Optional[WatchSettings] = Field(default=None, description="Optional config-folder trigger.")

    @property
    def enabled(self) -> bool:
        """True when a controller URL is configured."""
        return self.url is not None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: Optional[str]) -> Optional[str]:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
        if parts.username or parts.password:
            # A password in the URL would end up in logs and errors; the token has its own settings.
            raise ValueError("must not contain user:password@; "
                             "use user and token_file/token_env/token_credential")
        return url if url.endswith("/") else url + "/"

    @field_validator("node_name")
    @classmethod
    def _check_node_name(cls, name: str) -> str:
        name = name.strip()
        if not name or name in (".", ".."):
            raise ValueError("must not be empty, '.' or '..'")
        bad = sorted(set(name) & _BAD_NODE_NAME_CHARS)
        if bad or any(ord(c) < 32 for c in name):
            raise ValueError(f"contains characters Jenkins refuses in node names: {''.join(bad)!r}")
        return name

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: list[str]) -> list[str]:
        bad = [label for label in labels if not is_valid_label(label)]
        if bad:
            raise ValueError(f"invalid label(s) {bad}: use letters, digits and . _ - + : / (no spaces)")
        return labels

    @model_validator(mode="after")
    def _check_combination(self) -> "JenkinsSettings":
        sources = [n for n in ("token_file", "token_env", "token_credential") if getattr(self, n) is not None]
        if len(sources) > 1:
            raise ValueError("set only one of token_file, token_env, token_credential "
                             f"(got {', '.join(sources)})")
        if self.url is not None:
            if not self.user:
                raise ValueError("jenkins.user is required when jenkins.url is set")
            if not sources:
                raise ValueError("one of token_file, token_env, token_credential is required "
                                 "when jenkins.url is set")
        if self.launcher == "ssh" and self.ssh is None:
            raise ValueError("launcher 'ssh' needs an ssh: {credentials_id, host, port} section")
        for low, high in (("retry_min_s", "retry_max_s"), ("agent_restart_min_s", "agent_restart_max_s")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} must not exceed {high}")
        return self


def token_source(settings: JenkinsSettings) -> str:
    """Where the token comes from, for messages: e.g. ``token_file /etc/agentd/jenkins.token``."""
    if settings.token_file is not None:
        return f"token_file {settings.token_file}"
    if settings.token_env is not None:
        return f"token_env ${settings.token_env}"
    if settings.token_credential is not None:
        name = settings.token_credential
        return f"token_credential {name} ($CREDENTIALS_DIRECTORY/{name})"
    return "no token source configured"


def _read_token_file(path: Path, what: str) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenError(f"{what}: file {path} does not exist") from None
    except PermissionError:
        raise TokenError(f"{what}: file {path} is not readable by uid {os.getuid()} "
                         "(permission denied)") from None
    except IsADirectoryError:
        raise TokenError(f"{what}: {path} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"{what}: cannot read {path}: {type(e).__name__}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: %s is readable by group or others (mode %o); chmod 600 it", what, path, mode & 0o777)
    return text


def read_token(settings: JenkinsSettings, environ: Optional[Mapping[str, str]] = None) -> Secret:
    """Resolve the API token from the configured source.

    Only the first line is used and surrounding whitespace is stripped (files usually end with a newline).
    Raises :class:`TokenError` naming the source and path; the error never contains token text.
    """
    env = os.environ if environ is None else environ
    if settings.token_file is not None:
        text = _read_token_file(settings.token_file, "jenkins.token_file")
        where = f"jenkins.token_file {settings.token_file}"
    elif settings.token_env is not None:
        if settings.token_env not in env:
            raise TokenError(f"jenkins.token_env: environment variable {settings.token_env} is not set")
        text = env[settings.token_env]
        where = f"jenkins.token_env ${settings.token_env}"
    elif settings.token_credential is not None:
        cred_dir = env.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise TokenError(
                f"jenkins.token_credential {settings.token_credential}: $CREDENTIALS_DIRECTORY is not set; "
                f"run agentd under systemd with LoadCredential={settings.token_credential}:/path/to/token")
        path = Path(cred_dir) / settings.token_credential
        text = _read_token_file(path, f"jenkins.token_credential {settings.token_credential}")
        where = f"jenkins.token_credential {path}"
    else:
        raise TokenError("no API token source: set jenkins.token_file, token_env or token_credential")
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise TokenError(f"{where} is empty")
    return Secret(token)
