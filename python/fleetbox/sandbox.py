"""The original single-machine sandbox API, kept so code written for it works unchanged.

``get_sandbox()`` picks the backend from ``SANDBOX_TYPE``:

- ``local`` (default): ``fleetbox run --backend process`` on this machine;
- ``jail``: ``fleetbox run --backend jail`` (namespaces, seccomp, Landlock, cgroups);
- ``docker``: ``fleetbox run --backend docker`` (a container per run; ``DOCKER_IMAGE`` and the rest);
- ``fleet``: ``POST /v1/run`` on the coordinator at ``FLEETBOX_SERVER``.

and reads the other variables of the original: ``SANDBOX_TIMEOUT_SEC`` (default 30),
``SANDBOX_MAX_OUTPUT_KB`` (default 64), and for ``docker`` the ``DOCKER_*`` ones, which the
``fleetbox`` binary reads itself. The binary is ``FLEETBOX_BIN``, else ``fleetbox`` on ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .errors import FleetboxError

SANDBOX_TYPES = ("local", "jail", "docker", "fleet")


@dataclass
class ExecutionResult:
    """What ``execute`` returns: as the original sandbox's result, with the full report in
    ``meta``."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float
    meta: Dict[str, Any] = field(default_factory=dict)


def _exit_code(report: Dict[str, Any]) -> int:
    if report.get("exit_code") is not None:
        return int(report["exit_code"])
    if report.get("signal"):
        return -int(report["signal"])
    return -1


def _result(report: Dict[str, Any]) -> ExecutionResult:
    return ExecutionResult(
        exit_code=_exit_code(report),
        stdout=report.get("stdout", ""),
        stderr=report.get("stderr", ""),
        duration=report.get("wall_ms", 0) / 1000.0,
        meta=report,
    )


def _check_language(language: str) -> None:
    if language.lower() not in ("python", "python3", "py"):
        raise ValueError(f"language `{language}` is not supported: Fleetbox runs Python only")


def _timeout(timeout: Optional[float]) -> float:
    if timeout is not None:
        return float(timeout)
    return float(os.environ.get("SANDBOX_TIMEOUT_SEC", "30"))


class Sandbox:
    """Runs a program and returns an ``ExecutionResult``."""

    kind = "base"

    def execute(self, code: str, language: str = "python", timeout: Optional[float] = None) -> ExecutionResult:
        raise NotImplementedError


def fleetbox_binary() -> str:
    explicit = os.environ.get("FLEETBOX_BIN")
    if explicit:
        return explicit
    found = shutil.which("fleetbox")
    if not found:
        raise FleetboxError("no_binary", "no `fleetbox` binary: put it on PATH or set FLEETBOX_BIN")
    return found


class BinarySandbox(Sandbox):
    """``fleetbox run --backend BACKEND`` on this machine."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.kind = "local" if backend == "process" else backend

    def execute(self, code: str, language: str = "python", timeout: Optional[float] = None) -> ExecutionResult:
        _check_language(language)
        seconds = _timeout(timeout)
        argv = [fleetbox_binary(), "run", "--json", "--backend", self.backend,
                "--timeout", f"{max(1, int(seconds * 1000))}ms", "-"]
        kb = os.environ.get("SANDBOX_MAX_OUTPUT_KB")
        if kb:
            argv[-1:-1] = ["--max-output", f"{int(kb)}KiB"]
        done = subprocess.run(argv, input=code.encode(), capture_output=True, timeout=seconds + 30)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            raise FleetboxError(
                "sandbox_error",
                f"`fleetbox run --backend {self.backend}` failed (exit {done.returncode}): "
                + done.stderr.decode(errors="replace").strip(),
            ) from None
        return _result(report)


class FleetSandbox(Sandbox):
    """``POST /v1/run`` on a coordinator: the program runs on one of its agents."""

    kind = "fleet"

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None) -> None:
        from .client import Fleet

        self.fleet = Fleet(url, token)

    def execute(self, code: str, language: str = "python", timeout: Optional[float] = None) -> ExecutionResult:
        _check_language(language)
        seconds = _timeout(timeout)
        limits = {}
        kb = os.environ.get("SANDBOX_MAX_OUTPUT_KB")
        if kb:
            limits["max_output"] = f"{int(kb)}KiB"
        r = self.fleet.run(code, timeout=seconds, limits=limits, wait=seconds + 60)
        meta = dict(r.report)
        meta["job_id"] = r.job_id
        return _result(meta)


class FleetSessionSandbox(FleetSandbox):
    """``stateful=True`` on the fleet: every ``execute`` runs in one session's interpreter,
    opened at the first, so names survive between calls. ``close()`` ends it (also on exit
    from ``with``)."""

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None) -> None:
        super().__init__(url, token)
        self.session: Any = None

    def execute(self, code: str, language: str = "python", timeout: Optional[float] = None) -> ExecutionResult:
        _check_language(language)
        seconds = _timeout(timeout)
        if self.session is None:
            limits = {}
            kb = os.environ.get("SANDBOX_MAX_OUTPUT_KB")
            if kb:
                limits["max_output"] = f"{int(kb)}KiB"
            self.session = self.fleet.session(timeout=seconds, limits=limits, wait=seconds + 60)
        r = self.session.run(code, timeout=seconds, wait=seconds + 60)
        meta = dict(r.report)
        meta["job_id"] = r.job_id
        meta["session_id"] = self.session.id
        return _result(meta)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def __enter__(self) -> "FleetSessionSandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def get_sandbox(kind: Optional[str] = None, stateful: bool = False) -> Sandbox:
    """The sandbox ``SANDBOX_TYPE`` (or ``kind``) names. ``stateful=True`` keeps one
    interpreter between ``execute`` calls (a session on the fleet; ``fleet`` only)."""
    kind = (kind or os.environ.get("SANDBOX_TYPE") or "local").strip().lower()
    if stateful:
        if kind != "fleet":
            raise ValueError(
                f"stateful sandboxes are sessions on a fleet: set SANDBOX_TYPE=fleet (not `{kind}`)"
            )
        return FleetSessionSandbox()
    if kind in ("local", "process"):
        return BinarySandbox("process")
    if kind == "jail":
        return BinarySandbox("jail")
    if kind == "docker":
        return BinarySandbox("docker")
    if kind == "fleet":
        return FleetSandbox()
    raise ValueError(f"SANDBOX_TYPE `{kind}` is not one of {', '.join(SANDBOX_TYPES)}")
