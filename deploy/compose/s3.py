"""The compose fleet's S3-protocol server: moto's, with the bucket the coordinators use made
before the server says it is healthy. Objects live in memory: a test server, not storage."""

import os
import signal
import threading
import urllib.request

from moto.server import ThreadedMotoServer

PORT = 5000
BUCKET = os.environ.get("FLEETBOX_S3_BUCKET", "fleet")

server = ThreadedMotoServer(ip_address="0.0.0.0", port=PORT)
server.start()
# An anonymous PUT makes the bucket in moto (it checks no signature by default).
urllib.request.urlopen(
    urllib.request.Request(f"http://127.0.0.1:{PORT}/{BUCKET}", method="PUT"), timeout=30
).read()
open("/tmp/ready", "w").close()
print(f"S3-protocol server on :{PORT} with bucket {BUCKET}", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop()
