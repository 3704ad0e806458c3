"""An agent's tool: run code, get back one compact string."""

from __future__ import annotations

import os
from typing import Optional

from .sandbox import get_sandbox

TRUNCATED = "\n... [output truncated]"


def run_python_code(code: str, timeout: Optional[float] = 30) -> str:
    """Run ``code`` in the sandbox ``SANDBOX_TYPE`` names and return what a model should read:
    the program's output, or the error with its traceback; at most ``SANDBOX_MAX_OUTPUT_KB``
    KiB (default 64)."""
    limit = int(os.environ.get("SANDBOX_MAX_OUTPUT_KB", "64")) * 1024
    try:
        r = get_sandbox().execute(code=code, language="python", timeout=timeout)
    except Exception as e:  # the tool answers in text, never raises into the agent
        return f"Error: the sandbox could not run the code: {e}"
    status = r.meta.get("status", "ok" if r.exit_code == 0 else "error")
    if status == "ok":
        text = r.stdout if r.stdout.strip() else "(no output)"
    else:
        detail = r.stderr.strip() or r.meta.get("message") or ""
        text = f"Error ({status}, exit code {r.exit_code}):\n{detail}"
        if r.stdout.strip():
            text = f"{r.stdout.rstrip()}\n{text}"
    data = text.encode()
    if len(data) > limit:
        text = data[: max(0, limit - len(TRUNCATED))].decode(errors="ignore") + TRUNCATED
    return text
