"""The daemon's settings (`agentd.yaml`): where it listens, where it keeps state, which devices it uses.

Relative paths resolve against the settings file's folder. systemd's directories win for the
defaults when the unit sets them: `$RUNTIME_DIRECTORY` (socket), `$STATE_DIRECTORY` (journal),
`$CACHE_DIRECTORY` (agent.jar and other caches). Errors are reported like training-config errors:
every problem with field, value, line and fix (exit code 78, `trainer.errors.ExitCode.BAD_SETTINGS`,
which the unit does not restart on).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from agentd.jenkins.settings import JenkinsSettings
from agentd.release.settings import ReleaseSettings
from agentd.paths import default_socket, env_dir
from trainer.gpus import VRAM_MARGIN_MIB


class MetricsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = False
    """Serve Prometheus metrics over HTTP."""
    host: str = "127.0.0.1"
    """Bind address; loopback by default (metrics show job names and build URLs)."""
    port: int = Field(9464, ge=0, le=65535)
    """TCP port (0: any free port, shown in `agentd status`)."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    socket: Path = Field(default_factory=default_socket)
    """Control socket path. Clients use --socket or $AGENTD_SOCKET to reach it."""
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    """File mode of the socket: the access control (who may submit and cancel jobs)."""
    socket_group: Optional[str] = None
    """Group that owns the socket (its members may use agentd). Default: the daemon's group."""
    operator_group: Optional[str] = None
    """Members of this group (with root and the daemon's user) are operators: they may cancel, pause, resume
    and read the events of every job, and drain/undrain the box. Others act only on their own jobs. Default:
    none (only root). A group that does not exist stops the daemon at start (exit 78)."""
    state_dir: Path = Field(default_factory=lambda: env_dir("STATE_DIRECTORY", "/var/lib/agentd"))
    """Journal (sqlite) and daemon state."""
    cache_dir: Path = Field(default_factory=lambda: env_dir("CACHE_DIRECTORY", "/var/cache/agentd"))
    """Daemon-owned caches (agent.jar, ...)."""
    slots: Union[Literal["auto"], list[str]] = "auto"
    """Devices to run jobs on: auto (every GPU, or `cpu_slots` CPU slots without a GPU), or e.g. [cuda:0, cuda:1]
    / [cpu] (`cpu` stands for the `cpu_slots` CPU slots)."""
    cpu_slots: int = Field(1, ge=1)
    """CPU slots on a box without GPUs: jobs run side by side, and a config's `devices: N` runs N CPU ranks
    (gloo) on N of them at once."""
    model_cache_size: int = Field(1, ge=0)
    """Frozen base models kept warm between jobs (per daemon). 0 disables the warm cache."""
    stop_timeout_s: float = Field(90, gt=0)
    """On SIGTERM, how long a running job gets to reach a step boundary and checkpoint.
    Keep below the unit's TimeoutStopSec (120)."""
    max_message_bytes: int = Field(1 << 20, ge=4096)
    """Largest control-socket message accepted (a line of JSON)."""
    idle_client_timeout_s: float = Field(30, gt=0)
    """A client must send its request line within this long of connecting, however slowly it trickles it;
    otherwise it is dropped (no connection pins a daemon thread)."""
    vram_margin_mib: int = Field(VRAM_MARGIN_MIB, ge=0)
    """Safety margin on top of a job's VRAM estimate before it may start on a GPU."""
    gate_timeout_s: float = Field(3600, gt=0)
    """How long a job waits for GPU memory before it fails."""
    gate_poll_s: float = Field(2.0, gt=0)
    """How often a waiting job re-checks GPU memory (and tells its client why it waits)."""
    max_foreign_vram_mib: Optional[int] = Field(None, ge=0)
    """Block a GPU while processes not run by agentd hold more than this (the seed's nvidia-smi check)."""
    warm_vram_ttl_s: float = Field(30, ge=0)
    """How long a finished job's base model stays on the GPU for the next job (a queue on the same base
    skips the move); then it moves to host memory and agentd holds ~0 VRAM while idle. 0: move at once."""
    max_wait_s: float = Field(3600, gt=0)
    """Priorities: a queued job that has waited this long goes next, whatever the priorities behind it."""
    max_infra_retries: int = Field(2, ge=0)
    """A job hit by an infrastructure failure (a CUDA error that is not out-of-memory, a lost GPU) is
    re-queued from its last checkpoint on a healthy slot up to this many times; then `agentd run` exits 5."""
    retention_days: int = Field(30, gt=0)
    """`agentd gc` and the daily pass: journal entries and daemon caches older than this are removed."""
    gc_user_outputs: bool = False
    """Let gc prune old checkpoints in job output folders beyond each job's keep_checkpoints."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Daemon log level (stderr; journald picks it up)."""
    sweep_db_password_file: Optional[Path] = None
    """The PostgreSQL password of sweeps whose `storage:` is a postgresql:// URL (the sweep file never holds
    it). Under systemd: `LoadCredential=sweep-db-password:/etc/agentd/sweep-db-password` and
    `sweep_db_password_file: /run/credentials/agentd.service/sweep-db-password`. Unset: no password."""
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    """Optional Prometheus endpoint."""
    jenkins: JenkinsSettings = Field(default_factory=JenkinsSettings)
    """The Jenkins link (controller, node, labels, launcher). Disabled while url is unset."""
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)
    """Release targets (folders, S3, inference servers) and the registry (agentd.release). Off while unset."""

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"


PATH_FIELDS = ("socket", "state_dir", "cache_dir", "sweep_db_password_file")
JENKINS_PATH_FIELDS = ("token_file", "ca_bundle", "agent_jar_dir")
RELEASE_TARGET_PATH_FIELDS = ("path", "lora_dir", "credential_file")


def load_settings(path: str | Path | None) -> Settings:
    """Read agentd.yaml (or defaults when None). Raises trainer.errors.ConfigError."""
    from trainer.errors import ConfigError, Problem
    from trainer.yaml_schema import read_yaml_mapping, resolve_relative, validate_model

    if path is None:
        return Settings()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem("<file>", f"cannot read settings: {e.strerror}",
                                   "check the --config path", str(path))], str(path))
    raw, lines = read_yaml_mapping(text, str(path), empty_fix="see configs/agentd.yaml for an example")
    # A section left with only comments (`jenkins:`) reads as null: it means "the defaults".
    raw = {k: v for k, v in raw.items() if not (v is None and k in ("metrics", "jenkins", "release"))}
    base = path.resolve().parent
    raw = resolve_relative(raw, PATH_FIELDS, base)
    if isinstance(raw.get("jenkins"), dict):
        jenkins = resolve_relative(raw["jenkins"], JENKINS_PATH_FIELDS, base)
        if isinstance(jenkins.get("watch"), dict):
            jenkins["watch"] = resolve_relative(jenkins["watch"], ("dir",), base)
        raw["jenkins"] = jenkins
    if isinstance(raw.get("release"), dict) and isinstance(raw["release"].get("targets"), dict):
        raw["release"] = {**raw["release"], "targets": {
            name: resolve_relative(t, RELEASE_TARGET_PATH_FIELDS, base) if isinstance(t, dict) else t
            for name, t in raw["release"]["targets"].items()}}
    return validate_model(Settings, raw, lines, str(path))
