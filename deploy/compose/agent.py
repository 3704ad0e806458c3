"""The compose fleet's agent entry point: unmask /proc, then become `fleetbox agent`.

The jail mounts a /proc of its own for each run, which the kernel refuses while parts of the
container's /proc are hidden under other mounts (Docker's masked and read-only paths). `docker
run --security-opt systempaths=unconfined` leaves them off; a compose file cannot say that, so
this removes them with the container's CAP_SYS_ADMIN before the agent starts: the same /proc
`systempaths=unconfined` gives, nothing more."""

import ctypes
import os
import sys

MNT_DETACH = 2
libc = ctypes.CDLL(None, use_errno=True)
with open("/proc/self/mountinfo") as f:
    points = [line.split()[4] for line in f]
# Deepest first, so a mount is gone before the one it sits on.
masks = sorted((p for p in points if p.startswith("/proc/")), key=len, reverse=True)
for point in masks:
    if libc.umount2(point.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        print(f"agent.py: cannot unmask {point}: {os.strerror(err)}", file=sys.stderr)
        sys.exit(1)
os.execv("/usr/local/bin/fleetbox", ["fleetbox", *sys.argv[1:]])
