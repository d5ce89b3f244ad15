"""The authenticated python-jenkins session, and the token-free errors every Jenkins operation raises.

:class:`JenkinsSession` owns the one python-jenkins client the link and the folder trigger share (so they
share its crumb and cookie): it checks the credentials with ``get_whoami`` once per new client (python-
jenkins' ``node_exists`` answers False on *any* error, so a bad token would otherwise look like a missing
node), applies the TLS settings, and turns every python-jenkins/requests failure into a :class:`LinkError`
(an :class:`AuthError` for 401/403, naming the token's source or the Jenkins permission to grant) whose
text never holds the token. A 403 about the crumb (the controller restarted and forgot the session) is
retried once with a new client; other failures drop the client so the next call starts afresh.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Callable, Optional, TypeVar
from urllib.parse import quote

import jenkins
import requests

from agentd.jenkins.settings import JenkinsSettings, Secret, token_source

# Every line the link writes (session, node reconcile, agent.jar, build triggers) goes to this one logger,
# named as before these parts had modules of their own, so journal filters keep working.
log = logging.getLogger("agentd.jenkins.link")

T = TypeVar("T")

# Jenkins permissions each operation needs, for the 403 message.
_PERMISSIONS = {
    "read": "Overall/Read",
    "read node": "Overall/Read",
    "create node": "Agent/Create",
    # GET config.xml needs Agent/ExtendedRead, which Agent/Configure implies; ExtendedRead itself is only
    # offered in the matrix when a system property enables it, so name the one an admin can grant.
    "read node config": "Agent/Configure",
    "reconfigure node": "Agent/Configure",
    "mark node offline": "Agent/Disconnect",
    "mark node online": "Agent/Connect",
    "read agent secret": "Agent/Connect",
    "download agent.jar": "Overall/Read",
    "trigger build": "Job/Build",
    "check job": "Job/Read",
}


class LinkError(Exception):
    """A Jenkins operation failed. The message is for people and never contains the token."""


class AuthError(LinkError):
    """401/403: the message says which credential or permission to check."""


def quote_node(name: str) -> str:
    """A node name as one URL path segment (``computer/<this>/...``)."""
    return quote(name.encode("utf-8"))


def http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status behind a python-jenkins/requests error, when there is one."""
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return int(response.status_code)
    match = re.search(r"\[(\d{3})\]", str(exc))  # JenkinsException: "... authentication failed [401]: ..."
    return int(match.group(1)) if match else None


def _is_crumb_rejection(exc: BaseException) -> bool:
    return http_status(exc) == 403 and "crumb" in str(exc).lower()


def describe_error(exc: BaseException, timeout_s: Optional[float] = None) -> str:
    """A short, token-free description of a client-side failure."""
    text = str(exc)
    if isinstance(exc, jenkins.TimeoutException) or isinstance(exc, requests.Timeout):
        return f"timed out{f' after {timeout_s:g}s' if timeout_s else ''}"
    if isinstance(exc, requests.exceptions.SSLError):
        match = re.search(r"\[SSL: [A-Z_]+\] [^'\"(]*", text)
        detail = match.group(0).strip() if match else text[:200]
        hint = " (set jenkins.ca_bundle to the CA's PEM file)" if "CERTIFICATE_VERIFY_FAILED" in text else ""
        return f"TLS error: {detail}{hint}"
    if isinstance(exc, requests.ConnectionError):
        if "refused" in text.lower():
            return "connection refused"
        if "Name or service not known" in text or "getaddrinfo" in text or "resolve" in text.lower():
            return "host name not found"
        return "connection failed: " + text[:200]
    if isinstance(exc, jenkins.NotFoundException):
        return "not found (HTTP 404)"
    status = http_status(exc)
    if status is not None:
        match = re.search(r"\[\d{3}\]: ?([^\n]*)", text)
        reason = f" {match.group(1).strip()}" if match and match.group(1).strip() else ""
        return f"HTTP {status}{reason}"
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first_line[:300]


class JenkinsSession:
    """One python-jenkins client for these settings and token; see the module docstring.

    Not thread-safe by itself: callers hold :attr:`lock` (reentrant) around each sequence of calls, so a
    reconcile pass and a build trigger never interleave on the shared client.
    """

    def __init__(self, settings: JenkinsSettings, token: Optional[Secret]):
        self.settings = settings
        self._token = token
        self.lock = threading.RLock()
        self._client: Optional[jenkins.Jenkins] = None
        self._client_authed = False
        self.authenticated_as: Optional[str] = None   # the user id get_whoami answered, for status

    def call(self, what: str, call: Callable[[jenkins.Jenkins], T]) -> T:
        """Run one python-jenkins call (``what`` names it in messages), turning its exceptions into
        token-free :class:`LinkError`/:class:`AuthError`."""
        for attempt in (1, 2):
            client = self._authenticated_client()
            try:
                return call(client)
            except LinkError:
                raise
            except jenkins.JenkinsException as e:
                status = http_status(e)
                if attempt == 1 and _is_crumb_rejection(e):
                    log.info("Jenkins rejected the session's crumb (controller restarted?); new session")
                    self._client = None
                    continue
                if status in (401, 403):
                    self._client = None
                    raise AuthError(self._auth_message(status, what)) from None
                if not isinstance(e, jenkins.NotFoundException):
                    self._client = None  # the session may be what is broken: start the next call afresh
                if isinstance(e, jenkins.TimeoutException):
                    raise LinkError(self._unreachable(what, e)) from None
                raise LinkError(f"{what}: {describe_error(e, self.settings.timeout_s)}") from None
            except requests.HTTPError as e:   # python-jenkins re-raises statuses other than 401/403/404/500
                raise LinkError(f"{what}: HTTP {e.response.status_code} {e.response.reason or ''}".rstrip()
                                ) from None
            except (requests.RequestException, OSError) as e:
                self._client = None
                raise LinkError(self._unreachable(what, e)) from None
        raise AssertionError("unreachable")

    def redact(self, text: str) -> str:
        """``text`` with the token replaced by ``***`` (for messages built from unexpected exceptions)."""
        token = self._token.reveal() if self._token else ""
        return text.replace(token, "***") if token else text

    def _new_client(self) -> jenkins.Jenkins:
        settings = self.settings
        if not settings.url:
            raise LinkError("the Jenkins link is disabled (no jenkins.url)")
        if self._token is None:
            raise AuthError(f"no API token for user {settings.user!r}: check {token_source(settings)}")
        client = jenkins.Jenkins(settings.url, username=settings.user, password=self._token.reveal(),
                                 timeout=settings.timeout_s)
        # python-jenkins has no TLS options; its requests session is `_session` (a WrappedSession whose
        # verify=False also overrides REQUESTS_CA_BUNDLE).
        client._session.verify = str(settings.ca_bundle) if settings.ca_bundle else settings.verify_tls
        return client

    def _authenticated_client(self) -> jenkins.Jenkins:
        """The client, checking the credentials with get_whoami once per new client."""
        if self._client is None:
            self._client = self._new_client()
            self._client_authed = False
        client = self._client
        if not self._client_authed:
            try:
                who = client.get_whoami()
            except jenkins.JenkinsException as e:
                self._client = None
                status = http_status(e)
                if status in (401, 403):
                    raise AuthError(self._auth_message(status, "read")) from None
                if isinstance(e, jenkins.TimeoutException):
                    raise LinkError(self._unreachable("check credentials", e)) from None
                raise LinkError(f"check credentials: {describe_error(e, self.settings.timeout_s)}") from None
            except (requests.RequestException, OSError) as e:
                self._client = None
                raise LinkError(self._unreachable("check credentials", e)) from None
            self._client_authed = True
            self.authenticated_as = who.get("id") if isinstance(who, dict) else None
        return client

    def _unreachable(self, what: str, exc: BaseException) -> str:
        return f"cannot reach {self.settings.url} ({what}): {describe_error(exc, self.settings.timeout_s)}"

    def _auth_message(self, status: int, what: str) -> str:
        settings = self.settings
        if status == 401:
            return (f"Jenkins rejected the credentials (HTTP 401) of user {settings.user!r}: "
                    f"check the API token in {token_source(settings)} "
                    "(an API token of that user, from Jenkins > user > Security)")
        permission = _PERMISSIONS.get(what, "the needed permission")
        return (f"user {settings.user!r} is not allowed to {what} (HTTP 403): grant it {permission} "
                f"(the token in {token_source(settings)} was accepted)")
