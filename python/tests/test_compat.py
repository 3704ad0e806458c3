"""The original sandbox API: `get_sandbox()` from the environment, `execute`, the agent tool."""

from __future__ import annotations

import os

import pytest

from fleetbox.sandbox import get_sandbox
from fleetbox.tools import run_python_code


@pytest.mark.parametrize("kind", ["local", "jail", "fleet"])
def test_execute_in_every_sandbox_type(coordinator, monkeypatch, kind):
    monkeypatch.setenv("SANDBOX_TYPE", kind)
    sandbox = get_sandbox()
    r = sandbox.execute(code="print('Hello')", language="python", timeout=30)
    assert r.exit_code == 0
    assert r.stdout == "Hello\n"
    assert r.duration > 0
    assert r.meta["status"] == "ok"
    bad = sandbox.execute(code="raise ValueError('x')", language="python", timeout=30)
    assert bad.exit_code == 1 and "ValueError" in bad.stderr
    slow = sandbox.execute(code="import time\ntime.sleep(30)", timeout=0.5)
    assert slow.meta["status"] == "timeout" and slow.exit_code != 0


def test_the_timeout_comes_from_the_environment(coordinator, monkeypatch):
    monkeypatch.setenv("SANDBOX_TYPE", "local")
    monkeypatch.setenv("SANDBOX_TIMEOUT_SEC", "1")
    r = get_sandbox().execute(code="import time\ntime.sleep(10)")
    assert r.meta["status"] == "timeout"
    assert r.meta["limits"]["timeout"] == "1s"


def test_other_languages_and_unknown_types_are_clear_errors(coordinator, monkeypatch):
    monkeypatch.setenv("SANDBOX_TYPE", "local")
    with pytest.raises(ValueError, match="Python only"):
        get_sandbox().execute(code="puts 1", language="ruby")
    with pytest.raises(ValueError, match="SANDBOX_TYPE"):
        get_sandbox("e2b")


def test_docker_mode_runs_in_a_container_with_the_seeds_variables(monkeypatch):
    monkeypatch.setenv("SANDBOX_TYPE", "docker")
    monkeypatch.setenv("DOCKER_IMAGE", os.environ.get("FLEETBOX_TEST_DOCKER_IMAGE", "fleetbox-python:3.11"))
    monkeypatch.setenv("DOCKER_MEMORY_LIMIT", "128m")
    monkeypatch.setenv("DOCKER_CPU_LIMIT", "0.5")
    r = get_sandbox().execute(code="import os; print(os.getuid() != 0, os.listdir('/work'))")
    assert r.exit_code == 0, r.meta
    assert r.stdout == "True []\n"
    assert r.meta["backend"] == "docker" and r.meta["runtime"] == "runc"
    assert r.meta["limits"]["memory"] == "128MiB"
    assert r.meta["limits"]["cpus"] == 0.5
    assert r.meta["limits"]["network"] is False
    # The seed's troubleshooting case, as a message: an image that is not there.
    monkeypatch.setenv("DOCKER_IMAGE", "fleetbox-no-such-image:0")
    r = get_sandbox().execute(code="print(1)")
    assert r.meta["status"] == "sandbox_error"
    assert "fleetbox image build" in r.meta["message"]


def test_the_agent_tool_answers_in_text(coordinator, monkeypatch):
    monkeypatch.setenv("SANDBOX_TYPE", "fleet")
    assert run_python_code("print('Executed by agent')") == "Executed by agent\n"
    err = run_python_code("1 / 0")
    assert err.startswith("Error (error, exit code 1)") and "ZeroDivisionError" in err
    assert "Traceback" in err
    monkeypatch.setenv("SANDBOX_MAX_OUTPUT_KB", "1")
    long = run_python_code("print('x' * 5000)")
    assert long.endswith("[output truncated]") and len(long.encode()) <= 1024


def test_a_stateful_sandbox_keeps_names_between_executes(coordinator, monkeypatch):
    monkeypatch.setenv("SANDBOX_TYPE", "fleet")
    with get_sandbox(stateful=True) as sandbox:
        assert sandbox.execute("import math\nr = 2").exit_code == 0
        out = sandbox.execute("print(round(math.pi * r * r, 2))")
        assert out.stdout == "12.57\n", out.meta
        assert out.meta["session_id"].startswith("ses_")
    with pytest.raises(ValueError, match="SANDBOX_TYPE=fleet"):
        get_sandbox("jail", stateful=True)
