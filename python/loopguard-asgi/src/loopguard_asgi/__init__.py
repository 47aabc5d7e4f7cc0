"""ASGI middleware for loopguard: the agent names the request behind every
asyncio loop stall, and the requests that waited for it.

FastAPI / Starlette::

    from loopguard_asgi import LoopguardMiddleware
    app.add_middleware(LoopguardMiddleware)

Any ASGI app: ``app = LoopguardMiddleware(app)``.
"""

import asyncio
from threading import get_ident

from . import _steps, _table
from ._impl import native
from ._steps import CURRENT, Steps, _native_id

__all__ = ["LoopguardMiddleware", "NATIVE"]
__version__ = "0.1.0"

# Whether the C path runs (see ``_impl``): ``pip install`` builds it where a
# C compiler and the Python headers are found.
NATIVE = native is not None


class _Scope(dict):
    """The request's scope, telling the slot the route template as soon as
    the router stores it (``scope["route"]``, Starlette and FastAPI). (The
    pure-Python path; ``_native.Scope`` is the C one.)"""

    __slots__ = ("_loopguard_slot",)

    def __setitem__(self, key, value, _set=dict.__setitem__):
        # Runs for every key the framework sets (FastAPI sets about eight
        # per request): kept to a call and a comparison.
        _set(self, key, value)
        if key == "route":
            self._loopguard_slot.route(getattr(value, "path", None))

    def update(self, *args, **kwargs):
        dict.update(self, *args, **kwargs)
        if args and "route" in args[0] or "route" in kwargs:
            self._loopguard_slot.route(getattr(self.get("route"), "path", None))

    def copy(self):
        return dict(self)


def _scope_for(scope, slot):
    tracked = _Scope(scope)
    tracked._loopguard_slot = slot
    return tracked


# The request's scope, tracked for its slot.
scope_for = native.scope_for if native is not None else _scope_for


class LoopguardMiddleware:
    """Keeps every HTTP request in the process's in-flight table, and marks
    its slot around every asyncio step that runs for it."""

    def __init__(self, app):
        self.app = app
        self._loop = None

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        table = _table.table()
        if table is None:
            return await self.app(scope, receive, send)
        tid = _native_id()
        slot = table.start(scope.get("method", ""), scope.get("path", ""), tid)
        if slot is None:
            return await self.app(scope, receive, send)
        loop = self._loop
        # asyncio's loops mark the thread running them; get_running_loop()
        # would cost a getpid system call per request on Python 3.11.
        if getattr(loop, "_thread_id", None) != get_ident():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                _steps.install(loop)
                self._loop = loop
        tracked = scope_for(scope, slot)
        token = CURRENT.set(slot)
        try:
            return await Steps(self.app(tracked, receive, send), slot, tid, True)
        finally:
            CURRENT.reset(token)
            slot.end()
