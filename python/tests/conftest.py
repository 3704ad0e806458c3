"""A real coordinator for the tests: `fleetbox up` (2 local agents, SQLite) on a free port."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKEN = "sdk-test-token"


def binary() -> str:
    path = os.environ.get("FLEETBOX_BIN") or str(ROOT / "target" / "debug" / "fleetbox")
    if not os.access(path, os.X_OK):
        pytest.exit(f"no fleetbox binary at {path}: `cargo build -p fleetbox` or set FLEETBOX_BIN", 2)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def coordinator():
    import shutil
    import tempfile

    # Not under pytest's own temporary directory: it is private to root (0700), and the jails'
    # unprivileged ids must reach their run directories.
    data = pathlib.Path(tempfile.mkdtemp(prefix="fleetbox-sdk-"))
    data.chmod(0o755)
    url = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, FLEETBOX_ADMIN_TOKEN=TOKEN, FLEETBOX_WORK_ROOT=str(data / "runs"))
    log = open(data / "up.log", "wb")
    proc = subprocess.Popen(
        [binary(), "up", "--listen", url.removeprefix("http://"), "--data", str(data / "db")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            agents = httpx.get(f"{url}/v1/agents", headers={"authorization": f"Bearer {TOKEN}"}).json()
            if len(agents.get("agents", [])) >= 2:
                break
        except (httpx.TransportError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.stderr.write((data / "up.log").read_text())
            pytest.exit("`fleetbox up` did not come up", 2)
        time.sleep(0.1)
    os.environ["FLEETBOX_SERVER"] = url
    os.environ["FLEETBOX_TOKEN"] = TOKEN
    os.environ["FLEETBOX_BIN"] = binary()
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture()
def fleet(coordinator):
    from fleetbox import Fleet

    with Fleet() as f:
        yield f
