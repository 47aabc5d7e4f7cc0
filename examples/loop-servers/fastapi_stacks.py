"""A FastAPI app for loopguard's Python stack end-to-end tests (issue #29).

Each handler blocks the event loop in its own way; the lines marked
`# LINE:name` are the ones loopguard must name (the test reads them from
this file). `GET /fast` answers at once. Run it with uvicorn:
`python -m uvicorn fastapi_stacks:app --app-dir examples/loop-servers`.
"""

import socket
import sys
import time

from fastapi import FastAPI

app = FastAPI()
# `/deep` recurses 1,000 frames below the framework's.
sys.setrecursionlimit(5000)


@app.get("/fast")
async def fast():
    return {"ok": True}


@app.get("/sleep")
async def sleep_handler(ms: int = 100):
    start = time.perf_counter()
    time.sleep(ms / 1000)  # LINE:sleep
    return {"blocked_ms": (time.perf_counter() - start) * 1000}


@app.get("/doze")
async def doze_handler(ms: int = 100):
    start = time.perf_counter()
    time.sleep(ms / 1000)  # LINE:doze
    return {"blocked_ms": (time.perf_counter() - start) * 1000}


def spin(ms):
    end = time.perf_counter() + ms / 1000
    n = 0
    while time.perf_counter() < end: n += 1  # LINE:spin
    return n


@app.get("/spin")
async def spin_handler(ms: int = 100):
    start = time.perf_counter()
    spin(ms)  # LINE:spin_call
    return {"blocked_ms": (time.perf_counter() - start) * 1000}


@app.get("/recv")
async def recv_handler(port: int, ms: int = 100):
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(str(ms).encode() + b"\n")
        conn.recv(1)  # LINE:recv
    return {"blocked_ms": (time.perf_counter() - start) * 1000}


def deep(n, ms):
    if n == 0:
        time.sleep(ms / 1000)  # LINE:deep
        return
    deep(n - 1, ms)  # LINE:deep_call


@app.get("/deep")
async def deep_handler(depth: int = 1000, ms: int = 100):
    start = time.perf_counter()
    deep(depth, ms)
    return {"blocked_ms": (time.perf_counter() - start) * 1000}
