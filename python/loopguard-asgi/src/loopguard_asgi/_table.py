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
# Encoded and cut texts, by text (methods and route templates are few).
_CUT_CACHE = {}
_CUT_CACHE_MAX = 4096


class Table:
    """One process's table. Writers are the loop threads; a slot is only
    ever written by the thread that runs its request."""

    def __init__(self, buffer):
        self.buffer = buffer
        view = memoryview(buffer)
        self.bytes = view
        self.u32 = view.cast("I")
        self.u64 = view.cast("Q")
        self.u32[0] = MAGIC
        self.u32[1] = STEPS_VERSION
        self._lock = threading.Lock()
        self._next_id = 1
        self._busy = bytearray(SLOTS)

    def start(self, method, path, tid):
        """Files a new request; its :class:`Slot`, or ``None`` when all 256
        slots are in flight."""
        with self._lock:
            request_id = self._next_id
            for _ in range(SLOTS):
                index = request_id % SLOTS
                if not self._busy[index]:
                    break
                request_id += 1
            else:
                return None
            self._busy[index] = 1
            self._next_id = request_id + 1
        return Slot(self, index, request_id, tid, method, path)

    def free(self, index):
        self._busy[index] = 0


def _encoded(text):
    """``text`` as UTF-8 bytes; the few methods and route templates an
    app has are cached."""
    data = _CUT_CACHE.get(text)
    if data is None:
        data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
        if len(_CUT_CACHE) < _CUT_CACHE_MAX:
            _CUT_CACHE[text] = data
    return data


class Slot:
    """A request's slot; its methods open and close write sections."""

    __slots__ = (
        "table", "index", "id", "tid", "base", "w32", "w64", "steps64",
        "seq", "depth", "step_began", "ended", "route_text",
    )

    def __init__(self, table, index, request_id, tid, method, path):
        """Files the request ``request_id`` in slot ``index``: one write
        section holding the whole slot and its step record."""
        self.table = table
        self.index = index
        self.id = request_id
        self.tid = tid
        self.base = base = RESERVED_BYTES + index * SLOT_BYTES
        self.w32 = w32 = base // 4
        self.w64 = base // 8
        self.steps64 = steps64 = (STEPS_AT + index * STEP_BYTES) // 8
        self.depth = 0
        self.step_began = 0
        self.ended = False
        self.route_text = None
        method = _encoded(method)
        path = path.encode("utf-8", "replace") if isinstance(path, str) else bytes(path)
        buffer, u32 = table.buffer, table.u32
        seq = (u32[w32] | 1) & _MASK32
        u32[w32] = seq
        _SLOT.pack_into(
            buffer, base + 4, 0, request_id, _now(), 0, FLAG_POLLS_TRACKED,
            min(len(method), METHOD_BYTES), 0, min(len(path), TEXT_BYTES),
            method, b"", path,
        )
        _STEP.pack_into(buffer, steps64 * 8, 0, tid, 0, 0, 0)
        self.seq = seq = (seq + 1) & _MASK32
        u32[w32] = seq

    def _open(self):
        self.seq = (self.seq + 1) & _MASK32
        self.table.u32[self.w32] = self.seq

    def _close(self):
        self.seq = (self.seq + 1) & _MASK32
        self.table.u32[self.w32] = self.seq

    def route(self, template):
        """The router matched: ``template`` is the route's path."""
        if self.ended or not isinstance(template, str) or template is self.route_text:
            return
        self.route_text = template
        buffer, base = self.table.buffer, self.base
        route = _encoded(template)[:TEXT_BYTES]
        self._open()
        at = base + TEXT + METHOD_BYTES
        buffer[at:at + len(route)] = route
        buffer[base + 32] |= FLAG_HAS_ROUTE
        buffer[base + 34] = len(route)
        self._close()

    def step_begin(self, tid):
        """A step of the request's coroutine (or of a child task) begins
        on thread ``tid``."""
        self.depth += 1
        if self.depth != 1 or self.ended:
            return
        began = _now()
        self.step_began = began
        u32 = self.table.u32
        seq = (self.seq + 1) & _MASK32
        u32[self.w32] = seq
        u32[self.w32 + 1] = tid
        self.table.u64[self.w64 + 3] = began
        self.seq = seq = (seq + 1) & _MASK32
        u32[self.w32] = seq

    def step_end(self, tid):
        self.depth -= 1
        if self.depth != 0 or self.ended:
            return
        ended = _now()
        began = self.step_began
        u32 = self.table.u32
        seq = (self.seq + 1) & _MASK32
        u32[self.w32] = seq
        u32[self.w32 + 1] = 0
        if ended - began >= LONG_STEP_NS:
            s64 = self.steps64
            u64 = self.table.u64
            u32[s64 * 2] = tid
            u64[s64 + 1] = began
            u64[s64 + 2] = ended
        self.seq = seq = (seq + 1) & _MASK32
        u32[self.w32] = seq

    def end(self):
        """The request ended: the slot keeps it, marked ended, until a new
        request takes the slot (the agent may still be matching a stall that
        ended just before)."""
        if self.ended:
            return
        self.ended = True
        table, w32 = self.table, self.w32
        u32 = table.u32
        seq = (self.seq + 1) & _MASK32
        u32[w32] = seq
        u32[w32 + 1] = 0
        table.u64[self.steps64 + 3] = _now()
        self.seq = seq = (seq + 1) & _MASK32
        u32[w32] = seq
        table._busy[self.index] = 0


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
    return Table(buffer)
