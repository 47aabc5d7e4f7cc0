"""A FastAPI app with the loopguard-asgi middleware, for loopguard's
end-to-end tests and the Python benchmark.

Every endpoint takes a tag in its path, so a report's path names the exact
request and its route the template. The blocking ones answer
`{"blocked_ms": ...}`, their own timing of the block:

- `GET /sleep/{tag}?ms=N`: `time.sleep` in an async endpoint;
- `GET /spin/{tag}?ms=N`: a CPU loop;
- `GET /socket/{tag}?ms=N`: a blocking socket `recv` that times out;
- `GET /child/{tag}?ms=N`: `time.sleep` in a task of an anyio task group;
- `GET /suspended/{tag}?ms=N`: `await asyncio.sleep` (blocks nothing);
- `GET /sync/{tag}?ms=N`: `time.sleep` in a sync endpoint (thread pool);
- `GET /fast`: answers at once.

`LOOPGUARD_APP_MIDDLEWARE` picks the middleware: `loopguard` (the default),
`fastapi-loopguard` (the PyPI package, for the benchmark) or `none`.
Run it with uvicorn: `python -m uvicorn fastapi_app:app --app-dir
examples/loop-servers --port PORT`.
"""

import asyncio
import os
import socket
import time

import anyio
from fastapi import FastAPI

app = FastAPI()

_middleware = os.environ.get("LOOPGUARD_APP_MIDDLEWARE", "loopguard")
if _middleware == "loopguard":
    from loopguard_asgi import LoopguardMiddleware

    app.add_middleware(LoopguardMiddleware)
elif _middleware == "fastapi-loopguard":
    from fastapi_loopguard import LoopGuardMiddleware

    app.add_middleware(LoopGuardMiddleware)


def _timed(block):
    start = time.perf_counter()
    block()
    return {"blocked_ms": (time.perf_counter() - start) * 1000}


def _spin(ms):
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def _recv(ms):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(ms / 1000)
        try:
            sock.recv(1)
        except socket.timeout:
            pass


@app.get("/fast")
async def fast():
    return {"ok": True}


@app.get("/sleep/{tag}")
async def sleep(tag: str, ms: int = 100):
    return _timed(lambda: time.sleep(ms / 1000))


@app.get("/spin/{tag}")
async def spin(tag: str, ms: int = 100):
    return _timed(lambda: _spin(ms))


@app.get("/socket/{tag}")
async def sock(tag: str, ms: int = 100):
    return _timed(lambda: _recv(ms))


@app.get("/child/{tag}")
async def child(tag: str, ms: int = 100):
    timing = {}

    async def blocker():
        await asyncio.sleep(0)
        timing.update(_timed(lambda: time.sleep(ms / 1000)))

    async with anyio.create_task_group() as group:
        group.start_soon(blocker)
    return timing


@app.get("/suspended/{tag}")
async def suspended(tag: str, ms: int = 100):
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms}


@app.get("/sync/{tag}")
def sync(tag: str, ms: int = 100):
    return _timed(lambda: time.sleep(ms / 1000))
