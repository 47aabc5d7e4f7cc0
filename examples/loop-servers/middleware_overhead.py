"""The middleware's cost per request, no agent attached: drives
`fastapi_app` in-process (no sockets) with `GET /fast` and prints the
thread CPU microseconds per request (CPU time, so a busy machine disturbs
it less than wall time).

    LOOPGUARD_APP_MIDDLEWARE=none|loopguard|fastapi-loopguard \\
        python middleware_overhead.py [REQUESTS]
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from asgi_driver import request  # noqa: E402
from fastapi_app import app  # noqa: E402


async def main(count):
    for _ in range(200):
        await request(app)
    start = time.thread_time()
    for _ in range(count):
        await request(app)
    return (time.thread_time() - start) / count * 1e6


count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
print(f"{os.environ.get('LOOPGUARD_APP_MIDDLEWARE', 'loopguard')} {asyncio.run(main(count)):.2f} us/request")
