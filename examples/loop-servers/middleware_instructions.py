"""The middleware's cost per request in machine instructions: runs
`fastapi_app` in process with `GET /fast`, each request in a task of its
own with a fresh context as uvicorn runs it, under valgrind's callgrind
twice (200 warm-up requests, then 0 and then REQUESTS more) and prints the
difference per request. An instruction count, unlike a time, does not move
with the machine's load (here within about 0.5 %: hash seeds and
addresses still vary between runs). It counts the C path and the
interpreter alike, which `middleware_opcodes.py` (Python instructions
only) does not.

    LOOPGUARD_APP_MIDDLEWARE=none|loopguard [LOOPGUARD_ASGI_NATIVE=off] \\
        python middleware_instructions.py [REQUESTS]

Needs valgrind (Debian: `apt-get install valgrind`); about a minute for
1,000 requests.
"""

import asyncio
import os
import re
import subprocess
import sys

WARM_UP = 200


def requests_counted(count):
    """Instructions of this script run with `count` requests after the
    warm-up, under callgrind."""
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, os.path.abspath(__file__), "--run", str(count)],
        env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True, check=True,
    )
    found = re.search(r"Collected : ([\d,]+)", run.stderr)
    if found is None:
        sys.exit(f"no instruction count in valgrind's output:\n{run.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def serve(count):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from asgi_driver import request_in_task
    from fastapi_app import app

    async def main():
        for _ in range(WARM_UP + count):
            await request_in_task(app)

    asyncio.run(main())


if len(sys.argv) > 2 and sys.argv[1] == "--run":
    serve(int(sys.argv[2]))
else:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    per_request = (requests_counted(count) - requests_counted(0)) / count
    path = ""
    if os.environ.get("LOOPGUARD_APP_MIDDLEWARE", "loopguard") == "loopguard":
        import loopguard_asgi

        path = " (C path)" if loopguard_asgi.NATIVE else " (pure-Python path)"
    print(f"{os.environ.get('LOOPGUARD_APP_MIDDLEWARE', 'loopguard')}{path}: "
          f"{per_request:,.0f} instructions per request")
