"""Suites for loopguard's CI-guard end-to-end test: `loopguard run
--fail-on stall -- python -m pytest FILE` must fail the `*_blocking` files
(a test hits an async endpoint that blocks the loop) and pass the `*_clean`
ones (the same app, suspended on `await` or in the thread pool)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
