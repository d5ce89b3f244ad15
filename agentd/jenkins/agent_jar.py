"""agent.jar for ``launcher: inbound``: the jar from the controller, its secret, and keeping it running.

:class:`InboundAgent` downloads ``jnlpJars/agent.jar`` into ``agent_jar_dir`` (cached with a stamp of the
controller version it came from, fetched again when that version changes, verified as a jar before it
replaces the cached one), reads the agent secret from the node's JNLP file (the first ``<argument>`` of
``<application-desc>``) only when agent.jar starts or has exited (it may have failed to connect with a
stale secret) or the node was just created, and starts or restarts the
:class:`~agentd.jenkins.agent_process.AgentProcess` that supervises the ``java -jar agent.jar`` process.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Optional
from urllib.parse import urljoin

import jenkins
import requests

from agentd.jenkins.agent_process import AgentProcess
from agentd.jenkins.session import JenkinsSession, LinkError, log, quote_node
from agentd.jenkins.settings import JenkinsSettings, Secret

_MAX_JAR_BYTES = 128 * 1024 * 1024


def parse_jnlp_secret(jnlp_xml: str) -> str:
    """The agent secret: the first ``<argument>`` of ``<application-desc>`` in the node's JNLP file."""
    try:
        root = ET.fromstring(jnlp_xml)
    except ET.ParseError as e:
        raise LinkError(f"the node's JNLP file is not XML ({e})") from None
    argument = root.find("./application-desc/argument")
    secret = (argument.text or "").strip() if argument is not None else ""
    if not re.fullmatch(r"[0-9A-Za-z+/=_-]{8,}", secret):
        raise LinkError("the node's JNLP file holds no agent secret (is the node an inbound agent?)")
    return secret


def is_jar(path: Path) -> bool:
    """True for a readable zip with a manifest whose entries pass their CRC check (catches truncation)."""
    try:
        with zipfile.ZipFile(path) as jar:
            return "META-INF/MANIFEST.MF" in jar.namelist() and jar.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


class InboundAgent:
    """agent.jar for this node, kept running by :meth:`keep_running`; see the module docstring."""

    def __init__(self, settings: JenkinsSettings, session: JenkinsSession):
        self._settings = settings
        self._session = session
        self._process: Optional[AgentProcess] = None
        self._exits_seen = 0                   # agent.jar exits already answered with a fresh secret
        self.jar_version: Optional[str] = None  # the controller version the downloaded agent.jar came from

    def keep_running(self, version: Optional[str], fresh_node: bool = False) -> Optional[str]:
        """Keep agent.jar running. Returns a problem for status when agent.jar cannot run (usage exit).

        ``version`` is the controller's (None: unknown); ``fresh_node`` says the node was just created.
        """
        settings = self._settings
        jar, jar_changed = self._ensure_jar(Path(settings.agent_jar_dir), version)
        agent = self._process
        if agent is None:
            agent = self._process = AgentProcess.from_settings(settings, jar)
        status = agent.status()
        gave_up = status.get("gave_up_reason")
        if gave_up and not jar_changed:
            return gave_up                      # not restarted until a different agent.jar arrives
        exits = int(status.get("restarts") or 0)
        need_secret = not agent.running or jar_changed or fresh_node or exits != self._exits_seen
        if not need_secret:
            return None
        self._exits_seen = exits
        secret_changed = agent.set_secret(self._fetch_secret())
        if not agent.running:
            agent.start()
        elif jar_changed or secret_changed:
            log.info("restarting agent.jar (%s changed)", "agent.jar" if jar_changed else "agent secret")
            agent.restart()
        return None

    def status(self) -> Optional[dict]:
        """The agent process' status (None before agent.jar was first provisioned)."""
        process = self._process
        return process.status() if process is not None else None

    def stop(self) -> None:
        process = self._process
        if process is not None:
            process.stop()

    def _fetch_secret(self) -> Secret:
        name = quote_node(self._settings.node_name)

        def get(client: jenkins.Jenkins) -> str:
            try:
                return client.jenkins_open(requests.Request(
                    "GET", urljoin(client.server, f"computer/{name}/jenkins-agent.jnlp")))
            except jenkins.NotFoundException:  # Jenkins before 2.2xx named it slave-agent.jnlp
                return client.jenkins_open(requests.Request(
                    "GET", urljoin(client.server, f"computer/{name}/slave-agent.jnlp")))

        return Secret(parse_jnlp_secret(self._session.call("read agent secret", get)))

    def _ensure_jar(self, dest_dir: Path, version: Optional[str]) -> tuple[Path, bool]:
        """(path, downloaded now). The stamp file records which controller version the jar came from
        ("unknown" when the controller does not say: then the cached jar is kept)."""
        version = version or "unknown"
        jar = dest_dir / "agent.jar"
        stamp = dest_dir / "agent.jar.version"
        try:
            cached_version = stamp.read_text().strip()
        except OSError:
            cached_version = None
        if cached_version == version and is_jar(jar):
            return jar, False
        dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = dest_dir / f".agent.jar.{os.getpid()}.part"

        def download(client: jenkins.Jenkins) -> tuple[str, int, Optional[str]]:
            url = urljoin(client.server, "jnlpJars/agent.jar")
            response = client.jenkins_request(requests.Request("GET", url), stream=True)
            size = 0
            try:
                with open(tmp, "wb") as out:
                    for chunk in response.iter_content(1 << 16):
                        size += len(chunk)
                        if size > _MAX_JAR_BYTES:
                            raise LinkError(f"{url} is larger than {_MAX_JAR_BYTES >> 20} MiB; not a jar")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                response.close()
            return response.headers.get("Content-Type", "?"), size, response.headers.get("X-Jenkins")

        try:
            content_type, size, header_version = self._session.call("download agent.jar", download)
            if not is_jar(tmp):
                url = urljoin(self._settings.url or "", "jnlpJars/agent.jar")
                raise LinkError(f"{url} did not return a jar (Content-Type {content_type}, {size} bytes); "
                                "is jenkins.url the Jenkins root URL?")
            os.chmod(tmp, 0o644)
            os.replace(tmp, jar)
        finally:
            tmp.unlink(missing_ok=True)
        stamp.write_text((header_version or version) + "\n")
        self.jar_version = header_version or version
        log.info("downloaded agent.jar (%d bytes) from Jenkins %s", size, header_version or version)
        return jar, True
