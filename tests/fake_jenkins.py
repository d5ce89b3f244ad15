"""A fake Jenkins controller over real HTTP, for testing agentd's Jenkins link with python-jenkins 1.8.3.

No Jenkins can be installed on the development machines, so this serves, on 127.0.0.1 and a free port,
the endpoints python-jenkins and agentd call, answering the way Jenkins does. It lives in tests/ only.

Sources for each behaviour (python-jenkins 1.8.3 is ``jenkins/__init__.py`` in the installed package and
openstack/python-jenkins; Jenkins is jenkinsci/jenkins, ``core/src/main/java/...``):

* **Headers**: every response carries ``X-Jenkins: <version>`` (python-jenkins ``get_version`` reads it from
  ``GET /``) and ``X-Jenkins-Session`` (changes on restart).
* **Authentication** (Jenkins ``BasicHeaderProcessor`` + ``BasicHeaderApiTokenAuthenticator``): HTTP basic
  with user + API token; a wrong token -> ``401`` with ``WWW-Authenticate: Basic realm="Jenkins"``; no
  credentials on a secured controller -> ``403``; a user missing a permission -> ``403`` "USER is missing the
  X/Y permission" (``AccessDeniedException3``). python-jenkins' ``jenkins_request`` turns 401/403/500 into
  ``JenkinsException("... Possibly authentication failed [CODE]: REASON")`` and 404 into
  ``NotFoundException``.
* **CSRF crumbs** (``hudson.security.csrf.DefaultCrumbIssuer``, ``CrumbFilter``; Jenkins 2.176+ binds
  crumbs to the web session): ``GET crumbIssuer/api/json`` -> ``{"_class": "hudson.security.csrf.
  DefaultCrumbIssuer", "crumb": ..., "crumbRequestField": "Jenkins-Crumb"}`` plus a ``JSESSIONID.*`` cookie;
  a POST without the session's crumb -> ``403`` "No valid crumb was included in the request". python-jenkins
  (``maybe_add_crumb``) fetches the crumb once per client and sends it on every request. Real Jenkins 2.96+
  exempts API-token requests from the crumb check; the fake is stricter (``require_crumb``) so the client's
  crumb handling, and a crumb gone stale after a controller restart, are exercised.
* **whoami**: ``GET me/api/json?depth=0`` -> ``hudson.model.User`` (id, fullName, absoluteUrl).
* **Nodes** (``hudson.model.ComputerSet``, ``hudson.model.Computer``, ``hudson.slaves.SlaveComputer``):
  ``computer/api/json``; ``computer/NAME/api/json`` with ``offline`` (= temporarilyOffline or no channel),
  ``temporarilyOffline``, ``offlineCauseReason`` (the message, without "Disconnected by USER : "),
  ``numExecutors``, ``assignedLabels`` (the node's own name is a label too);
  ``POST computer/doCreateItem`` with the form python-jenkins' ``create_node`` sends (``name``, ``type=
  hudson.slaves.DumbSlave$DescriptorImpl``, ``json`` = nodeDescription, numExecutors, remoteFS, labelString,
  mode, retentionStrategy, launcher{stapler-class}) -> ``302`` to ``computer/`` (``rsp.sendRedirect2(".")``),
  ``400`` when the name exists (``checkName`` Failure); ``computer/NAME/config.xml`` GET (XStream ``<slave>``)
  and POST (``updateByXml``; ``400`` "Node types do not match" on another root element), empty 200;
  ``POST computer/NAME/doDelete`` -> 302 ``..``; ``POST computer/NAME/toggleOffline?offlineMessage=M`` and
  ``changeOfflineCause`` (``@RequirePOST``, ``HttpResponses.redirectToDot()``): requests follows the 302
  as a GET.
* **Inbound agents**: ``computer/NAME/jenkins-agent.jnlp`` (``SlaveComputer/jenkins-agent.jnlp.jelly``; older
  ``slave-agent.jnlp``): ``<jnlp><application-desc>`` with arguments secret (``jnlpMac``), node name,
  ``-webSocket`` when set, ``-workDir DIR -internalDir remoting``, ``-url ROOT``; needs Agent/Connect.
  ``/jnlpJars/agent.jar`` (an ``UnprotectedRootAction``): a real zip with a manifest, different per version.
* **Builds**: ``POST job/NAME/buildWithParameters?K=V`` (python-jenkins ``build_job`` puts the parameters in
  the query) -> ``201`` with ``Location: ROOT/queue/item/N/`` (python-jenkins parses N from it);
  ``queue/item/N/api/json`` -> ``hudson.model.Queue$WaitingItem`` with a ``ParametersAction``. Jenkins remote
  access API: https://www.jenkins.io/doc/book/using/remote-access-api/.

**Version-faithful behaviour.** ``FakeJenkins(version=...)`` behaves as that Jenkins version does (Jenkins
sources are jenkinsci/jenkins ``core/src/main/java/``, remoting is jenkinsci/remoting ``src/main/java/``):

* **Offline causes** (``hudson/model/Computer.java``, ``hudson/model/Node.java``, ``hudson/slaves/
  SlaveComputer.java``, ``hudson/slaves/OfflineCause.java``): before 2.482 a computer has *one*
  ``offlineCause`` field: ``setChannel`` on a reconnect sets it to null and a lost channel to a
  ``ChannelTermination`` ("Connection was broken: ..."), while ``temporarilyOffline`` stays true. From 2.482
  the temporary-offline cause is its own field (``Node.temporaryOfflineCause``, saved with the node) and
  survives reconnects. ``getOfflineCauseReason`` strips "Disconnected by USER : " from a ``UserCause``.
* **Escaping** from 2.483: ``offlineCauseReason`` comes back through ``hudson/Util.java`` ``escape``
  (``< > & " '`` as entities, all but the last of a run of spaces as ``&nbsp;``, newline as ``<br>``).
* **JNLP file warning** from 2.437: each fetch of ``computer/NAME/jenkins-agent.jnlp``
  (``hudson/slaves/SlaveComputer.java`` -> ``jenkins/slaves/EncryptedSlaveAgentJnlpFile.java``) logs a
  WARNING on the controller; the fake records it in :attr:`FakeJenkins.warnings`.
* **Builds** (``jenkins/model/ParameterizedJobMixIn.java`` ``doBuildWithParameters``,
  ``hudson/model/ParametersDefinitionProperty.java`` ``buildWithParameters``): a disabled job answers
  ``409`` "NAME is not buildable!"; a job without parameters throws "This build is not parameterized!"
  (an error page: the fake answers 400); a parameter the job does not define is dropped silently (the
  build gets the default); an identical item already in the queue answers ``303 See Other`` to the job's
  page instead of ``201`` (JENKINS-66105, ``core/src/test/java/hudson/model/
  ParametersDefinitionPropertyTest.java`` ``statusCodes``: "then 303 See Other -> 200 OK").
* **config.xml** (``hudson/model/Computer.java`` ``doConfigDotXml``) is served as ``application/xml``
  without a charset: the XML declaration names the encoding. GET needs Agent/ExtendedRead, which
  Agent/Configure implies (``hudson/model/Computer.java`` ``EXTENDED_READ``).
* **agent.jar** (``/jnlpJars/agent.jar``) carries the remoting version the war bundles
  (:data:`BUNDLED_REMOTING`) in its manifest (``Version:``, ``Main-Class: hudson.remoting.Launcher``), so
  ``tests/fake_java.py`` can accept exactly that remoting's flags: ``hudson/remoting/Launcher.java`` has
  ``-url``/``-name``/``-webSocket`` from remoting 3176 (Jenkins 2.437, LTS 2.440.1); an older ``Launcher.main``
  prints the args4j error, ``java -jar agent.jar [options...]`` and the usage, and returns (exit 0).
* ``strip_version_header`` plays a reverse proxy that drops ``X-Jenkins``.

Test controls: :meth:`FakeJenkins.restart` (sessions and crumbs forgotten, agents disconnected, nodes wiped
by default), :meth:`fail_next` (next N requests answer 500), :meth:`stop`/:meth:`start` (stop listening),
:meth:`set_version`, :meth:`set_delay` (slow answers for timeouts), and :attr:`requests`, every request
recorded (method, path, query, headers without Authorization, user, status).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
import secrets
import ssl
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

DUMB_SLAVE_TYPE = "hudson.slaves.DumbSlave$DescriptorImpl"
JNLP_LAUNCHER = "hudson.slaves.JNLPLauncher"
SSH_LAUNCHER = "hudson.plugins.sshslaves.SSHLauncher"

# The remoting version each Jenkins line bundles (its war's remoting.version). Only which side of 3176 a
# version is on matters to the fake agent.jar; the suffixes are the releases' own build ids.
BUNDLED_REMOTING = [((2, 0), "3107.v665000b_51092"), ((2, 426), "3160.vd76b_9ddd10cc"),
                    ((2, 437), "3198.v03a_401881f3e"), ((2, 440, 1), "3206.vb_15dcf73f6a_9"),
                    ((2, 462), "3248.3250.v3277a_8e88c9b_"), ((2, 479), "3261.v9c670a_4748a_9"),
                    ((2, 492), "3283.v92c105e0f819"), ((2, 516), "3309.v27b_9314fd1a_4")]
TOKEN = "11c0ffee5ecret70ken"    # the API token of the controller's user "agentd"
CURRENT_LTS = "2.516.3"          # the newest LTS whose behaviour is cited above
USER_CAUSE = "hudson.slaves.OfflineCause$UserCause"
CHANNEL_TERMINATION = "hudson.slaves.OfflineCause$ChannelTermination"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def bundled_remoting(version: str) -> str:
    """The remoting version Jenkins ``version`` bundles."""
    found = BUNDLED_REMOTING[0][1]
    for first, remoting in BUNDLED_REMOTING:
        if version_tuple(version) >= first:
            found = remoting
    return found


def jenkins_escape(text: str) -> str:
    """``hudson.Util.escape``, character for character."""
    out = []
    for i, ch in enumerate(text):
        if ch == "\n":
            out.append("<br>")
        elif ch in "<>&\"'":
            out.append({"<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&#039;"}[ch])
        elif ch == " ":
            out.append("&nbsp;" if i + 1 < len(text) and text[i + 1] == " " else " ")
        else:
            out.append(ch)
    return "".join(out)


@dataclass
class Cause:
    """An ``OfflineCause``: a person's (``UserCause``, with their message) or a lost connection."""

    cls: str
    text: str
    user: Optional[str] = None

    def description(self) -> str:
        if self.cls == USER_CAUSE:
            return f"Disconnected by {self.user}" + (f" : {self.text}" if self.text else "")
        return self.text

    def reason(self) -> str:
        """``Computer.getOfflineCauseReason``: the description without "Disconnected by USER : "."""
        return self.text if self.cls == USER_CAUSE else self.description()


ALL_PERMISSIONS = frozenset({"read", "create", "configure", "extended_read", "connect", "disconnect",
                             "delete", "build"})
_PERMISSION_NAMES = {"read": "Overall/Read", "create": "Agent/Create", "configure": "Agent/Configure",
                     "extended_read": "Agent/ExtendedRead", "connect": "Agent/Connect",
                     "disconnect": "Agent/Disconnect", "delete": "Agent/Delete", "build": "Job/Build"}


@dataclass
class User:
    name: str
    token: str
    permissions: frozenset = ALL_PERMISSIONS


@dataclass
class Node:
    """A node and its computer. Causes are kept both ways (one shared field before 2.482, a separate
    temporary-offline cause from 2.482); :meth:`api_json` shows the one the controller's version shows."""

    name: str
    description: str = ""
    num_executors: int = 1
    remote_fs: str = ""
    labels: str = ""
    mode: str = "NORMAL"
    launcher: ET.Element = field(default_factory=lambda: ET.Element("launcher", {"class": JNLP_LAUNCHER}))
    temporarily_offline: bool = False
    connected: bool = False
    shared_cause: Optional[Cause] = None       # Computer.offlineCause before 2.482
    temporary_cause: Optional[Cause] = None    # Node.temporaryOfflineCause from 2.482
    channel_cause: Optional[Cause] = None      # why the channel is gone, from 2.482
    properties: Optional[ET.Element] = None    # <nodeProperties>, kept as posted

    @property
    def launcher_class(self) -> str:
        return self.launcher.get("class", "")

    @property
    def offline_reason(self) -> str:
        """The message of the temporary-offline cause a person (or agentd) set, "" when none."""
        cause = self.temporary_cause
        return cause.text if cause is not None and self.temporarily_offline else ""

    @offline_reason.setter
    def offline_reason(self, message: str) -> None:   # an administrator's own mark (tests)
        self.set_offline_by("admin", message)

    def set_offline_by(self, user: str, message: str) -> None:
        """toggleOffline / changeOfflineCause by ``user`` (``setTemporarilyOffline(true, UserCause)``)."""
        cause = Cause(USER_CAUSE, message, user)
        self.temporarily_offline, self.shared_cause, self.temporary_cause = True, cause, cause

    def set_online(self) -> None:
        """``setTemporarilyOffline(false, null)``."""
        self.temporarily_offline, self.shared_cause, self.temporary_cause = False, None, None

    def channel(self, connected: bool) -> None:
        """The agent connected (a reconnect clears the shared cause) or its connection broke."""
        self.connected = connected
        cause = None if connected else Cause(CHANNEL_TERMINATION, "Connection was broken: java.io.EOFException")
        self.shared_cause = cause
        self.channel_cause = cause

    def config_xml(self) -> str:
        root = ET.Element("slave")
        for tag, text in (("name", self.name), ("description", self.description),
                          ("remoteFS", self.remote_fs), ("numExecutors", str(self.num_executors)),
                          ("mode", self.mode)):
            ET.SubElement(root, tag).text = text
        ET.SubElement(root, "retentionStrategy", {"class": "hudson.slaves.RetentionStrategy$Always"})
        root.append(self.launcher)
        ET.SubElement(root, "label").text = self.labels
        root.append(self.properties if self.properties is not None else ET.Element("nodeProperties"))
        ET.indent(root)
        return "<?xml version='1.1' encoding='UTF-8'?>\n" + ET.tostring(root, encoding="unicode")

    def api_json(self, version: str) -> dict:
        offline = self.temporarily_offline or not self.connected
        if version_tuple(version) < (2, 482):
            cause = self.shared_cause
        elif self.temporarily_offline and self.temporary_cause is not None:
            cause = self.temporary_cause
        else:
            cause = self.channel_cause if not self.connected else None
        reason = cause.reason() if cause is not None else ""
        if version_tuple(version) >= (2, 483):
            reason = jenkins_escape(reason)
        labels = [{"name": label} for label in sorted(set(self.labels.split()) | {self.name})]
        return {
            "_class": "hudson.slaves.SlaveComputer", "actions": [], "assignedLabels": labels,
            "description": self.description, "displayName": self.name,
            "executors": [{} for _ in range(self.num_executors)], "icon": "symbol-computer",
            "idle": True, "jnlpAgent": self.launcher_class == JNLP_LAUNCHER,
            "launchSupported": self.launcher_class != JNLP_LAUNCHER, "manualLaunchAllowed": True,
            "monitorData": {}, "numExecutors": self.num_executors, "offline": offline,
            "offlineCause": ({"_class": cause.cls, "description": cause.description()}
                             if cause is not None else None),
            "offlineCauseReason": reason,
            "oneOffExecutors": [], "temporarilyOffline": self.temporarily_offline,
            "absoluteRemotePath": self.remote_fs if self.connected else None,
        }


@dataclass
class Job:
    parameters: list[str]
    disabled: bool = False


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    user: Optional[str] = None
    status: Optional[int] = None
    body: bytes = b""


class _Reply(Exception):
    """Raised by route handlers to answer with an error status."""

    def __init__(self, status: int, text: str = "", headers: Optional[dict] = None):
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or {}


def _launcher_from_json(data: dict) -> ET.Element:
    """The launcher element Jenkins would bind from create_node's ``launcher`` JSON."""
    launcher_class = data.get("stapler-class") or data.get("$class") or JNLP_LAUNCHER
    element = ET.Element("launcher", {"class": launcher_class})
    if launcher_class == JNLP_LAUNCHER:
        wds = data.get("workDirSettings") or {}
        work = ET.SubElement(element, "workDirSettings")
        ET.SubElement(work, "disabled").text = str(bool(wds.get("disabled", False))).lower()
        ET.SubElement(work, "internalDir").text = wds.get("internalDir", "remoting")
        fail_if_missing = bool(wds.get("failIfWorkDirIsMissing"))
        ET.SubElement(work, "failIfWorkDirIsMissing").text = str(fail_if_missing).lower()
        ET.SubElement(element, "webSocket").text = str(bool(data.get("webSocket", False))).lower()
    else:
        for key in ("host", "port", "credentialsId", "javaPath"):
            if key in data:
                ET.SubElement(element, key).text = str(data[key])
    return element


class FakeJenkins:
    """The controller. Use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, version: str = CURRENT_LTS, require_crumb: bool = True, crumbs_enabled: bool = True,
                 tls: Optional[tuple[str, str]] = None, strip_version_header: bool = False):
        self.version = version
        self.strip_version_header = strip_version_header
        self.warnings: list[str] = []   # what the controller would log at WARNING
        self.require_crumb = require_crumb
        self.crumbs_enabled = crumbs_enabled
        self.users: dict[str, User] = {"agentd": User("agentd", TOKEN)}
        self.nodes: dict[str, Node] = {}
        self.jobs: dict[str, Job] = {}
        self.queue: dict[int, dict] = {}
        self.builds: list[dict] = []
        self.requests: list[Recorded] = []
        self.serve_bad_jar = False
        self.tls = tls  # (certfile, keyfile): serve HTTPS
        self._lock = threading.RLock()
        self._sessions: dict[str, str] = {}
        self._instance = secrets.token_hex(8)
        self._secret_key = secrets.token_bytes(32)
        self._next_queue_id = 1
        self._fail: list[int] = []
        self._delay = 0.0
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/"

    def start(self) -> "FakeJenkins":
        """Listen (again, on the same port after a stop)."""
        fake = self

        class Handler(_Handler):
            controller = fake

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "FakeJenkins":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------------

    def restart(self, wipe_nodes: bool = True) -> None:
        """A controller restart: sessions (so crumbs) forgotten, agents disconnected, queue emptied.
        ``wipe_nodes`` also loses the nodes (a controller restored without them)."""
        self.stop()
        with self._lock:
            self._sessions.clear()
            self._instance = secrets.token_hex(8)
            self.queue.clear()
            for node in self.nodes.values():
                node.channel(False)
            if wipe_nodes:
                self.nodes.clear()
        self.start()

    def fail_next(self, count: int, status: int = 500) -> None:
        """The next ``count`` requests (whatever they are) answer ``status``."""
        with self._lock:
            self._fail.extend([status] * count)

    def set_delay(self, seconds: float) -> None:
        """Answer every request only after ``seconds`` (client timeouts)."""
        self._delay = seconds

    def set_version(self, version: str) -> None:
        self.version = version

    def add_user(self, name: str, token: str, permissions=ALL_PERMISSIONS) -> None:
        self.users[name] = User(name, token, frozenset(permissions))

    def add_job(self, name: str, parameters=("CONFIG_FILE",), disabled: bool = False) -> None:
        self.jobs[name] = Job(list(parameters), disabled)

    def connect_agent(self, name: str, connected: bool = True) -> None:
        """Pretend agent.jar connected (or its connection broke): ``offline`` and, before 2.482, the
        cause follow (see the module docstring)."""
        with self._lock:
            self.nodes[name].channel(connected)

    def leave_queue(self) -> None:
        """Every queued item starts building (so an identical trigger queues again)."""
        with self._lock:
            self.queue.clear()

    @property
    def remoting_version(self) -> str:
        return bundled_remoting(self.version)

    def agent_secret(self, name: str) -> str:
        """The node's secret, as Jenkins derives it (an HMAC of the name with the controller's key)."""
        return hmac.new(self._secret_key, name.encode(), hashlib.sha256).hexdigest()

    def agent_jar(self, version: Optional[str] = None) -> bytes:
        """A small real jar: a manifest and one entry whose bytes depend on the version (and only on it: the
        entries carry a fixed timestamp, so a jar served earlier equals one built later for the same version)."""
        def entry(name: str) -> zipfile.ZipInfo:
            return zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))

        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as jar:
            version = version or self.version
            jar.writestr(entry("META-INF/MANIFEST.MF"), "Manifest-Version: 1.0\n"
                         f"Main-Class: hudson.remoting.Launcher\nVersion: {bundled_remoting(version)}\n")
            jar.writestr(entry("hudson/remoting/Launcher.class"), b"\xca\xfe\xba\xbe" + version.encode())
        return buffer.getvalue()

    def count(self, method: str, path_regex: str) -> int:
        """How many recorded requests match ``method`` and the path regex (full match)."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and re.fullmatch(path_regex, r.path))

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- request handling (called by the handler's thread) -------------------------------------------

    def _authenticate(self, header: Optional[str]) -> Optional[User]:
        if not header:
            return None
        try:
            scheme, value = header.split(" ", 1)
            name, token = base64.b64decode(value).decode("utf-8").split(":", 1)
        except ValueError:
            raise _Reply(401, "Invalid Authorization header", {"WWW-Authenticate": 'Basic realm="Jenkins"'})
        user = self.users.get(name)
        if scheme != "Basic" or user is None or not hmac.compare_digest(user.token, token):
            raise _Reply(401, f"Invalid password/token for user: {name}",
                         {"WWW-Authenticate": 'Basic realm="Jenkins"'})
        return user

    @staticmethod
    def _require(user: Optional[User], permission: str) -> None:
        if user is None:
            raise _Reply(403, "Authentication required")
        if permission not in user.permissions:
            raise _Reply(403, f"{user.name} is missing the {_PERMISSION_NAMES[permission]} permission")

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise _Reply(404, f"No such agent: {name}")
        return node

    def dispatch(self, method: str, path: str, query: dict, form: dict, body: bytes, headers,
                 user: Optional[User], session: Optional[str]) -> tuple[int, dict, bytes]:
        """Route one request; returns (status, headers, body)."""
        def one(key: str, default: str = "") -> str:
            values = form.get(key) or query.get(key)
            return values[0] if values else default

        if path == "/jnlpJars/agent.jar":
            if self.serve_bad_jar:
                return 200, {"Content-Type": "text/html;charset=utf-8"}, b"<html>Please sign in</html>"
            return 200, {"Content-Type": "application/java-archive"}, self.agent_jar()

        self._require(user, "read")
        assert user is not None

        if method == "POST" and self.require_crumb and self.crumbs_enabled:
            expected = self._sessions.get(session or "")
            if not expected or headers.get("Jenkins-Crumb") != expected:
                raise _Reply(403, "No valid crumb was included in the request")

        if method == "GET" and path == "/":
            return self._html("Dashboard [Jenkins]")
        if method == "GET" and path == "/api/json":
            return self._json({"_class": "hudson.model.Hudson", "mode": "NORMAL", "nodeName": "",
                               "nodeDescription": "the Jenkins controller's built-in node", "numExecutors": 0,
                               "useCrumbs": self.crumbs_enabled, "useSecurity": True,
                               "jobs": [{"_class": "org.jenkinsci.plugins.workflow.job.WorkflowJob",
                                         "name": n, "url": f"{self.url}job/{quote(n)}/", "color": "blue"}
                                        for n in self.jobs]})
        if method == "GET" and path == "/crumbIssuer/api/json":
            if not self.crumbs_enabled:
                raise _Reply(404, "Not Found")
            new_session = session if session in self._sessions else secrets.token_hex(12)
            crumb = self._sessions.setdefault(new_session, secrets.token_hex(32))
            return self._json({"_class": "hudson.security.csrf.DefaultCrumbIssuer", "crumb": crumb,
                               "crumbRequestField": "Jenkins-Crumb"},
                              {"Set-Cookie": f"JSESSIONID.{self._instance}={new_session}; Path=/; HttpOnly"})
        if method == "GET" and path == "/me/api/json":
            return self._json({"_class": "hudson.model.User", "absoluteUrl": f"{self.url}user/{user.name}",
                               "description": None, "fullName": user.name, "id": user.name, "property": []})
        if method == "GET" and path in ("/computer", "/computer/"):
            return self._html("Nodes")
        if method == "GET" and path == "/computer/api/json":
            computers = [{"_class": "hudson.model.Hudson$MasterComputer", "displayName": "Built-In Node",
                          "description": "the Jenkins controller's built-in node",
                          "assignedLabels": [{"name": "built-in"}],
                          "idle": True, "offline": False, "offlineCause": None, "temporarilyOffline": False,
                          "icon": "symbol-computer", "numExecutors": 0}]
            computers += [node.api_json(self.version) for node in self.nodes.values()]
            return self._json({"_class": "hudson.model.ComputerSet", "busyExecutors": 0,
                               "computer": computers, "displayName": "Nodes",
                               "totalExecutors": sum(n.num_executors for n in self.nodes.values())})
        if path == "/computer/doCreateItem":
            if method != "POST":
                raise _Reply(405, "This URL requires POST")
            self._require(user, "create")
            return self._create_node(one("name").strip(), one("type"), one("json", "{}"))

        match = re.fullmatch(r"/computer/([^/]+)(/.*)?", path)
        if match:
            return self._computer(method, unquote(match.group(1)), match.group(2) or "", query, body, user)

        match = re.fullmatch(r"/((?:job/[^/]+/)+)(buildWithParameters|build|api/json|)", path)
        if match:
            job = "/".join(unquote(p) for p in match.group(1).split("/")[1::2])
            return self._job(method, job, match.group(2), query, form, user)

        match = re.fullmatch(r"/queue/item/(\d+)/api/json", path)
        if match and method == "GET":
            item = self.queue.get(int(match.group(1)))
            if item is None:
                raise _Reply(404, "Not Found")
            return self._json({k: v for k, v in item.items() if not k.startswith("_")})
        raise _Reply(404, "Not Found")

    def _create_node(self, name: str, node_type: str, json_text: str) -> tuple[int, dict, bytes]:
        if not name:
            raise _Reply(400, "Query parameter 'name' is required")
        if name in self.nodes:
            raise _Reply(400, f"Agent called \u2018{name}\u2019 already exists")
        if node_type != DUMB_SLAVE_TYPE:
            raise _Reply(500, f"java.lang.NullPointerException: no node type {node_type}")
        try:
            data = json.loads(json_text)
            executors = int(data.get("numExecutors", 1))
        except (ValueError, TypeError):
            raise _Reply(400, "Invalid form data")
        if executors < 1:
            raise _Reply(400, "Invalid agent configuration. Number of executors must be a positive number.")
        if not data.get("remoteFS"):
            raise _Reply(400, "Remote directory is mandatory.")
        self.nodes[name] = Node(name=name, description=data.get("nodeDescription") or "",
                                num_executors=executors, remote_fs=data["remoteFS"],
                                labels=data.get("labelString") or "",
                                mode=data.get("mode", "NORMAL"),
                                launcher=_launcher_from_json(data.get("launcher") or {}))
        return 302, {"Location": f"{self.url}computer/"}, b""

    def _computer(self, method: str, name: str, rest: str, query: dict, body: bytes,
                  user: User) -> tuple[int, dict, bytes]:
        node = self._node(name)
        message = (query.get("offlineMessage") or [""])[0].strip()
        if rest in ("", "/") and method == "GET":
            return self._html(name)
        if rest == "/api/json" and method == "GET":
            return self._json(node.api_json(self.version))
        if rest == "/config.xml":
            if method == "GET":
                if "configure" not in user.permissions:   # Agent/Configure implies Agent/ExtendedRead
                    self._require(user, "extended_read")
                return 200, {"Content-Type": "application/xml"}, node.config_xml().encode("utf-8")
            if method == "POST":
                self._require(user, "configure")
                self._update_node(node, body)
                return 200, {"Content-Type": "text/plain"}, b""
            raise _Reply(400, "Bad Request")
        if rest in ("/toggleOffline", "/changeOfflineCause", "/doDelete"):
            if method != "POST":
                raise _Reply(405, "This URL requires POST")
            if rest == "/doDelete":
                self._require(user, "delete")
                del self.nodes[name]
                return 302, {"Location": f"{self.url}computer/"}, b""
            if rest == "/toggleOffline" and node.temporarily_offline:
                self._require(user, "connect")
                node.set_online()
            else:
                self._require(user, "disconnect")
                node.set_offline_by(user.name, message)
            return 302, {"Location": f"{self.url}computer/{quote(name)}/"}, b""
        if rest in ("/jenkins-agent.jnlp", "/slave-agent.jnlp") and method == "GET":
            self._require(user, "connect")
            if node.launcher_class != JNLP_LAUNCHER:
                raise _Reply(404, "Not an inbound agent")
            if version_tuple(self.version) >= (2, 437):
                self.warnings.append(f"jenkins-agent.jnlp for {name} fetched by {user.name}: "
                                     "use of the JNLP file is deprecated")
            return 200, {"Content-Type": "application/x-java-jnlp-file"}, self._jnlp(node).encode()
        raise _Reply(404, "Not Found")

    def _update_node(self, node: Node, body: bytes) -> None:
        try:
            root = ET.fromstring(body)
        except ET.ParseError as e:
            raise _Reply(500, f"com.thoughtworks.xstream.io.StreamException: {e}")
        if root.tag != "slave":
            raise _Reply(400, "Node types do not match")

        def text(tag: str, default: str) -> str:
            element = root.find(tag)
            return element.text or "" if element is not None else default

        new_name = text("name", node.name)
        try:
            executors = int(text("numExecutors", str(node.num_executors)))
        except ValueError:
            raise _Reply(500, "com.thoughtworks.xstream.converters.ConversionException: numExecutors")
        node.description = text("description", "")
        node.remote_fs = text("remoteFS", node.remote_fs)
        node.num_executors = executors
        node.mode = text("mode", "NORMAL")
        node.labels = text("label", "")
        launcher = root.find("launcher")
        if launcher is not None:
            node.launcher = launcher
        properties = root.find("nodeProperties")
        if properties is not None:
            node.properties = properties
        if new_name != node.name:  # Nodes.replaceNode renames
            del self.nodes[node.name]
            node.name = new_name
            self.nodes[new_name] = node

    def _jnlp(self, node: Node) -> str:
        root = ET.Element("jnlp")
        app = ET.SubElement(root, "application-desc")
        arguments = [self.agent_secret(node.name), node.name]
        web_socket = node.launcher.find("webSocket")
        if web_socket is not None and (web_socket.text or "").strip() == "true":
            arguments.append("-webSocket")
        arguments += ["-workDir", node.remote_fs, "-internalDir", "remoting", "-url", self.url]
        for argument in arguments:
            ET.SubElement(app, "argument").text = argument
        return "<?xml version='1.0' encoding='UTF-8'?>\n" + ET.tostring(root, encoding="unicode")

    def _job(self, method: str, name: str, action: str, query: dict, form: dict,
             user: User) -> tuple[int, dict, bytes]:
        job = self.jobs.get(name)
        if job is None:
            raise _Reply(404, "Not Found")
        url = f"{self.url}job/{quote(name)}/"
        if action == "":
            return self._html(f"{name} [Jenkins] (REST API: {url}api/json?tree=...)")
        if action == "api/json":
            properties = ([{"_class": "hudson.model.ParametersDefinitionProperty",
                            "parameterDefinitions": [
                                {"_class": "hudson.model.StringParameterDefinition", "name": p,
                                 "defaultParameterValue": {"_class": "hudson.model.StringParameterValue",
                                                           "name": p, "value": ""}, "type": "StringParameterDefinition"}
                                for p in job.parameters]}] if job.parameters else [])
            return self._json({"_class": "org.jenkinsci.plugins.workflow.job.WorkflowJob", "name": name,
                               "fullName": name, "url": url, "buildable": not job.disabled,
                               "disabled": job.disabled, "property": properties})
        if method != "POST":
            raise _Reply(405, "This URL requires POST")
        self._require(user, "build")
        if job.disabled:
            raise _Reply(409, f"{name} is not buildable!")
        if action == "buildWithParameters" and not job.parameters:
            raise _Reply(400, "This build is not parameterized!")
        given = {k: v[0] for k, v in {**query, **form}.items() if k not in ("token", "delay")}
        params = {p: given.get(p, "") for p in job.parameters}     # undefined names are dropped silently
        for item in self.queue.values():
            if item["task"]["name"] == name and item["_params"] == params:
                return 303, {"Location": url}, b""                 # an identical item is already queued
        queue_id = self._next_queue_id
        self._next_queue_id += 1
        now = int(time.time() * 1000)
        self.queue[queue_id] = {
            "_class": "hudson.model.Queue$WaitingItem",
            "actions": [{"_class": "hudson.model.ParametersAction",
                         "parameters": [{"_class": "hudson.model.StringParameterValue", "name": k, "value": v}
                                        for k, v in params.items()]},
                        {"_class": "hudson.model.CauseAction",
                         "causes": [{"_class": "hudson.model.Cause$UserIdCause", "userId": user.name,
                                     "shortDescription": f"Started by user {user.name}",
                                     "userName": user.name}]}],
            "blocked": False, "buildable": False, "id": queue_id, "inQueueSince": now,
            "params": "".join(f"\n{k}={v}" for k, v in params.items()), "stuck": False,
            "task": {"_class": "org.jenkinsci.plugins.workflow.job.WorkflowJob", "name": name,
                     "url": url, "color": "blue"},
            "url": f"queue/item/{queue_id}/", "why": "In the quiet period. Expires in 4.9 sec",
            "timestamp": now + 5000, "_params": params,
        }
        self.builds.append({"job": name, "params": params, "queue_id": queue_id, "user": user.name})
        return 201, {"Location": f"{self.url}queue/item/{queue_id}/"}, b""

    @staticmethod
    def _json(data: dict, headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/json;charset=utf-8", **(headers or {})}
        return 200, headers, json.dumps(data).encode()

    @staticmethod
    def _html(title: str) -> tuple[int, dict, bytes]:
        return 200, {"Content-Type": "text/html;charset=utf-8"}, f"<html><body>{title}</body></html>".encode()


class _Handler(BaseHTTPRequestHandler):
    controller: FakeJenkins
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped controller really is gone

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        fake = self.controller
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        form = {}
        if "application/x-www-form-urlencoded" in (self.headers.get("Content-Type") or ""):
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
        record = Recorded(method, path, query, headers, body=body)
        session = None
        for cookie in (self.headers.get("Cookie") or "").split(";"):
            key, _, value = cookie.strip().partition("=")
            if key == f"JSESSIONID.{fake._instance}":
                session = value
        with fake._lock:
            fake.requests.append(record)
            fail = fake._fail.pop(0) if fake._fail else None
        if fake._delay:
            time.sleep(fake._delay)
        try:
            if fail is not None:
                raise _Reply(fail, "Server Error")
            with fake._lock:
                user = fake._authenticate(self.headers.get("Authorization"))
                record.user = user.name if user else None
                status, out_headers, out = fake.dispatch(method, path, query, form, body, self.headers, user,
                                                         session)
        except _Reply as reply:
            status, out_headers = reply.status, {"Content-Type": "text/html;charset=utf-8", **reply.headers}
            out = f"<html><body><h2>HTTP ERROR {reply.status}</h2><p>{reply.text}</p></body></html>".encode()
        record.status = status
        try:
            self.send_response(status)
            if not fake.strip_version_header:
                self.send_header("X-Jenkins", fake.version)
                self.send_header("X-Hudson", "1.395")
            self.send_header("X-Jenkins-Session", fake._instance)
            for key, value in out_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            pass
