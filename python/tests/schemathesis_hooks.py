"""Schemathesis hooks for `test_openapi.py` (loaded through `SCHEMATHESIS_HOOKS`).

The fuzzed coordinator has no agents, so a `/v1/run`, a session's opening or call, or a lease
waits as long as it is told to (up to 600 s and 30 s): valid answers, but more time than a test
has. Waits are capped at
200 ms; every other part of every request is what schemathesis made.
"""

import schemathesis

WAITING = {"/v1/run", "/v1/agent/lease", "/v1/sessions", "/v1/sessions/{id}/run"}


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.operation.path not in WAITING or not isinstance(case.body, dict):
        return
    wait = case.body.get("wait_ms")
    if wait is None or (isinstance(wait, int) and not isinstance(wait, bool) and wait > 200):
        case.body["wait_ms"] = 200
