"""The MCP server with the official MCP client (`mcp` from PyPI), over Streamable HTTP
(`/mcp` on `fleetbox up`) and stdio (`fleetbox mcp`), in the current protocol revision and the
handshake-era one."""

from __future__ import annotations

import base64
import json
import os

import pytest

mcp = pytest.importorskip("mcp")
import httpx2  # noqa: E402  (the MCP SDK's HTTP client)
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

MODES = ["auto", "legacy"]  # 2026-07-28 (stateless) and 2025-11-25 (initialize handshake)
CHART = (
    "import matplotlib.pyplot as plt\n"
    "plt.plot([1, 2, 3], [2, 4, 1])\n"
    "plt.savefig('chart.png')\n"
    "open('notes.txt', 'w').write('three points')\n"
    "print('drawn')\n"
)


def stdio_client():
    return StdioServerParameters(
        command=os.environ["FLEETBOX_BIN"],
        args=["mcp"],
        env={
            "FLEETBOX_SERVER": os.environ["FLEETBOX_SERVER"],
            "FLEETBOX_TOKEN": os.environ["FLEETBOX_TOKEN"],
            "PATH": os.environ.get("PATH", ""),
        },
    )


def connect(coordinator, transport, mode):
    server = stdio_client() if transport == "stdio" else f"{coordinator}/mcp"
    if transport == "http":
        headers = {"authorization": f"Bearer {os.environ['FLEETBOX_TOKEN']}"}
        server = streamable_http_client(
            f"{coordinator}/mcp", http_client=httpx2.AsyncClient(headers=headers)
        )
    return Client(server, mode=mode, raise_exceptions=True)


@pytest.mark.parametrize("transport", ["http", "stdio"])
@pytest.mark.parametrize("mode", MODES)
async def test_tools_run_code_and_follow_jobs(coordinator, transport, mode):
    async with connect(coordinator, transport, mode) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"run_python", "submit_job", "job_status", "job_result", "cancel_job", "list_jobs", "review_code"} <= set(tools)
        for t in tools.values():
            assert t.description and t.input_schema and t.output_schema, t.name

        r = await client.call_tool("run_python", {"code": "print(6 * 7)"})
        assert not r.is_error
        assert r.structured_content["status"] == "ok"
        assert r.structured_content["stdout"] == "42\n"
        assert r.structured_content["output"] == 42
        assert "42" in r.content[0].text

        # A chart comes back as an image, a small text file as an embedded resource.
        r = await client.call_tool("run_python", {"code": CHART, "timeout": 60})
        assert not r.is_error, r.content[0].text
        images = [c for c in r.content if c.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        png = base64.b64decode(images[0].data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        texts = [c for c in r.content if c.type == "resource"]
        assert texts and texts[0].resource.text == "three points"

        # A program that fails is a tool error with the exception for the model to read.
        r = await client.call_tool("run_python", {"code": "import os\nos.remove('/etc/hostname')\n"})
        assert r.is_error
        assert r.structured_content["status"] == "error"
        assert r.structured_content["exception"]["type"] in ("PermissionError", "OSError", "FileNotFoundError")

        # A sharded job: submit, follow, read; the result also as a resource.
        spec = {
            "name": f"mcp squares {transport} {mode}",
            "code": "import json, os\nprint(sum(i * i for i in json.load(open(os.environ['FLEETBOX_INPUT']))['items']))",
            "shards": {"items": list(range(10)), "per_shard": 5},
            "aggregate": "sum",
        }
        r = await client.call_tool("submit_job", {"spec": spec})
        assert not r.is_error, r.content[0].text
        job_id = r.structured_content["id"]
        for _ in range(300):
            s = await client.call_tool("job_status", {"id": job_id})
            if s.structured_content["state"] in ("completed", "failed"):
                break
            import anyio

            await anyio.sleep(0.1)
        r = await client.call_tool("job_result", {"id": job_id})
        assert r.structured_content["state"] == "completed"
        assert r.structured_content["result"] == sum(i * i for i in range(10))
        listed = await client.call_tool("list_jobs", {"state": "completed"})
        assert any(j["id"] == job_id for j in listed.structured_content["jobs"])
        res = await client.read_resource(f"fleetbox://jobs/{job_id}/result")
        assert json.loads(res.contents[0].text)["state"] == "completed"
        shard = await client.read_resource(f"fleetbox://jobs/{job_id}/shards/1")
        assert json.loads(shard.contents[0].text)["input"] == {"items": [5, 6, 7, 8, 9]}

        # The review, without running anything; a forbidden program is a tool error.
        r = await client.call_tool("review_code", {"code": "import ctypes\nctypes.CDLL(None)\n"})
        assert not r.is_error
        assert r.structured_content["decision"] == "run_on_server_only"
        assert r.structured_content["findings"][0]["rule"] == "native.memory"
        r = await client.call_tool("run_python", {"code": "import os\nwhile True:\n    os.fork()\n"})
        assert r.is_error and "rejected_by_review" in r.content[0].text

        # Hosts: an address is refused before anything runs; a name these agents do not allow
        # (no `--allow-egress`) is `refused` by them, saying why.
        r = await client.call_tool("run_python", {"code": "print(1)", "allow_hosts": ["10.0.0.1"]})
        assert r.is_error and "not addresses" in r.content[0].text
        r = await client.call_tool("run_python", {"code": "print(1)", "allow_hosts": ["pypi.org:443"]})
        assert r.structured_content["status"] == "refused", r.content[0].text
        assert "--allow-egress" in r.content[0].text

        # Mistakes are tool errors with the coordinator's typed message.
        r = await client.call_tool("submit_job", {"spec": {"name": "x", "code": "pass", "shards": {"count": 0}}})
        assert r.is_error and "shards.count" in r.content[0].text
        r = await client.call_tool("job_status", {"id": "job_nope"})
        assert r.is_error and "not_found" in r.content[0].text


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_a_session_keeps_its_names_between_tool_calls(coordinator, transport):
    async with connect(coordinator, transport, "auto") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"session_open", "session_run", "session_close"} <= set(tools)
        r = await client.call_tool("session_open", {"timeout": 10})
        assert not r.is_error, r.content[0].text
        sid = r.structured_content["session_id"]
        assert r.structured_content["state"] == "open"
        r = await client.call_tool("session_run", {"session_id": sid, "code": "x = 41"})
        assert not r.is_error, r.content[0].text
        r = await client.call_tool("session_run", {"session_id": sid, "code": "print(x + 1)"})
        assert r.structured_content["stdout"] == "42\n"
        assert r.structured_content["session"]["outcome"] == "kept"
        r = await client.call_tool(
            "session_run", {"session_id": sid, "code": "while True:\n    pass", "timeout": 0.5}
        )
        assert r.is_error and r.structured_content["status"] == "timeout"
        r = await client.call_tool("session_run", {"session_id": sid, "code": "print(x)"})
        assert r.structured_content["stdout"] == "41\n"
        # A file a call writes comes back as a resource, as a run's does.
        r = await client.call_tool(
            "session_run", {"session_id": sid, "code": "open('note.txt', 'w').write('kept %d' % x)"}
        )
        texts = [c for c in r.content if c.type == "resource"]
        assert texts and texts[0].resource.text == "kept 41", r.content
        r = await client.call_tool("session_close", {"session_id": sid})
        assert r.structured_content["state"] == "closed"
        r = await client.call_tool("session_run", {"session_id": sid, "code": "print(x)"})
        assert r.is_error and "session_lost" in r.content[0].text


async def test_http_needs_an_admin_token_and_refuses_foreign_origins(coordinator):
    async with httpx2.AsyncClient() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        r = await http.post(f"{coordinator}/mcp", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        headers["authorization"] = f"Bearer {os.environ['FLEETBOX_TOKEN']}"
        headers["origin"] = "http://evil.example"
        r = await http.post(f"{coordinator}/mcp", json=body, headers=headers)
        assert r.status_code == 403


@pytest.mark.parametrize("mode", MODES)
async def test_a_read_only_token_reads_through_mcp_and_may_not_run(coordinator, mode):
    """Each tool calls the API with the caller's token: a token with only the `read` scope
    lists jobs, and every tool that would run or submit code answers with the API's refusal."""
    admin = {"authorization": f"Bearer {os.environ['FLEETBOX_TOKEN']}"}
    async with httpx2.AsyncClient() as http:
        r = await http.post(f"{coordinator}/v1/tokens", json={"scopes": ["read"]}, headers=admin)
        assert r.status_code == 201, r.text
        read_only = r.json()["token"]
    server = streamable_http_client(
        f"{coordinator}/mcp",
        http_client=httpx2.AsyncClient(headers={"authorization": f"Bearer {read_only}"}),
    )
    async with Client(server, mode=mode, raise_exceptions=True) as client:
        listed = await client.call_tool("list_jobs", {})
        assert not listed.is_error, listed.content[0].text
        for tool, args in [
            ("run_python", {"code": "print(1)"}),
            ("session_open", {}),
            ("submit_job", {"spec": {"name": "x", "code": "pass", "shards": {"count": 1}}}),
        ]:
            r = await client.call_tool(tool, args)
            assert r.is_error, (tool, r.content[0].text)
            assert "`submit` scope" in r.content[0].text, (tool, r.content[0].text)
