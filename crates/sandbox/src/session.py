# A session's interpreter: the program of a long run that keeps its globals between calls.
#
# It gets its channel to the supervisor on fd 0 (a stream socket) and replaces fd 0 with
# /dev/null for the code it runs. Frames both ways are a 4-byte big-endian length and JSON.
# The supervisor sends {"code", "timeout_ms", "max_output", "call"}; this runs the code in one
# `__main__` namespace kept across calls, with fd 1 and fd 2 on pipes it drains (keeping the
# first `max_output` bytes of each and counting the rest), and SIGALRM raising
# KeyboardInterrupt at the call's time limit. It answers {"status", "stdout", "stderr", ...}.
# Everything it says is the program's own claim: the supervisor bounds what it reads, measures
# the wall time itself and ends the session when a call does not answer in time.
def _fleetbox_session():
    import hashlib
    import json
    import linecache
    import os
    import resource
    import signal
    import struct
    import sys
    import threading
    import traceback

    home = os.getcwd()  # the workspace, whatever a call changes its directory to
    chan = os.dup(0)
    os.set_inheritable(chan, False)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    main = sys.modules["__main__"]
    g = main.__dict__
    g.pop("_fleetbox_session", None)
    g.pop("__file__", None)
    g.pop("__cached__", None)
    sys.argv[:] = [""]

    def read_exact(n):
        chunks = []
        while n:
            chunk = os.read(chan, min(n, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def send(obj):
        data = json.dumps(obj).encode()
        os.write(chan, struct.pack(">I", len(data)))
        view = memoryview(data)
        while view:
            view = view[os.write(chan, view) :]

    class Drain(threading.Thread):
        """Reads one end of a pipe until EOF: the first `cap` bytes kept, all of them hashed."""

        def __init__(self, fd, cap):
            super().__init__(daemon=True)
            self.fd, self.cap = fd, cap
            self.kept, self.total = bytearray(), 0
            self.sha = hashlib.sha256()

        def run(self):
            while True:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.total += len(chunk)
                self.sha.update(chunk)
                room = self.cap - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]
            os.close(self.fd)

        def result(self):
            return {
                "text": self.kept.decode("utf-8", "replace"),
                "bytes": self.total,
                "truncated": self.total > len(self.kept),
                "sha256": self.sha.hexdigest(),
            }

    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise KeyboardInterrupt("the call's time limit")

    def listed_name(rel):
        """A name as reports list it (see `workspace::listed_name`): a backslash written
        `\\\\`, a byte that is not UTF-8 written `\\xNN`."""
        out = []
        for c in rel:
            if c == "\\":
                out.append("\\\\")
            elif "\udc80" <= c <= "\udcff":
                out.append("\\x%02x" % (ord(c) - 0xDC00))
            else:
                out.append(c)
        return "".join(out)

    def regular_files(bound=10000):
        """The workspace's regular files: relative name -> what tells a change. Past `bound`
        entries the walk stops (and says so)."""
        found, seen = {}, 0
        for root, dirs, names in os.walk(home, followlinks=False):
            dirs.sort()
            for name in sorted(names):
                seen += 1
                if seen > bound:
                    return found, True
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if st.st_mode & 0o170000 == 0o100000:
                    found[os.path.relpath(path, home)] = (
                        st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
                    )
        return found, False

    def changed_files(before, limit=100):
        """Files new or changed since `before` (the walk after the last call, or the
        workspace as the session found it), and the walk to compare the next call with."""
        now, truncated = regular_files()
        files = []
        for rel in sorted(now):
            if before.get(rel) == now[rel]:
                continue
            if len(files) >= limit:
                truncated = True
                break
            digest = None
            if now[rel][1] <= 16 << 20:
                try:
                    path = os.path.join(home, rel)
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    with os.fdopen(fd, "rb") as f:
                        digest = hashlib.sha256(f.read(16 << 20)).hexdigest()
                except OSError:
                    pass
            files.append({"path": listed_name(rel), "bytes": now[rel][1], "sha256": digest})
        return files, truncated, now

    # What the session started with (its input, its files) is not any call's.
    walked, _ = regular_files()
    send({"ready": True, "python": "%d.%d.%d" % sys.version_info[:3]})
    while True:
        try:
            (n,) = struct.unpack(">I", read_exact(4))
            call = json.loads(read_exact(n))
        except (EOFError, OSError):
            return
        cap = max(0, int(call.get("max_output", 1 << 20)))
        name = "<call %d>" % int(call.get("call", 0))
        source = call.get("code", "")
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        drains = []
        for fd in (1, 2):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            drain = Drain(r, cap)
            drain.start()
            drains.append(drain)
        status, exit_code = "ok", 0
        fired.clear()
        before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN
        )
        timeout = max(1, int(call.get("timeout_ms", 10000))) / 1000.0
        try:
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
            code = compile(source, name, "exec", dont_inherit=True)
            exec(code, g)
        except SystemExit as e:
            if e.code not in (None, 0):
                status, exit_code = "error", e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
        except BaseException as e:
            status, exit_code = ("timeout" if fired else "error"), 1
            tb = e.__traceback__
            tb = tb.tb_next if tb is not None else None
            try:
                traceback.print_exception(type(e), e.with_traceback(tb), tb)
            except BaseException:
                pass
            del e, tb
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        if fired:
            status = "timeout"
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        for drain in drains:
            # A child that kept the pipe open must not hold the answer back.
            drain.join(0.5)
        after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN
        )
        files, files_truncated, walked = changed_files(walked)
        out, err = drains[0].result(), drains[1].result()
        send(
            {
                "status": status,
                "exit_code": exit_code,
                "stdout": out,
                "stderr": err,
                "cpu_user_ms": int(
                    1000 * sum(a.ru_utime - b.ru_utime for a, b in zip(after, before))
                ),
                "cpu_sys_ms": int(
                    1000 * sum(a.ru_stime - b.ru_stime for a, b in zip(after, before))
                ),
                "peak_memory_bytes": max(a.ru_maxrss for a in after) * 1024,
                "files": files,
                "files_truncated": files_truncated,
            }
        )


_fleetbox_session()
