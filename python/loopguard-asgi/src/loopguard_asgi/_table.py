"""The in-flight table loopguard's agent reads: one shared memory mapping
per process, found from ``/proc/PID/maps`` by its name
(``/memfd:loopguard-inflight (deleted)``), no symbol needed.

Layout (little-endian, the contract in ``loopguard-usdt`` ``INFLIGHT_*``):
an 8-byte header (magic ``lgif``, then the steps version), 256 slots of 184
bytes exactly as the Rust middleware's table (sequence lock, polling
thread, id, start, current step start, flags and lengths, method, route,
path), then one 32-byte step record per slot (the thread, start and end of
the request's last step that took 1 ms or more; the loop thread; when the
request ended, 0 while in flight). The step record is covered by its slot's
sequence lock.

Times are ``time.monotonic_ns()``: ``CLOCK_MONOTONIC``, the clock of the
agent's kernel events. Only the thread that runs a request's steps writes
its slot, inside a write section (sequence odd), so the agent keeps a copy
only when it saw the same even sequence before and after it.
"""

import collections
import itertools
import mmap
import os
import struct
import threading
import time

MAGIC = 0x6669676C  # b"lgif"
STEPS_VERSION = 1
RESERVED_BYTES = 8
SLOTS = 256
SLOT_BYTES = 184
METHOD_BYTES = 16
TEXT_BYTES = 64
TEXT = 40
STEPS_AT = RESERVED_BYTES + SLOTS * SLOT_BYTES
STEP_BYTES = 32
TABLE_BYTES = STEPS_AT + SLOTS * STEP_BYTES
MEMFD_NAME = "loopguard-inflight"

FLAG_HAS_ROUTE = 1
FLAG_POLLS_TRACKED = 2

# A step at least this long is kept in its slot's step record.
LONG_STEP_NS = 1_000_000

_MASK32 = 0xFFFFFFFF
_now = time.monotonic_ns
# polling tid, id, started, step started, flags, method, route, path lengths
_HEAD = struct.Struct("<IQQQBBBB")
# A whole slot after its sequence: the head, padding to TEXT, then the
# method, route and path texts (``s`` cuts and zero-pads each): one
# ``pack_into`` files a request.
_SLOT = struct.Struct(f"<IQQQBBBB{TEXT - 4 - _HEAD.size}x{METHOD_BYTES}s{TEXT_BYTES}s{TEXT_BYTES}s")
assert _SLOT.size == SLOT_BYTES - 4
# long step tid, loop tid, long step start and end, ended
_STEP = struct.Struct("<IIQQQ")
# The slots' first 32-bit words, and where a route text starts in a slot.
_W32 = RESERVED_BYTES // 4
_SLOT_W32 = SLOT_BYTES // 4
_ROUTE_AT = TEXT + METHOD_BYTES
# Encoded texts and their lengths cut to TEXT_BYTES, by text (methods and
# route templates are few).
_CUT_CACHE = {}
_CUT_CACHE_MAX = 4096


class Table:
    """One process's table (the pure-Python path; ``_native.Table`` is the
    C one). Writers are the loop threads; a slot is only
    ever written by the thread that runs its request.

    Free slots wait in a queue, the longest free first (an ended request
    stays readable for as long as possible); taking one and drawing an id
    are each a single operation under the GIL, so threads need no lock."""

    def __init__(self, buffer):
        self.buffer = buffer
        view = memoryview(buffer)
        self.bytes = view
        self.u32 = view.cast("I")
        self.u64 = view.cast("Q")
        self.u32[0] = MAGIC
        self.u32[1] = STEPS_VERSION
        self._ids = itertools.count(1)
        self._free = collections.deque(range(1, SLOTS))
        self._free.append(0)

    def start(self, method, path, tid):
        """Files a new request; its :class:`Slot`, or ``None`` when all 256
        slots are in flight."""
        try:
            index = self._free.popleft()
        except IndexError:
            return None
        return Slot(self, index, next(self._ids), tid, method, path)

    def free(self, index):
        self._free.append(index)


def _encoded(text):
    """``text`` as UTF-8 bytes cut to ``TEXT_BYTES``, and their length;
    the few methods and route templates an app has are cached."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    data = data[:TEXT_BYTES]
    cut = (data, len(data))
    if len(_CUT_CACHE) < _CUT_CACHE_MAX:
        _CUT_CACHE[text] = cut
    return cut


class Slot:
    """A request's slot; its methods open and close write sections (the
    sequence made odd, the fields, the sequence made even)."""

    __slots__ = (
        "table", "index", "id", "tid", "w32", "seq", "depth", "running",
        "step_began", "ended", "route_text",
    )

    def __init__(self, table, index, request_id, tid, method, path):
        """Files the request ``request_id`` in slot ``index``: one write
        section holding the whole slot and its step record, with the step
        that files it marked running on ``tid`` (the middleware files the
        request inside its first step, so that step needs no section of
        its own)."""
        self.table = table
        self.index = index
        self.id = request_id
        self.tid = tid
        self.w32 = w32 = _W32 + index * _SLOT_W32
        self.depth = 0
        self.running = True
        self.step_began = now = _now()
        self.ended = False
        self.route_text = None
        method, method_len = _CUT_CACHE.get(method) or _encoded(method)
        path = path.encode("utf-8", "replace") if isinstance(path, str) else bytes(path)
        buffer, u32 = table.buffer, table.u32
        seq = u32[w32] | 1
        u32[w32] = seq
        _SLOT.pack_into(
            buffer, w32 * 4 + 4, tid, request_id, now, now, FLAG_POLLS_TRACKED,
            min(method_len, METHOD_BYTES), 0, min(len(path), TEXT_BYTES),
            method, b"", path,
        )
        _STEP.pack_into(buffer, STEPS_AT + index * STEP_BYTES, 0, tid, 0, 0, 0)
        self.seq = seq = (seq + 1) & _MASK32
        u32[w32] = seq

    def route(self, template):
        """The router matched: ``template`` is the route's path."""
        if template is self.route_text or self.ended or not isinstance(template, str):
            return
        self.route_text = template
        route, length = _CUT_CACHE.get(template) or _encoded(template)
        buffer, u32, w32 = self.table.buffer, self.table.u32, self.w32
        at = w32 * 4 + _ROUTE_AT
        seq = (self.seq + 1) & _MASK32
        u32[w32] = seq
        buffer[at:at + length] = route
        buffer[w32 * 4 + 32] = FLAG_POLLS_TRACKED | FLAG_HAS_ROUTE
        buffer[w32 * 4 + 34] = length
        self.seq = seq = (seq + 1) & _MASK32
        u32[w32] = seq

    def step_begin(self, tid):
        """A step of the request's coroutine (or of a child task) begins
        on thread ``tid``."""
        self.depth += 1
        if self.depth != 1 or self.ended or self.running:
            return
        self.running = True
        self.step_began = began = _now()
        u32, w32 = self.table.u32, self.w32
        seq = (self.seq + 1) & _MASK32
        u32[w32] = seq
        u32[w32 + 1] = tid
        self.table.u64[(w32 >> 1) + 3] = began
        self.seq = seq = (seq + 1) & _MASK32
        u32[w32] = seq

    def step_end(self, tid):
        self.depth -= 1
        if self.depth != 0 or self.ended:
            return
        self.running = False
        ended = _now()
        u32, w32 = self.table.u32, self.w32
        seq = (self.seq + 1) & _MASK32
        u32[w32] = seq
        u32[w32 + 1] = 0
        if ended - self.step_began >= LONG_STEP_NS:
            self._long_step(tid, ended)
        self.seq = seq = (seq + 1) & _MASK32
        u32[w32] = seq

    def _long_step(self, tid, ended):
        """Keeps the step that ends at ``ended`` as the slot's long step
        (inside a write section)."""
        s64 = (STEPS_AT + self.index * STEP_BYTES) // 8
        u64 = self.table.u64
        self.table.u32[s64 * 2] = tid
        u64[s64 + 1] = self.step_began
        u64[s64 + 2] = ended

    def step_last(self, tid):
        """The request's own coroutine returned or raised: its step goes on
        in the middleware, which ends the request at once; :meth:`end`
        closes the step in the same write section."""
        self.depth -= 1

    def end(self):
        """The request ended: the slot keeps it, marked ended, until a new
        request takes the slot (the agent may still be matching a stall that
        ended just before). A step still marked running (the one that ends
        the request) is closed, and kept when it was long."""
        if self.ended:
            return
        self.ended = True
        table, w32 = self.table, self.w32
        u32 = table.u32
        ended = _now()
        seq = (self.seq + 1) & _MASK32
        u32[w32] = seq
        u32[w32 + 1] = 0
        if self.running and ended - self.step_began >= LONG_STEP_NS:
            self._long_step(self.tid, ended)
        self.running = False
        table.u64[(STEPS_AT + self.index * STEP_BYTES) // 8 + 3] = ended
        self.seq = seq = (seq + 1) & _MASK32
        u32[w32] = seq
        table._free.append(self.index)


_table = None
_table_made = False
_table_lock = threading.Lock()


def table():
    """This process's table, made on first use (and again in a forked child,
    which must not share its parent's); ``None`` where there is no
    ``memfd_create`` or ``LOOPGUARD_ASGI=off``."""
    global _table, _table_made
    if _table_made:
        return _table
    with _table_lock:
        if not _table_made:
            _table = _make()
            _table_made = True
    return _table


def _forget_in_child():
    global _table, _table_made
    _table, _table_made = None, False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _make():
    if os.environ.get("LOOPGUARD_ASGI", "").lower() in ("0", "off", "false", "no"):
        return None
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return None
    try:
        fd = memfd_create(MEMFD_NAME, getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
        return None
    try:
        os.ftruncate(fd, TABLE_BYTES)
        buffer = mmap.mmap(fd, TABLE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return None
    finally:
        os.close(fd)
    from . import _impl

    _impl.say_once()
    return (_impl.native.Table if _impl.native is not None else Table)(buffer)
