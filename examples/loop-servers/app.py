"""A tiny ASGI app for loopguard's end-to-end tests of the wait path.

`GET /sleep?ms=N` blocks the asyncio event loop with `time.sleep` (the bug
loopguard must find) and answers `{"blocked_ms": ...}`, its own timing of
the block; `GET /fast` answers at once. Run it with uvicorn:
`python -m uvicorn app:app --app-dir examples/loop-servers --port PORT`.
"""

import json
import time
from urllib.parse import parse_qs


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    query = parse_qs(scope.get("query_string", b"").decode())
    if scope["path"] == "/sleep":
        ms = int(query.get("ms", ["100"])[0])
        start = time.perf_counter()
        time.sleep(ms / 1000)
        body = {"blocked_ms": (time.perf_counter() - start) * 1000}
    else:
        body = {"ok": True}
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
