"""The OpenAPI 3.1 document at `/v1/openapi.json`, and schemathesis against a live coordinator.

Schemathesis (PyPI) reads the document, generates requests from it (its examples, boundary
values, random data, and sequences that follow the document's links) and checks every answer:
no 5xx, and every JSON answer valid under the document's schema for its status. It runs twice:
with an admin token over the whole API, and with an agent's token over the agent protocol.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from conftest import binary, free_port

ADMIN = "openapi-admin-token"
ENROLL = "openapi-enroll-token"
HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def bare_coordinator():
    """A coordinator of its own (no agents): the fuzzing submits, cancels and prunes freely."""
    data = pathlib.Path(tempfile.mkdtemp(prefix="fleetbox-openapi-"))
    url = f"http://127.0.0.1:{free_port()}"
    log = open(data / "server.log", "wb")
    proc = subprocess.Popen(
        [
            binary(),
            "server",
            "--listen",
            url.removeprefix("http://"),
            "--data",
            str(data / "db"),
            "--admin-token",
            ADMIN,
            "--enroll-token",
            ENROLL,
            "--backend",
            "process",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, FLEETBOX_LOG="warn"),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail((data / "server.log").read_text())
        time.sleep(0.1)
    yield url, data
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_the_document_describes_the_whole_v1_api(bare_coordinator):
    url, _ = bare_coordinator
    r = httpx.get(f"{url}/v1/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/shards/{index}",
        "/v1/run",
        "/v1/agent/reports",
        "/v1/review/flags/{id}/approve",
        "/v1/audit/verify",
        "/v1/audit/keys",
        "/v1/jobs/{id}/receipt",
        "/v1/agents/{id}/hardened",
        "/v1/agents/{id}/revoke",
        "/v1/tenants/{id}",
        "/v1/tokens/{id}/rotate",
        "/v1/whoami",
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/run",
    ]:
        assert path in paths, path
    ops = [op for item in paths.values() for op in item.values()]
    assert len(ops) == 55
    ids = [op["operationId"] for op in ops]
    assert len(set(ids)) == len(ids), ids
    for op in ops:
        # Every failure is the typed error body.
        for status in ("4XX", "5XX"):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, op["operationId"]
    # Path parameters are declared as such, with the names the paths use.
    for path, item in paths.items():
        for op in item.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            named = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
            assert declared == named, (path, declared, named)
    # The answers that make a job link to what can be asked of it.
    links = paths["/v1/jobs"]["post"]["responses"]["201"]["links"]
    assert links["jobs_get_job"] == {
        "operationId": "jobs_get_job",
        "parameters": {"id": "$response.body#/id"},
    }


def schemathesis(url: str, token: str, *extra: str) -> None:
    cmd = [
        str(pathlib.Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{url}/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        "not_a_server_error,response_schema_conformance",
        "--max-examples",
        "25",
        "--seed",
        "20261203",
        "--request-timeout",
        "30",
        *extra,
    ]
    env = dict(
        os.environ,
        SCHEMATHESIS_HOOKS="schemathesis_hooks",
        PYTHONPATH=str(HERE),
        NO_COLOR="1",
    )
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=HERE)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.split("Test cases:")[-1]


def test_schemathesis_finds_no_5xx_and_no_answer_off_the_schema(bare_coordinator):
    url, data = bare_coordinator
    # Revoking and rotating are fuzzed last, with a token of a tenant of their own: the fuzzer
    # follows listed token ids, and would otherwise revoke the tokens the later runs use.
    tokens_ops = "^/v1/tokens/[^/]+/(revoke|rotate)$"
    schemathesis(url, ADMIN, "--exclude-path-regex", tokens_ops)
    # The agent protocol, with an agent's own token.
    enrolled = httpx.post(
        f"{url}/v1/agents/enroll",
        headers={"authorization": f"Bearer {ENROLL}"},
        json={"name": "fuzz", "public_key": "11" * 32, "slots": 1},
    )
    assert enrolled.status_code == 200, enrolled.text
    # (No links among these: no stateful phase.)
    schemathesis(
        url,
        enrolled.json()["agent_token"],
        "--include-path-regex",
        "^/v1/agent/",
        "--phases",
        "examples,coverage,fuzzing",
    )
    # Token revocation and rotation, by an admin of a tenant made for it.
    made = httpx.post(
        f"{url}/v1/tenants",
        headers={"authorization": f"Bearer {ADMIN}"},
        json={"name": "fuzz-tokens"},
    )
    assert made.status_code == 201, made.text
    issued = httpx.post(
        f"{url}/v1/tokens",
        headers={"authorization": f"Bearer {ADMIN}"},
        json={"tenant": "fuzz-tokens", "scopes": ["admin"]},
    )
    assert issued.status_code == 201, issued.text
    schemathesis(url, issued.json()["token"], "--include-path-regex", "^/v1/tokens")
    # The coordinator is still up, and it never panicked.
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert "panicked" not in (data / "server.log").read_text()
