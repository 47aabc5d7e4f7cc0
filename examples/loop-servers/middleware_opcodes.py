"""The middleware's cost per request in bytecode instructions: drives
`fastapi_app` in-process with `GET /fast` (as middleware_overhead.py does)
under a tracer that counts every instruction executed, and prints the
count per request for the app and for loopguard_asgi's own functions.
Unlike a time, the count does not depend on how busy the machine is.

    LOOPGUARD_APP_MIDDLEWARE=none|loopguard python middleware_opcodes.py [REQUESTS]
"""

import asyncio
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from asgi_driver import request  # noqa: E402
from fastapi_app import app  # noqa: E402

counts = collections.Counter()


def tracer(frame, event, arg):
    frame.f_trace_opcodes = True
    code = frame.f_code
    key = f"loopguard_asgi {code.co_name}" if "loopguard_asgi" in code.co_filename else None

    def local(frame, event, arg):
        if event == "opcode":
            counts["all"] += 1
            if key:
                counts[key] += 1
        return local

    return local


async def main(count):
    for _ in range(20):
        await request(app)
    sys.settrace(tracer)
    for _ in range(count):
        await request(app)
    sys.settrace(None)


count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
asyncio.run(main(count))
mine = sum(n for key, n in counts.items() if key.startswith("loopguard_asgi"))
print(f"{os.environ.get('LOOPGUARD_APP_MIDDLEWARE', 'loopguard')}: {counts['all'] / count:.0f} instructions per request, "
      f"{mine / count:.0f} in loopguard_asgi")
for key, n in counts.most_common():
    if key.startswith("loopguard_asgi"):
        print(f"  {n / count:6.1f} {key}")
