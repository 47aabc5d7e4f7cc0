"""The middleware's cost per request, no agent attached: drives
`fastapi_app` in-process (no sockets) with `GET /fast` and, per request,
one `await asyncio.sleep(0)` step, and prints the thread CPU microseconds per request (CPU time, so a busy
machine disturbs it less than wall time).

    LOOPGUARD_APP_MIDDLEWARE=none|loopguard|fastapi-loopguard \\
        python middleware_overhead.py [REQUESTS]
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastapi_app import app  # noqa: E402


async def main(count):
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    def scope():
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": "/fast", "raw_path": b"/fast",
            "root_path": "", "query_string": b"", "headers": [],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }

    for _ in range(200):
        await app(scope(), receive, send)
    start = time.thread_time()
    for _ in range(count):
        await app(scope(), receive, send)
    return (time.thread_time() - start) / count * 1e6


count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
print(f"{os.environ.get('LOOPGUARD_APP_MIDDLEWARE', 'loopguard')} {asyncio.run(main(count)):.2f} us/request")
