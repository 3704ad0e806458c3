"""`Fleet` against a real coordinator: runs, jobs, map, files, errors."""

from __future__ import annotations

import textwrap

import pytest

from fleetbox import Fleet, FleetboxError, JobFailed, Timeout


def square(x):
    return x * x


def test_run_returns_the_report(fleet):
    r = fleet.run(
        "import json, os\nx = json.load(open(os.environ['FLEETBOX_INPUT']))\n"
        "print(open('data/in.txt').read().upper(), x['n'] * 2)\n",
        input={"n": 21},
        files={"data/in.txt": "hello"},
        timeout=10,
    )
    assert r.ok and r.status == "ok"
    assert r.stdout == "HELLO 42\n"
    assert r.exit_code == 0
    assert r.job_id.startswith("job_")
    assert r.files == []  # the attached file is not "created"
    assert r.report["limits"]["timeout"] == "10s"


def test_a_failing_program_is_a_result_not_an_exception(fleet):
    r = fleet.run("def f():\n    raise KeyError('missing')\nf()\n")
    assert r.status == "error" and not r.ok
    assert r.exception["type"] == "KeyError"
    assert "Traceback" in r.stderr


def test_hosts_the_agents_do_not_allow_are_refused_and_addresses_never_sent(fleet):
    # `fleetbox up`'s agents allow no egress: each refuses, saying how to allow it.
    r = fleet.run("print(1)", allow_hosts=["pypi.org:443"])
    assert r.status == "refused" and not r.ok
    assert "--allow-egress" in r.report["message"]
    assert r.report["limits"]["network"] == {"allow": ["pypi.org:443"]}
    with pytest.raises(FleetboxError) as e:
        fleet.run("print(1)", allow_hosts=["10.0.0.1"])
    assert "not addresses" in str(e.value)


def test_the_programs_limit_is_its_timeout(fleet):
    r = fleet.run("import time\ntime.sleep(30)\n", timeout=0.3)
    assert r.status == "timeout"


def test_waiting_past_the_bound_raises_timeout_with_the_job(fleet):
    with pytest.raises(Timeout) as e:
        fleet.run("import time\ntime.sleep(2)\nprint('done')\n", wait=0.2)
    job = fleet.job(e.value.job_id)
    assert job.result(timeout=30) == ["done\n"]  # stdout that is not JSON is kept as text


def test_a_chart_comes_back_as_a_png(fleet):
    r = fleet.run(
        textwrap.dedent(
            """
            import matplotlib.pyplot as plt
            plt.plot([1, 2, 3], [1, 4, 9])
            plt.savefig("chart.png")
            plt.show()  # returns at once: MPLBACKEND=Agg
            """
        ),
        timeout=60,
        limits={"memory": "1GiB"},
    )
    assert r.ok, r.stderr
    (png,) = [f for f in r.files if f.path == "chart.png"]
    data = fleet.blob(png.sha256)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) == png.bytes > 5000


def test_submit_wait_result_and_shards(fleet, tmp_path):
    (tmp_path / "prog.py").write_text(
        "import json, os\nshard = json.load(open(os.environ['FLEETBOX_INPUT']))\n"
        "print(sum(range(shard['start'], shard['end'])))\n"
    )
    (tmp_path / "job.toml").write_text(
        'name = "sum"\ncode_file = "prog.py"\naggregate = "sum"\n'
        "[shards]\nrange = { start = 0, end = 1000, count = 4 }\n"
    )
    job = fleet.submit(tmp_path / "job.toml")
    assert job.name == "sum"
    done = job.wait(timeout=60, progress=False)
    assert done["state"] == "completed"
    assert job.result() == sum(range(1000))
    shards = job.shards()
    assert [s["index"] for s in shards] == [0, 1, 2, 3]
    assert all(s["state"] == "accepted" for s in shards)
    assert any(j.id == job.id for j in fleet.jobs())


def test_map_sends_a_function_as_its_source(fleet):
    assert fleet.map(square, list(range(10)), per_shard=3, progress=False) == [
        x * x for x in range(10)
    ]


def test_map_refuses_what_it_cannot_send(fleet):
    with pytest.raises(TypeError, match="lambda"):
        fleet.map(lambda x: x, [1])
    k = 3

    def times_k(x):
        return x * k

    with pytest.raises(TypeError, match="closure"):
        fleet.map(times_k, [1])


def test_map_with_a_program_and_a_reducer(fleet):
    code = "import json, os\nprint(sum(json.load(open(os.environ['FLEETBOX_INPUT']))['items']))\n"
    assert fleet.map(code, list(range(100)), per_shard=10, reducer="sum", progress=False) == 4950


def test_a_failed_job_raises_job_failed(fleet):
    job = fleet.submit({"name": "boom", "code": "raise SystemExit(3)", "shards": {"count": 2}, "max_attempts": 1})
    with pytest.raises(JobFailed) as e:
        job.result(timeout=60)
    assert e.value.job_id == job.id and e.value.state == "failed"


def test_errors_carry_the_servers_code_and_trace(fleet, coordinator):
    with pytest.raises(FleetboxError) as e:
        fleet.submit({"name": "bad", "code": "pass", "shards": {"range": {"start": 0, "end": 10, "count": 11}}})
    assert e.value.code == "invalid_spec"
    assert e.value.field == "shards.range.count"
    assert e.value.trace_id
    with Fleet(coordinator, token="wrong") as bad:
        with pytest.raises(FleetboxError) as e:
            bad.run("print(1)")
    assert e.value.code == "unauthorized" and e.value.status == 401
    with Fleet("http://127.0.0.1:1", token="x") as nowhere:
        with pytest.raises(FleetboxError) as e:
            nowhere.jobs()
    assert e.value.code == "unreachable"


def test_review_without_running_and_a_refused_submission(fleet):
    r = fleet.review("import subprocess as sp\nsp.run(['id'])\n")
    assert r["decision"] == "run_on_server_only"
    (f,) = r["findings"]
    assert (f["rule"], f["line"], f["severity"]) == ("process.spawn", 2, "high")
    assert fleet.review("print(1)")["decision"] == "run"
    with pytest.raises(FleetboxError) as e:
        fleet.review("def f(:\n")
    assert e.value.code == "invalid_spec" and "line 1" in e.value.message
    with pytest.raises(FleetboxError) as e:
        fleet.run("import os\nwhile True:\n    os.fork()\n")
    assert e.value.code == "rejected_by_review"
    assert "process.fork_loop at line 3" in e.value.message


def test_a_session_keeps_its_names_until_it_is_closed(fleet):
    from fleetbox import SessionLost

    with fleet.session(timeout=10, limits={"memory": "256MiB"}) as s:
        assert s.state == "open"
        assert s.run("x = 41").status == "ok"
        r = s.run("print(x + 1)")
        assert r.stdout == "42\n" and r.output == 42
        assert r.report["session"]["outcome"] == "kept"
        # Past its own limit a call is interrupted; the names live on.
        r = s.run("import time\nwhile True:\n    time.sleep(0.01)", timeout=0.5)
        assert r.status == "timeout"
        assert r.exception["type"] == "KeyboardInterrupt"
        assert s.run("print(x)").stdout == "41\n"
        listed = fleet._get("/v1/sessions", params={"live": "true"})["sessions"]
        assert any(v["id"] == s.id and v["agent_id"] for v in listed)
    assert s.state == "closed"
    with pytest.raises(SessionLost) as e:
        s.run("print(x)")
    assert e.value.code == "session_lost" and "closed by request" in str(e.value)
