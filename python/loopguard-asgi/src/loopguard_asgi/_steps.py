"""Per-step tracking: asyncio runs one task step at a time on the loop
thread, and the request whose step runs while the loop is blocked is the
culprit. The request's own coroutine is wrapped (:class:`Steps`), and so is
every task created while the request's context is current (a task factory,
chaining any factory already installed), so anyio task groups count for
their request."""

import asyncio
import collections.abc
import contextvars
import os
import threading

from ._impl import native

# The slot of the request whose context is current.
CURRENT = contextvars.ContextVar("loopguard_request", default=None)

_local = threading.local()


def _native_id():
    """This thread's kernel id, without a system call after the first."""
    try:
        return _local.tid
    except AttributeError:
        _local.tid = threading.get_native_id()
        return _local.tid


def _forget_tid_in_child():
    # The forking thread goes on in the child with its thread-locals, under
    # another id.
    global _local
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_tid_in_child)


class Steps:
    """A coroutine that marks its request's slot around every step of
    ``coro``: the thread running it, and when the step began and ended.
    The step in which ``coro`` returns or raises ends with
    :meth:`Slot.step_end` for a child task, with :meth:`Slot.step_last`
    for the request's own coroutine (``own``), whose last step the
    middleware closes when it ends the request. (The pure-Python path;
    ``_native.Steps`` is the C one.)"""

    __slots__ = ("_coro", "_slot", "_tid", "_last")

    def __init__(self, coro, slot, tid, own=False):
        self._coro = coro
        self._slot = slot
        self._tid = tid
        self._last = slot.step_last if own else slot.step_end

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        slot, tid = self._slot, self._tid
        slot.step_begin(tid)
        try:
            value = self._coro.send(None)
        except BaseException:
            self._last(tid)
            raise
        slot.step_end(tid)
        return value

    def send(self, value):
        slot, tid = self._slot, self._tid
        slot.step_begin(tid)
        try:
            value = self._coro.send(value)
        except BaseException:
            self._last(tid)
            raise
        slot.step_end(tid)
        return value

    def throw(self, *args):
        slot, tid = self._slot, self._tid
        slot.step_begin(tid)
        try:
            value = self._coro.throw(*args)
        except BaseException:
            self._last(tid)
            raise
        slot.step_end(tid)
        return value

    def close(self):
        return self._coro.close()

    # What asyncio's task repr and debug tools read from a coroutine.
    @property
    def cr_frame(self):
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_running(self):
        return getattr(self._coro, "cr_running", False)

    @property
    def cr_await(self):
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_code(self):
        return getattr(self._coro, "cr_code", None)


collections.abc.Coroutine.register(Steps)


def _factory(previous):
    def loopguard_task_factory(loop, coro, **kwargs):
        context = kwargs.get("context")
        slot = context.get(CURRENT) if context is not None else CURRENT.get()
        if slot is not None and not slot.ended and not isinstance(coro, Steps):
            coro = Steps(coro, slot, _native_id())
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loopguard_task_factory.loopguard = True
    return loopguard_task_factory


if native is not None:
    Steps = native.Steps
    _native_id = native.native_id
    collections.abc.Coroutine.register(Steps)


def install(loop):
    """Installs the task factory on ``loop`` unless it is there."""
    current = loop.get_task_factory()
    if not getattr(current, "loopguard", False):
        loop.set_task_factory(native.TaskFactory(current, CURRENT) if native is not None else _factory(current))
