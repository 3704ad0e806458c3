# The warm jail's first Python code, run as `python3 -I -B -c <this>` inside a jail that is
# already complete (namespaces, new root, cgroup, rlimits, dropped privileges, Landlock,
# seccomp). The interpreter starts before the program exists; this says it is ready (one byte
# on stdin, a socket to the supervisor) and waits there for the run's environment
# (NUL-separated KEY=VALUE, then an empty entry or EOF), which the supervisor sends once it has written
# /code/main.py and the input. Then stdin becomes /dev/null and /code/main.py runs as
# `__main__`, as `python3 -I -B /code/main.py` would run it: same argv, globals, exit status,
# and tracebacks without this frame. Nothing here outlives the hand-over.
def _fleetbox_boot():
    import os
    import sys

    try:
        os.write(0, b"R")  # ready: the supervisor may hand over the program now
    except OSError:
        pass  # it already has: it took this jail while the interpreter was starting
    message = b""
    # The environment ends with an empty entry (or EOF).
    while not (message.endswith(b"\0\0") or message == b"\0"):
        chunk = os.read(0, 65536)
        if not chunk:
            break
        message += chunk
    env = {}
    for entry in message.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            env[os.fsdecode(key)] = os.fsdecode(value)
    os.environ.clear()
    os.environ.update(env)
    if env.get("FLEETBOX_SESSION") != "1":
        # A session's interpreter keeps the channel on stdin (it takes it and puts /dev/null).
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)

    path = "/code/main.py"
    sys.argv[:] = [path]
    main = sys.modules["__main__"]
    g = main.__dict__
    del g["_fleetbox_boot"]
    g["__file__"] = path
    g["__cached__"] = None
    g["__loader__"] = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", path)
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


_fleetbox_boot()
