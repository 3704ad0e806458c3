"""``Fleet`` and ``AsyncFleet``: a coordinator's API as Python calls."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import httpx

from ._common import (
    FINAL_STATES,
    Files,
    Progress,
    Result,
    load_spec,
    map_spec,
    raise_for,
    run_body,
    sandbox_body,
    server_and_token,
    unreachable,
    verify_for,
)
from .errors import FleetboxError, JobFailed, SessionLost, Timeout

Spec = Union[Mapping[str, Any], str, "os.PathLike[str]"]  # noqa: F821


def _final_result(job_id: str, result: Mapping[str, Any]) -> Any:
    if result["state"] != "completed":
        raise JobFailed(job_id, result["state"], result.get("error") or "")
    return result.get("result")


class Job:
    """A submitted job. ``wait()`` follows it to the end; ``result()`` is its value."""

    def __init__(self, fleet: "Fleet", view: Mapping[str, Any]) -> None:
        self.fleet = fleet
        self.id: str = view["id"]
        self.name: str = view.get("name", "")
        self.view: Dict[str, Any] = dict(view)

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.name!r}, state={self.view.get('state')!r})"

    def status(self) -> Dict[str, Any]:
        """The job as the coordinator sees it now: state and shard counts."""
        self.view = self.fleet._get(f"/v1/jobs/{self.id}")
        return self.view

    def wait(self, timeout: Optional[float] = None, progress: Optional[bool] = None) -> Dict[str, Any]:
        """Block until the job is final (or raise ``Timeout``); its result document. A progress
        bar is shown on a terminal unless ``progress=False``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        view = self.status()
        bar = Progress(view["shards"]["total"], self.name or self.id, progress is not False)
        delay = 0.05
        try:
            while view["state"] not in FINAL_STATES:
                s = view["shards"]
                bar.update(s["accepted"] + s["rejected"] + s["dead"])
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(self.id, timeout or 0.0)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                view = self.status()
            bar.update(view["shards"]["total"])
        finally:
            bar.close()
        return self.fleet._get(f"/v1/jobs/{self.id}/result")

    def result(self, timeout: Optional[float] = None) -> Any:
        """The job's value once it completes; ``JobFailed`` if it failed or was cancelled."""
        return _final_result(self.id, self.wait(timeout=timeout, progress=False))

    def shards(self) -> List[Dict[str, Any]]:
        """Every shard (index, state, attempts, ...), all pages."""
        out: List[Dict[str, Any]] = []
        start: Optional[int] = 0
        while start is not None:
            page = self.fleet._get(f"/v1/jobs/{self.id}/shards", params={"from": start})
            out.extend(page["shards"])
            start = page.get("next")
        return out

    def cancel(self) -> Dict[str, Any]:
        self.view = self.fleet._post(f"/v1/jobs/{self.id}/cancel", {})
        return self.view


class Fleet:
    """A coordinator. ``url`` and ``token`` default to ``FLEETBOX_SERVER`` and
    ``FLEETBOX_TOKEN`` (else ``http://127.0.0.1:8080`` and ``$FLEETBOX_DATA/admin.token``),
    as for the ``fleetbox`` command; ``ca_cert`` is a CA to trust for an ``https://``
    coordinator (default ``FLEETBOX_CA_CERT``, else ``$FLEETBOX_DATA/tls/ca.pem``)."""

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 30.0,
        ca_cert: Optional[str] = None,
    ) -> None:
        self.url, self._token = server_and_token(url, token)
        self._http = httpx.Client(
            base_url=self.url,
            headers={"authorization": f"Bearer {self._token}"},
            timeout=timeout,
            verify=verify_for(ca_cert),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get(self, path: str, params: Optional[Mapping[str, Any]] = None) -> Any:
        try:
            return raise_for(self._http.get(path, params=params))
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None

    def _post(self, path: str, body: Any, timeout: Optional[float] = None) -> Any:
        try:
            kw = {} if timeout is None else {"timeout": timeout}
            return raise_for(self._http.post(path, json=body, **kw))
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None

    def run(
        self,
        code: str,
        input: Any = None,
        timeout: Optional[float] = None,
        files: Optional[Files] = None,
        *,
        limits: Optional[Mapping[str, Any]] = None,
        requirements: Optional[List[str]] = None,
        wait: float = 60.0,
        allow_hosts: Optional[List[str]] = None,
    ) -> Result:
        """Run one program on the fleet and return its report. ``timeout`` (seconds) is the
        program's limit; ``files`` (name → bytes or text) appear in its workspace; past ``wait``
        seconds ``Timeout`` is raised and the run goes on as a job. ``allow_hosts``
        (``["pypi.org:443", "*.pythonhosted.org"]``) are the hosts the program may reach through
        the agents' egress proxy; agents that do not allow them answer ``refused``."""
        body = run_body(code, input, timeout, files, limits, requirements, wait, allow_hosts)
        answer = self._post("/v1/run", body, timeout=wait + 30)
        if answer.get("report") is None:
            if answer["state"] in FINAL_STATES:
                raise JobFailed(answer["job_id"], answer["state"], answer.get("error") or "")
            raise Timeout(answer["job_id"], wait)
        return Result.from_answer(answer)

    def session(
        self,
        *,
        timeout: Optional[float] = None,
        limits: Optional[Mapping[str, Any]] = None,
        requirements: Optional[List[str]] = None,
        allow_hosts: Optional[List[str]] = None,
        idle_timeout: Optional[float] = None,
        lifetime: Optional[float] = None,
        wait: float = 60.0,
    ) -> "Session":
        """Open a session: one interpreter on one agent, kept between calls, so names defined
        by one ``run`` exist in the next. ``timeout`` (seconds) is each call's limit, ``limits``
        the session's (``memory`` holds for the whole session); it is closed after
        ``idle_timeout`` seconds without a call (default 600) or ``lifetime`` (default 3600).
        Use it as a context manager, which closes it::

            with fleet.session() as s:
                s.run("x = 41")
                assert s.run("print(x + 1)").stdout == "42\\n"
        """
        body = _session_body(timeout, limits, requirements, allow_hosts, idle_timeout, lifetime, wait)
        view = _opened(self._post("/v1/sessions", body, timeout=wait + 30), wait)
        return Session(self, view)

    def _delete(self, path: str) -> Any:
        try:
            return raise_for(self._http.delete(path))
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None

    def review(self, code: str) -> Dict[str, Any]:
        """The code review of a program without running it: ``findings`` (rule, severity, line,
        column, message, snippet), ``risk`` (0-100) and ``decision`` (``run``,
        ``run_on_server_only``, ``hold``, ``reject``). A syntax error raises ``FleetboxError``."""
        return self._post("/v1/review", {"code": code})

    def blob(self, sha256: str) -> bytes:
        """A stored blob by hash: a file a program wrote (``Result.files``), a large stream."""
        try:
            resp = self._http.get(f"/v1/blobs/{sha256}")
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None
        if not resp.is_success:
            raise_for(resp)
        return resp.content

    def submit(self, spec: Spec) -> Job:
        """Submit a job spec (a dict, or a ``.toml``/``.json`` file)."""
        return Job(self, self._post("/v1/jobs", load_spec(spec), timeout=300))

    def job(self, job_id: str) -> Job:
        return Job(self, self._get(f"/v1/jobs/{job_id}"))

    def jobs(self, state: Optional[str] = None, limit: int = 100) -> List[Job]:
        params: Dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return [Job(self, v) for v in self._get("/v1/jobs", params=params)["jobs"]]

    def map(
        self,
        code_or_function: Union[str, Callable[..., Any]],
        items: List[Any],
        per_shard: int = 1,
        reducer: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        limits: Optional[Mapping[str, Any]] = None,
        requirements: Optional[List[str]] = None,
        name: Optional[str] = None,
        progress: Optional[bool] = None,
    ) -> Any:
        """Fan ``items`` out over the fleet and return the folded result. A function is sent as
        its source and applied to every item (results in item order); a string is a program
        that reads its shard (``{"items": [...]}``) from ``FLEETBOX_INPUT``."""
        spec = map_spec(code_or_function, items, per_shard, reducer, timeout, limits, requirements, name)
        job = self.submit(spec)
        return _final_result(job.id, job.wait(progress=progress))


class Session:
    """A session's interpreter on the fleet (``Fleet.session()``): ``run`` calls share their
    names. A call past its ``timeout`` is interrupted (``status == "timeout"``) and the session
    lives on; once the session is gone (closed, idle too long, its agent lost) ``run`` raises
    ``SessionLost``."""

    def __init__(self, fleet: Fleet, view: Dict[str, Any]) -> None:
        self.fleet = fleet
        self.id: str = view["id"]
        self.view = view

    @property
    def state(self) -> str:
        """``open``, ``closed`` or ``lost``, as of the last call."""
        return self.view["state"]

    def run(self, code: str, timeout: Optional[float] = None, *, wait: float = 60.0) -> Result:
        """Run ``code`` in the session's interpreter and return its report, as ``Fleet.run``
        does."""
        try:
            answer = self.fleet._post(
                f"/v1/sessions/{self.id}/run", _call_body(code, timeout, wait), timeout=wait + 30
            )
        except FleetboxError as e:
            raise _lost(self, e) from None
        self.view = answer["session"]
        return _call_result(answer, wait)

    def close(self) -> None:
        """End the session (its interpreter and what it held are gone); closing twice is fine."""
        self.view = self.fleet._delete(f"/v1/sessions/{self.id}")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _session_body(
    timeout: Optional[float],
    limits: Optional[Mapping[str, Any]],
    requirements: Optional[List[str]],
    allow_hosts: Optional[List[str]],
    idle_timeout: Optional[float],
    lifetime: Optional[float],
    wait: float,
) -> Dict[str, Any]:
    body = sandbox_body(timeout, limits, requirements, wait, allow_hosts)
    if idle_timeout is not None:
        body["idle_timeout_ms"] = max(1000, int(idle_timeout * 1000))
    if lifetime is not None:
        body["max_lifetime_ms"] = max(1000, int(lifetime * 1000))
    return body


def _opened(answer: Mapping[str, Any], wait: float) -> Dict[str, Any]:
    """The session an opening answered with, or why there is none."""
    view = answer["session"]
    if view["state"] == "opening":
        raise Timeout(answer["job_id"], wait)
    if view["state"] != "open":
        raise SessionLost(view["id"], view["state"], view.get("end_reason") or answer.get("error") or "")
    return view


def _call_body(code: str, timeout: Optional[float], wait: float) -> Dict[str, Any]:
    body: Dict[str, Any] = {"code": code, "wait_ms": int(wait * 1000)}
    if timeout is not None:
        body["timeout_ms"] = max(1, int(timeout * 1000))
    return body


def _lost(session: Any, e: FleetboxError) -> FleetboxError:
    """A call's error: ``session_lost`` as ``SessionLost`` (the session's state noted)."""
    if e.code != "session_lost":
        return e
    session.view = dict(session.view, state="lost")
    return SessionLost(session.id, "lost", e.message)


def _call_result(answer: Mapping[str, Any], wait: float) -> Result:
    if answer.get("report") is None:
        if answer["state"] in FINAL_STATES:
            raise JobFailed(answer["job_id"], answer["state"], answer.get("error") or "")
        raise Timeout(answer["job_id"], wait)
    return Result.from_answer(answer)


class AsyncJob:
    """``Job`` for ``AsyncFleet``."""

    def __init__(self, fleet: "AsyncFleet", view: Mapping[str, Any]) -> None:
        self.fleet = fleet
        self.id: str = view["id"]
        self.name: str = view.get("name", "")
        self.view: Dict[str, Any] = dict(view)

    async def status(self) -> Dict[str, Any]:
        self.view = await self.fleet._get(f"/v1/jobs/{self.id}")
        return self.view

    async def wait(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        view = await self.status()
        while view["state"] not in FINAL_STATES:
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(self.id, timeout or 0.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            view = await self.status()
        return await self.fleet._get(f"/v1/jobs/{self.id}/result")

    async def result(self, timeout: Optional[float] = None) -> Any:
        return _final_result(self.id, await self.wait(timeout=timeout))

    async def shards(self) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        start: Optional[int] = 0
        while start is not None:
            page = await self.fleet._get(f"/v1/jobs/{self.id}/shards", params={"from": start})
            out.extend(page["shards"])
            start = page.get("next")
        return out

    async def cancel(self) -> Dict[str, Any]:
        self.view = await self.fleet._post(f"/v1/jobs/{self.id}/cancel", {})
        return self.view


class AsyncFleet:
    """``Fleet`` for ``asyncio``: the same methods, awaited."""

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 30.0,
        ca_cert: Optional[str] = None,
    ) -> None:
        self.url, self._token = server_and_token(url, token)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"authorization": f"Bearer {self._token}"},
            timeout=timeout,
            verify=verify_for(ca_cert),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncFleet":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _get(self, path: str, params: Optional[Mapping[str, Any]] = None) -> Any:
        try:
            return raise_for(await self._http.get(path, params=params))
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None

    async def _post(self, path: str, body: Any, timeout: Optional[float] = None) -> Any:
        try:
            kw = {} if timeout is None else {"timeout": timeout}
            return raise_for(await self._http.post(path, json=body, **kw))
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None

    async def run(
        self,
        code: str,
        input: Any = None,
        timeout: Optional[float] = None,
        files: Optional[Files] = None,
        *,
        limits: Optional[Mapping[str, Any]] = None,
        requirements: Optional[List[str]] = None,
        wait: float = 60.0,
        allow_hosts: Optional[List[str]] = None,
    ) -> Result:
        body = run_body(code, input, timeout, files, limits, requirements, wait, allow_hosts)
        answer = await self._post("/v1/run", body, timeout=wait + 30)
        if answer.get("report") is None:
            if answer["state"] in FINAL_STATES:
                raise JobFailed(answer["job_id"], answer["state"], answer.get("error") or "")
            raise Timeout(answer["job_id"], wait)
        return Result.from_answer(answer)

    async def session(
        self,
        *,
        timeout: Optional[float] = None,
        limits: Optional[Mapping[str, Any]] = None,
        requirements: Optional[List[str]] = None,
        allow_hosts: Optional[List[str]] = None,
        idle_timeout: Optional[float] = None,
        lifetime: Optional[float] = None,
        wait: float = 60.0,
    ) -> "AsyncSession":
        """``Fleet.session`` for ``asyncio``: ``async with await fleet.session() as s``."""
        body = _session_body(timeout, limits, requirements, allow_hosts, idle_timeout, lifetime, wait)
        view = _opened(await self._post("/v1/sessions", body, timeout=wait + 30), wait)
        return AsyncSession(self, view)

    async def _delete(self, path: str) -> Any:
        try:
            return raise_for(await self._http.delete(path))
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None

    async def review(self, code: str) -> Dict[str, Any]:
        return await self._post("/v1/review", {"code": code})

    async def blob(self, sha256: str) -> bytes:
        try:
            resp = await self._http.get(f"/v1/blobs/{sha256}")
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None
        if not resp.is_success:
            raise_for(resp)
        return resp.content

    async def submit(self, spec: Spec) -> AsyncJob:
        return AsyncJob(self, await self._post("/v1/jobs", load_spec(spec), timeout=300))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._get(f"/v1/jobs/{job_id}"))

    async def map(
        self,
        code_or_function: Union[str, Callable[..., Any]],
        items: List[Any],
        per_shard: int = 1,
        reducer: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        limits: Optional[Mapping[str, Any]] = None,
        requirements: Optional[List[str]] = None,
        name: Optional[str] = None,
    ) -> Any:
        spec = map_spec(code_or_function, items, per_shard, reducer, timeout, limits, requirements, name)
        job = await self.submit(spec)
        return _final_result(job.id, await job.wait())


class AsyncSession:
    """``Session`` for ``asyncio``: ``run`` and ``close`` awaited."""

    def __init__(self, fleet: AsyncFleet, view: Dict[str, Any]) -> None:
        self.fleet = fleet
        self.id: str = view["id"]
        self.view = view

    @property
    def state(self) -> str:
        return self.view["state"]

    async def run(self, code: str, timeout: Optional[float] = None, *, wait: float = 60.0) -> Result:
        try:
            answer = await self.fleet._post(
                f"/v1/sessions/{self.id}/run", _call_body(code, timeout, wait), timeout=wait + 30
            )
        except FleetboxError as e:
            raise _lost(self, e) from None
        self.view = answer["session"]
        return _call_result(answer, wait)

    async def close(self) -> None:
        self.view = await self.fleet._delete(f"/v1/sessions/{self.id}")

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
