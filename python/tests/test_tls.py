"""The SDK against a coordinator serving HTTPS with `--tls auto`: trusted with `ca_cert` (or
`FLEETBOX_CA_CERT`), and a clear `untrusted` error without it."""

from __future__ import annotations

import os
import pathlib
import ssl
import subprocess
import tempfile
import time

import httpx
import pytest

from conftest import binary, free_port
from fleetbox import Fleet
from fleetbox.errors import FleetboxError


@pytest.fixture(scope="module")
def tls_coordinator():
    data = pathlib.Path(tempfile.mkdtemp(prefix="fleetbox-tls-"))
    port = free_port()
    log = open(data / "server.log", "wb")
    proc = subprocess.Popen(
        [binary(), "server", "--listen", f"127.0.0.1:{port}", "--data", str(data / "db"),
         "--tls", "auto", "--backend", "process", "--admin-token", "tls-admin"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, FLEETBOX_LOG="warn"),
    )
    ca = data / "db" / "tls" / "ca.pem"
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            trust = ca.exists() and ssl.create_default_context(cafile=str(ca))
            if trust and httpx.get(f"{url}/healthz", verify=trust).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail((data / "server.log").read_text())
        time.sleep(0.1)
    yield url, ca
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_the_sdk_trusts_the_coordinators_ca_and_refuses_without_it(tls_coordinator, monkeypatch):
    url, ca = tls_coordinator
    monkeypatch.delenv("FLEETBOX_CA_CERT", raising=False)
    monkeypatch.setenv("FLEETBOX_DATA", str(ca.parent.parent.parent / "elsewhere"))
    with Fleet(url, "tls-admin", ca_cert=str(ca)) as fleet:
        assert fleet.jobs() == []
    with pytest.raises(FleetboxError) as refused:
        with Fleet(url, "tls-admin") as fleet:
            fleet.jobs()
    assert refused.value.code == "untrusted", refused.value
    monkeypatch.setenv("FLEETBOX_CA_CERT", str(ca))
    with Fleet(url, "tls-admin") as fleet:
        assert fleet.jobs() == []
