"""What the sync and async clients share: request bodies, answers, errors, functions as code."""

from __future__ import annotations

import base64
import inspect
import json
import os
import ssl
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import httpx

from .errors import FleetboxError

FINAL_STATES = ("completed", "failed", "cancelled", "needs_review")
DEFAULT_SERVER = "http://127.0.0.1:8080"

Files = Mapping[str, Union[bytes, str]]


def server_and_token(url: Optional[str], token: Optional[str]) -> "tuple[str, str]":
    """``url``/``token``, else ``FLEETBOX_SERVER``/``FLEETBOX_TOKEN``, else the CLI's defaults
    (``http://127.0.0.1:8080``, the admin token in ``$FLEETBOX_DATA/admin.token``)."""
    url = url or os.environ.get("FLEETBOX_SERVER") or DEFAULT_SERVER
    token = token or os.environ.get("FLEETBOX_TOKEN")
    if not token:
        path = Path(os.environ.get("FLEETBOX_DATA", "fleetbox-data")) / "admin.token"
        try:
            token = path.read_text().strip()
        except OSError:
            raise FleetboxError(
                "no_token",
                f"no token given, no FLEETBOX_TOKEN, and no admin token at `{path}`",
            ) from None
    return url.rstrip("/"), token


def raise_for(resp: httpx.Response) -> Any:
    """The JSON of a successful answer, else the coordinator's typed error as an exception."""
    if resp.is_success:
        return resp.json()
    try:
        err = resp.json()["error"]
    except Exception:
        raise FleetboxError(
            "protocol", f"HTTP {resp.status_code}: {resp.text[:200]}", status=resp.status_code
        ) from None
    raise FleetboxError(
        err.get("code", "error"),
        err.get("message", ""),
        status=resp.status_code,
        trace_id=err.get("trace_id"),
        field=err.get("field"),
    )


def unreachable(url: str, e: Exception) -> FleetboxError:
    if isinstance(e, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(e):
        return FleetboxError(
            "untrusted",
            f"the coordinator at {url} is not trusted: {e} (give its CA with `ca_cert=`, "
            "e.g. `DATA/tls/ca.pem` of `--tls auto`, or `FLEETBOX_CA_CERT`)",
        )
    return FleetboxError("unreachable", f"could not reach the coordinator at {url}: {e}")


def verify_for(ca_cert: Optional[str]) -> Union[bool, ssl.SSLContext]:
    """What to trust for an ``https://`` coordinator: the system's certificates, plus
    ``ca_cert``, else ``FLEETBOX_CA_CERT``, else ``$FLEETBOX_DATA/tls/ca.pem`` when it exists
    (the CA of a coordinator started with ``--tls auto``), as the ``fleetbox`` command does."""
    path = ca_cert or os.environ.get("FLEETBOX_CA_CERT")
    if not path:
        auto = Path(os.environ.get("FLEETBOX_DATA", "fleetbox-data")) / "tls" / "ca.pem"
        path = str(auto) if auto.exists() else None
    if not path:
        return True
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=path)
    return ctx


def encode_files(files: Optional[Files]) -> Dict[str, str]:
    out = {}
    for name, content in (files or {}).items():
        data = content.encode() if isinstance(content, str) else bytes(content)
        out[name] = base64.b64encode(data).decode()
    return out


def millis(seconds: Optional[float]) -> Optional[str]:
    return None if seconds is None else f"{max(1, int(seconds * 1000))}ms"


def limits_with(limits: Optional[Mapping[str, Any]], timeout: Optional[float]) -> Dict[str, Any]:
    out = dict(limits or {})
    if timeout is not None:
        out["timeout"] = millis(timeout)
        out.setdefault("cpu_time", millis(timeout))
    return out


def run_body(
    code: str,
    input: Any,
    timeout: Optional[float],
    files: Optional[Files],
    limits: Optional[Mapping[str, Any]],
    requirements: Optional[List[str]],
    wait: float,
    allow_hosts: Optional[List[str]] = None,
) -> Dict[str, Any]:
    body = sandbox_body(timeout, limits, requirements, wait, allow_hosts)
    body["code"] = code
    if input is not None:
        body["input"] = input
    if files:
        body["files"] = encode_files(files)
    return body


def sandbox_body(
    timeout: Optional[float],
    limits: Optional[Mapping[str, Any]],
    requirements: Optional[List[str]],
    wait: float,
    allow_hosts: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """What a run and a session's opening say alike: the wait, limits, allowed hosts and the
    environment's requirements."""
    body: Dict[str, Any] = {"wait_ms": int(wait * 1000)}
    lim = limits_with(limits, timeout)
    if allow_hosts:
        lim["network"] = {"allow": list(allow_hosts)}
    if lim:
        body["limits"] = lim
    if requirements:
        body["environment"] = {"requirements": list(requirements)}
    return body


@dataclass
class FileInfo:
    path: str
    bytes: int
    sha256: Optional[str]


@dataclass
class Result:
    """One run's report (``POST /v1/run``): what the program printed and returned, how it
    ended, what it cost. ``report`` is the full report as the coordinator keeps it."""

    job_id: str
    status: str
    stdout: str
    stderr: str
    output: Any
    exit_code: Optional[int]
    exception: Optional[Dict[str, Any]]
    wall_ms: int
    files: List[FileInfo]
    report: Dict[str, Any] = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> "Result":
        r = answer.get("report") or {}
        return cls(
            job_id=answer["job_id"],
            status=r.get("status", "sandbox_error"),
            stdout=r.get("stdout", ""),
            stderr=r.get("stderr", ""),
            output=r.get("output"),
            exit_code=r.get("exit_code"),
            exception=r.get("exception"),
            wall_ms=r.get("wall_ms", 0),
            files=[FileInfo(f["path"], f["bytes"], f.get("sha256")) for f in r.get("files", [])],
            report=dict(r),
        )


def load_spec(spec: Union[Mapping[str, Any], str, os.PathLike]) -> Dict[str, Any]:
    """A job spec as the API takes it: a dict as is, or a ``.toml``/``.json`` file with the
    files it names (``code_file``, ``shards.lines``, ``environment.requirements_file``) read
    relative to it, as ``fleetbox submit`` does."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import tomllib  # Python 3.11+

        data = tomllib.loads(text)
    base = path.parent
    if "code" not in data and "code_file" in data:
        data["code"] = (base / data.pop("code_file")).read_text()
    shards = data.get("shards") or {}
    if "text" not in shards and "lines" in shards:
        shards["text"] = (base / shards.pop("lines")).read_text()
    env = data.get("environment") or {}
    if "requirements_file" in env:
        lines = (base / env.pop("requirements_file")).read_text().splitlines()
        reqs = [ln.split(" #")[0].strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        env["requirements"] = list(env.get("requirements", [])) + reqs
    return data


def program_for(fn: Callable[..., Any]) -> str:
    """A program that applies ``fn`` to each item of its shard and prints the results as a JSON
    list: ``fn``'s own source, sent as text. Only a plain module-level function can be sent."""
    name = getattr(fn, "__name__", "")
    if name == "<lambda>":
        raise TypeError("a lambda cannot be sent to the fleet: define it with `def` at module level")
    if getattr(fn, "__closure__", None):
        names = ", ".join(fn.__code__.co_freevars)
        raise TypeError(
            f"`{name}` is a closure over {names}: only its source is sent, so the values it "
            "captures would be missing; pass them in the items instead"
        )
    if inspect.isbuiltin(fn) or not inspect.isfunction(fn):
        raise TypeError(f"`{fn!r}` is not a Python function whose source can be sent")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise TypeError(f"the source of `{name}` cannot be read ({e}): define it in a file") from None
    return (
        f"{source}\n\n"
        "import json as _json, os as _os\n"
        "_items = _json.load(open(_os.environ['FLEETBOX_INPUT']))['items']\n"
        f"print(_json.dumps([{name}(_x) for _x in _items]))\n"
    )


def map_spec(
    code_or_function: Union[str, Callable[..., Any]],
    items: List[Any],
    per_shard: int,
    reducer: Optional[str],
    timeout: Optional[float],
    limits: Optional[Mapping[str, Any]],
    requirements: Optional[List[str]],
    name: Optional[str],
) -> Dict[str, Any]:
    if isinstance(code_or_function, str):
        code = code_or_function
        reducer = reducer or "collect"
        label = name or "map"
    else:
        code = program_for(code_or_function)
        # Each shard prints the list of its items' results: concatenated in shard order.
        reducer = reducer or "concat"
        label = name or f"map {code_or_function.__name__}"
    spec: Dict[str, Any] = {
        "name": label,
        "code": code,
        "shards": {"items": list(items), "per_shard": per_shard},
        "aggregate": reducer,
    }
    lim = limits_with(limits, timeout)
    if lim:
        spec["limits"] = lim
    if requirements:
        spec["environment"] = {"requirements": list(requirements)}
    return spec


class Progress:
    """A progress line on a terminal: ``tqdm`` when installed, else a plain ``\\r`` line."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        import sys

        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        self.total = total
        self.label = label
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, unit="shard")
            except ImportError:
                self.bar = None

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        else:
            import sys

            sys.stderr.write(f"\r{self.label}: {done}/{self.total} shards")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            import sys

            sys.stderr.write("\n")
