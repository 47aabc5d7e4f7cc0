"""Drives an ASGI app in process, without sockets, for the middleware's
cost measurements (middleware_overhead.py, middleware_opcodes.py,
middleware_instructions.py): `GET /fast` with the scope uvicorn gives."""

import asyncio
import contextvars


async def receive():
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message):
    pass


def fast_scope():
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": "/fast", "raw_path": b"/fast",
        "root_path": "", "query_string": b"", "headers": [],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }


async def request(app):
    """One `GET /fast`, awaited in this task."""
    await app(fast_scope(), receive, send)


async def request_in_task(app):
    """One `GET /fast` in a task of its own with a fresh context, as
    uvicorn runs each request (so a task factory runs for it too)."""
    loop = asyncio.get_running_loop()
    await loop.create_task(app(fast_scope(), receive, send), context=contextvars.Context())
