"""Exceptions: every failure of a call is one of these, with what the coordinator said."""

from __future__ import annotations

from typing import Optional


class FleetboxError(Exception):
    """The coordinator answered with an error, or could not be reached.

    ``code`` is the API's error code (``invalid_spec``, ``unauthorized``, ``not_found``, ...,
    or ``unreachable``), ``trace_id`` names the request in the coordinator's log, ``field``
    the part of the request at fault when the coordinator said.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: Optional[int] = None,
        trace_id: Optional[str] = None,
        field: Optional[str] = None,
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (trace {trace_id})" if trace_id else ""))
        self.code = code
        self.message = message
        self.status = status
        self.trace_id = trace_id
        self.field = field


class JobFailed(FleetboxError):
    """A job ended ``failed`` or ``cancelled``; ``job_id`` and ``state`` say which and how."""

    def __init__(self, job_id: str, state: str, message: str) -> None:
        super().__init__("job_failed", f"job {job_id} ended `{state}`: {message}")
        self.job_id = job_id
        self.state = state


class Timeout(FleetboxError):
    """Waiting ran out; the job (``job_id``) goes on and can be waited for again."""

    def __init__(self, job_id: str, waited: float) -> None:
        super().__init__("timeout", f"job {job_id} still running after {waited:.1f} s")
        self.job_id = job_id


class SessionLost(FleetboxError):
    """A session is gone (``state``: ``closed`` or ``lost``), and ``message`` says why: closed,
    idle too long, past its lifetime, or its agent or interpreter lost. Open a new one."""

    def __init__(self, session_id: str, state: str, message: str) -> None:
        super().__init__("session_lost", f"session {session_id} is {state}: {message}")
        self.session_id = session_id
        self.state = state
