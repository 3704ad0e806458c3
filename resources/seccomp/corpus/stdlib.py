# The standard library a shard commonly reaches for: threads, subprocess-free multiprocessing
# primitives, files, time, hashing, compression, sqlite, sockets on loopback, select/poll.
import concurrent.futures
import gzip
import hashlib
import json
import os
import select
import socket
import sqlite3
import tempfile
import threading
import time
import zlib

with concurrent.futures.ThreadPoolExecutor(4) as ex:
    squares = list(ex.map(lambda x: x * x, range(100)))
lock = threading.Lock()
with lock:
    pass
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "f.gz")
    with gzip.open(p, "wb") as f:
        f.write(b"x" * 100000)
    os.stat(p)
    os.listdir(d)
    os.rename(p, p + ".1")
db = sqlite3.connect("db.sqlite")
db.execute("create table t (x)")
db.executemany("insert into t values (?)", [(i,) for i in range(100)])
db.commit()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
c = socket.create_connection(srv.getsockname())
s, _ = srv.accept()
c.sendall(b"ping")
select.select([s], [], [], 1)
poller = select.poll()
poller.register(s, select.POLLIN)
poller.poll(100)
data = s.recv(4)
time.sleep(0.01)
time.monotonic()
h = hashlib.sha256(zlib.compress(b"y" * 1000)).hexdigest()
os.urandom(16)
os.getpid(), os.getcwd(), os.cpu_count(), os.environ.get("HOME")
json.dump({"squares": sum(squares), "hash": h, "data": data.decode()}, open("output.json", "w"))
