# A `docker` container's first Python code, run as `python3 -I -B -c <this>`: the container's
# PID 1, so the program (its child) can neither signal it (PID 1 takes no signal it has no
# handler for from inside its namespace, SIGKILL included) nor, as it is non-dumpable, read or
# trace it; it reaps every orphan the program leaves, as an init does. The interpreter starts before the program exists and waits on stdin for the
# run: a 4-byte big-endian length and the run's environment (NUL-separated KEY=VALUE), then a
# 32-byte nonce. It forks the program (the child runs /code/main.py as `__main__`, as
# `python3 -I -B /code/main.py` would) with its stdout and stderr on pipes, forwards both while
# counting, and when the program has exited writes one record to stderr:
#
#     \0FLEETBOX-END <nonce> {"code": .., "signal": .., "utime_ms": .., "stime_ms": ..,
#                             "maxrss_kb": .., "stdout": <bytes>, "stderr": <bytes>}\n
#
# so the supervisor knows the exact status, CPU and peak memory, and how many bytes to wait for,
# without waiting for the daemon to notice that the container ended (tens of milliseconds).
# The nonce arrives after the fork, and this process makes itself non-dumpable first, so the
# program (same uid) can neither read the nonce nor ptrace or open this process: it can print
# lookalike records, which the supervisor ignores, or kill this process, which only makes the
# supervisor fall back to the daemon's own answer.
def _fleetbox_boot():
    # Everything the supervisor needs is imported before the program comes (an import after
    # the hand-over costs tens of milliseconds on the container's filesystem).
    import json
    import os
    import select
    import signal
    import sys

    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except Exception:
        prctl = None

    def read_exact(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(0, n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    os.write(2, b"\0FLEETBOX-READY\n")  # the supervisor may hand over the program now
    size = int.from_bytes(read_exact(4), "big")
    payload = read_exact(size)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if prctl is not None:
            prctl(4, 1, 0, 0, 0)  # the program is an ordinary process again
        env = {}
        for entry in payload.split(b"\0"):
            key, sep, value = entry.partition(b"=")
            if sep:
                env[os.fsdecode(key)] = os.fsdecode(value)
        os.environ.clear()
        os.environ.update(env)
        del payload, env
        path = "/code/main.py"
        sys.argv[:] = [path]
        g = sys.modules["__main__"].__dict__
        del g["_fleetbox_boot"], g["_fleetbox_supervise"]
        g["__file__"] = path
        g["__cached__"] = None
        g["__loader__"] = sys.modules["_frozen_importlib_external"].SourceFileLoader(
            "__main__", path
        )
        try:
            with open(path, "rb") as f:
                source = f.read()
            code = compile(source, path, "exec", dont_inherit=True)
            del source, f
            exec(code, g)
        except SystemExit:
            raise
        except BaseException as e:
            tb = e.__traceback__
            tb = tb.tb_next if tb is not None else None
            # The default hook prints the exception's own traceback, so drop this frame there.
            sys.excepthook(type(e), e.with_traceback(tb), tb)
            del e, tb
            sys.exit(1)
        return
    os.close(out_w)
    os.close(err_w)
    del payload
    # Exactly 32 bytes: waiting for the end of stdin would wait for the daemon to pass it on.
    nonce = read_exact(32)
    _fleetbox_supervise(pid, out_r, err_r, nonce, json, os, select, signal)


def _fleetbox_supervise(pid, out_r, err_r, nonce, json, os, select, signal):
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    targets = {out_r: 1, err_r: 2}
    counts = {1: 0, 2: 0}

    def forward(fd, data):
        view = memoryview(data)
        while view:
            try:
                n = os.write(targets[fd], view)
            except InterruptedError:
                continue
            view = view[n:]
        counts[targets[fd]] += len(data)

    status = None
    while status is None:
        # As PID 1 this process inherits every orphan: reap them all, the program last.
        while True:
            try:
                done, st, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                done = 0
            if done == 0:
                break
            if done == pid:
                status = (st, ru)
                break
        if status is not None:
            break
        try:
            ready, _, _ = select.select([*targets, wake_r], [], [])
        except InterruptedError:
            continue
        for fd in ready:
            if fd == wake_r:
                os.read(wake_r, 64)
                continue
            data = os.read(fd, 65536)
            if data:
                forward(fd, data)
            else:
                del targets[fd]
    # The program is gone: forward what it left in the pipes, not what a daemon it started may
    # write later.
    for fd in list(targets):
        os.set_blocking(fd, False)
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            forward(fd, data)
    st, ru = status
    record = {
        "code": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
        "signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
        "utime_ms": int(ru.ru_utime * 1000),
        "stime_ms": int(ru.ru_stime * 1000),
        "maxrss_kb": ru.ru_maxrss,
        "stdout": counts[1],
        "stderr": counts[2],
    }
    os.write(2, b"\0FLEETBOX-END " + nonce + b" " + json.dumps(record).encode() + b"\n")
    os._exit(0)


_fleetbox_boot()
