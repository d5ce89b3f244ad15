"""Triggering a parameterized Jenkins build: what the config-folder trigger (``watcher``) calls.

Before the first trigger of a job (and after any failed one) its api/json is checked: it exists, is
buildable and defines every parameter (:func:`job_problem`), because Jenkins answers a disabled job's
buildWithParameters with 409, a job without parameters with an error, and silently drops a parameter the
job does not define (the build then runs with the default). The trigger posts
``job/NAME/buildWithParameters?k=v``; Jenkins answers 201 with the queue item in ``Location``, or 303
when an identical build is already queued (a success: :class:`Triggered` says which).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import jenkins
import requests

from agentd.jenkins.session import JenkinsSession, LinkError, log


@dataclass(frozen=True)
class Triggered:
    """A trigger's outcome: a new queue item, or an identical build that was already queued (HTTP 303)."""

    queue_id: Optional[int]
    already_queued: bool = False

    def __str__(self) -> str:
        return "already queued" if self.already_queued else f"queue item {self.queue_id}"


def job_problem(info: Mapping, job: str, parameters: Sequence[str]) -> Optional[str]:
    """Why ``job`` (its api/json) cannot take a build with these parameters, naming both, or None."""
    if info.get("buildable") is False or info.get("disabled") is True:
        return f"Jenkins job {job!r} is disabled (not buildable): enable it in Jenkins"
    defined = []
    for holder in list(info.get("property") or []) + list(info.get("actions") or []):
        if isinstance(holder, Mapping):
            defined += [d.get("name") for d in holder.get("parameterDefinitions") or [] if isinstance(d, Mapping)]
    if not defined:
        return (f"Jenkins job {job!r} takes no parameters: make it parameterized with a string parameter "
                f"{', '.join(repr(p) for p in parameters)} (the Jenkinsfile's parameters {{ }} block)")
    missing = [p for p in parameters if p not in defined]
    if missing:
        return (f"Jenkins job {job!r} does not define the parameter {', '.join(repr(p) for p in missing)} "
                f"(it defines {', '.join(repr(d) for d in defined)}): add it to the job, or set "
                "jenkins.watch.parameter to one of those")
    return None


class BuildTrigger:
    """Queues builds through the link's session, checking each job once (see the module docstring)."""

    def __init__(self, session: JenkinsSession):
        self._session = session
        self._checked_jobs: set[tuple[str, tuple[str, ...]]] = set()

    def trigger_build(self, job: str, params: Mapping[str, str]) -> Triggered:
        """Queue a parameterized build of ``job``: ``Triggered(queue id)``, or ``already_queued``.

        Raises :class:`LinkError` (an :class:`AuthError` for 401/403) naming the job and parameter.
        """
        key = (job, tuple(sorted(params)))
        with self._session.lock:
            try:
                if key not in self._checked_jobs:
                    self._check_job(job, list(params))
                    self._checked_jobs.add(key)
                result = self._session.call("trigger build", lambda c: _post_build(c, job, params))
            except LinkError:
                self._checked_jobs.discard(key)
                raise
        log.info("triggered Jenkins job %s with %s: %s", job, dict(params), result)
        return result

    def _check_job(self, job: str, parameters: list[str]) -> None:
        def get(client: jenkins.Jenkins) -> dict:
            try:
                return client.get_job_info(job)
            except jenkins.NotFoundException:
                raise _job_not_found(job) from None
            except jenkins.JenkinsException as e:
                if "does not exist" in str(e):   # python-jenkins' get_job_info turns 404 into this
                    raise _job_not_found(job) from None
                raise

        problem = job_problem(self._session.call("check job", get), job, parameters)
        if problem:
            raise LinkError(problem)


def _job_not_found(job: str) -> LinkError:
    return LinkError(f"Jenkins job {job!r} not found (check jenkins.watch.job; folders as 'folder/job')")


def _post_build(client: jenkins.Jenkins, job: str, params: Mapping[str, str]) -> Triggered:
    try:
        response = client.jenkins_request(requests.Request("POST", client.build_job_url(job, dict(params))))
    except jenkins.NotFoundException:
        raise LinkError(f"Jenkins job {job!r} not found") from None
    except requests.HTTPError as e:
        status = e.response.status_code
        if status == 409:
            raise LinkError(f"Jenkins job {job!r} is disabled (HTTP 409, not buildable): enable it") from None
        if status == 400:
            raise LinkError(f"Jenkins job {job!r} refused the parameters {sorted(params)} (HTTP 400): "
                            "is it parameterized?") from None
        raise
    # requests followed the redirect: a 303 to the job's page means an identical item is queued.
    if any(r.status_code == 303 for r in response.history):
        return Triggered(None, already_queued=True)
    location = response.headers.get("Location", "")
    match = re.search(r"/queue/item/(\d+)/?$", location)
    if response.status_code != 201 or not match:
        raise LinkError(f"Jenkins answered the trigger of job {job!r} with HTTP {response.status_code} and "
                        f"no queue item (Location {location or 'missing'})")
    return Triggered(int(match.group(1)))
