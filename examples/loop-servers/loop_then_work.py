"""An asyncio loop that closes, then its thread works on without it.

Usage: python loop_then_work.py GO_FILE BLOCK_MS AFTER_MS

The loop awaits short sleeps until GO_FILE exists; then it blocks itself
once for BLOCK_MS (a real loop stall: the loop cannot run meanwhile), awaits
a little more, and `asyncio.run` returns, closing the loop. The main thread
then spins AFTER_MS on the CPU with no loop at all: nothing waits behind it,
so it is no loop stall. Prints what it did as JSON lines.
"""

import asyncio
import json
import os
import sys
import time


def spin(ms):
    end = time.process_time() + ms / 1000
    while time.process_time() < end:
        pass


async def main(go_file, block_ms):
    while not os.path.exists(go_file):
        await asyncio.sleep(0.01)
    start = time.monotonic()
    time.sleep(block_ms / 1000)
    blocked_ms = (time.monotonic() - start) * 1000
    for _ in range(20):
        await asyncio.sleep(0.005)
    return blocked_ms


if __name__ == "__main__":
    go_file, block_ms, after_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    blocked_ms = asyncio.run(main(go_file, block_ms))
    print(json.dumps({"blocked_ms": blocked_ms}), flush=True)
    spin(after_ms)
    print(json.dumps({"worked_after_close_ms": after_ms}), flush=True)
