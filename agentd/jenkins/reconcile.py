"""Node reconcile: make this box's node in Jenkins match what agentd wants, one request at a time.

* :func:`desired_spec`: the :class:`~agentd.jenkins.node_config.NodeSpec` for the settings, the GPUs and
  the slot count (labels and description from :mod:`~agentd.jenkins.labels`, usage mode EXCLUSIVE,
  executors = slots);
* :func:`ensure_node`: the node exists (created again when a controller restart or an admin removed it)
  and its ``config.xml`` holds the spec; the config is read every time and posted back only when an
  owned field differs (:func:`~agentd.jenkins.node_config.plan_reconfig` keeps the rest byte for byte);
* :func:`apply_offline_state`: ``toggleOffline`` / ``changeOfflineCause`` posted only when the node's
  *temporary* offline state must change (:func:`~agentd.jenkins.offline.offline_action` decides, with
  agentd's own :class:`~agentd.jenkins.offline.OfflineMarkStore`).

The controller's version is read from the ``X-Jenkins`` header of the node's api/json response, never
from an extra ``GET /``. All requests go through the link's
:class:`~agentd.jenkins.session.JenkinsSession`; failures raise its token-free ``LinkError``.
"""

from __future__ import annotations

import socket
from typing import Mapping, Optional, Sequence
from urllib.parse import quote, urljoin

import jenkins
import requests

from agentd import __version__
from agentd.jenkins.labels import GpuFactsLike, derive_labels, node_description
from agentd.jenkins.node_config import (JNLP_LAUNCHER, SSH_LAUNCHER, ConfigError, NodeSpec, plan_reconfig,
                                        xml_encoding)
from agentd.jenkins.offline import OfflineMarkStore, offline_action
from agentd.jenkins.session import JenkinsSession, LinkError, log, quote_node
from agentd.jenkins.settings import JenkinsSettings


def desired_spec(settings: JenkinsSettings, gpus: Sequence[GpuFactsLike], slots: int,
                 version: str = __version__, ssh_host: Optional[str] = None) -> NodeSpec:
    """The :class:`NodeSpec` for these settings, GPUs and slot count (executors are at least 1)."""
    executors = max(1, int(slots))
    if settings.launcher == "ssh":
        assert settings.ssh is not None  # the settings validator guarantees it
        fields = [("host", settings.ssh.host or ssh_host or socket.getfqdn()),
                  ("port", str(settings.ssh.port)),
                  ("credentialsId", settings.ssh.credentials_id)]
        if settings.ssh.java_path:
            fields.append(("javaPath", settings.ssh.java_path))
        launcher_class, launcher_fields = SSH_LAUNCHER, tuple(fields)
    else:
        launcher_class = JNLP_LAUNCHER
        launcher_fields = (("webSocket", "true" if settings.websocket else "false"),)
    return NodeSpec(
        name=settings.node_name,
        description=node_description(gpus, version, executors),
        executors=executors,
        labels=tuple(derive_labels(gpus, settings.labels)),
        remote_fs=settings.remote_fs,
        launcher_class=launcher_class,
        launcher_fields=launcher_fields,
        manage_launcher=settings.launcher != "none",
    )


def read_node(session: JenkinsSession, name: str,
              known_version: Optional[str]) -> tuple[Optional[dict], Optional[str]]:
    """(the node's api/json or None when Jenkins answers 404, the X-Jenkins version of the response).

    Other errors raise, unlike python-jenkins' node_exists. The version is read from this response,
    so a sync costs no extra ``GET /``; without the header it is None, and on a 404 it is
    ``known_version`` (a 404's headers are not read).
    """
    path = jenkins.NODE_INFO % {"name": quote_node(name), "depth": 0}

    def get(client: jenkins.Jenkins) -> tuple[Optional[dict], Optional[str]]:
        try:
            response = client.jenkins_request(requests.Request("GET", urljoin(client.server, path)))
        except jenkins.NotFoundException:
            return None, known_version
        return response.json(), response.headers.get("X-Jenkins")

    return session.call("read node", get)


def ensure_node(session: JenkinsSession, spec: NodeSpec,
                known_version: Optional[str]) -> tuple[Optional[dict], Optional[str], bool]:
    """Create the node, or reconfigure it where it differs from ``spec``.

    Returns (its api/json, the controller version, whether it was created now).
    """
    info, version = read_node(session, spec.name, known_version)
    created = info is None
    if created:
        log.info("creating Jenkins node %s (labels %s, %d executors, exclusive)",
                 spec.name, " ".join(spec.labels), spec.executors)
        session.call("create node", lambda c: c.create_node(
            spec.name, numExecutors=spec.executors, nodeDescription=spec.description,
            remoteFS=spec.remote_fs, labels=" ".join(spec.labels), exclusive=True,
            launcher=spec.launcher_class, launcher_params=spec.create_params()))
        info, version = read_node(session, spec.name, version)
    else:
        config_path = f"computer/{quote_node(spec.name)}/config.xml"
        config = session.call("read node config", lambda c: c.jenkins_request(requests.Request(
            "GET", urljoin(c.server, config_path))).content)
        try:
            changed, new_config = plan_reconfig(config, spec)
        except ConfigError as e:
            raise LinkError(f"node {spec.name}'s {e}") from None
        if changed:
            log.info("reconfiguring Jenkins node %s: %s changed", spec.name, ", ".join(changed))
            # POSTed as the bytes plan_reconfig made, with the charset they are in.
            headers = {"Content-Type": f"application/xml; charset={xml_encoding(new_config)}"}
            session.call("reconfigure node", lambda c: c.jenkins_open(requests.Request(
                "POST", urljoin(c.server, config_path), data=new_config, headers=headers)))
    return info, version, created


def apply_offline_state(session: JenkinsSession, name: str, info: Optional[Mapping], wanted: Optional[str],
                        mark: OfflineMarkStore) -> dict:
    """Post toggleOffline / changeOfflineCause when the node's temporary-offline state must change.

    ``wanted`` is the cause text agentd wants (None: online). Returns the node's api/json afterwards.
    """
    if info is None:
        raise LinkError(f"node {name} does not exist in Jenkins (yet)")
    action, new_mark = offline_action(info, wanted, mark.reason)
    if action is None:
        if wanted is None and info.get("temporarilyOffline"):
            log.debug("node %s is held offline by someone else: %s", name, info.get("offlineCauseReason"))
        mark.set(new_mark)
        return dict(info)
    msg = quote((wanted or "").encode("utf-8"))
    if action == "toggle":
        path = jenkins.TOGGLE_OFFLINE % {"name": quote_node(name), "msg": msg}
        what = "mark node offline" if wanted is not None else "mark node online"
    else:
        path = f"computer/{quote_node(name)}/changeOfflineCause?offlineMessage={msg}"
        what = "mark node offline"
    log.info("Jenkins node %s: %s%s", name, what, f" ({wanted})" if wanted else "")
    # The mark is written before the POST: if the daemon dies in between, it still knows the node may
    # be offline by its hand (a stale mark only matters while the node is offline with our cause).
    if new_mark is not None:
        mark.set(new_mark)
    session.call(what, lambda c: c.jenkins_open(requests.Request("POST", urljoin(c.server, path))))
    mark.set(new_mark)
    return read_node(session, name, None)[0] or dict(info)
