"""Unit tests of the middleware: what it writes into the in-flight table,
read back the way the agent reads it (slot layout and sequence lock)."""

import asyncio
import os
import struct
import sys
import threading
import time

import pytest

from loopguard_asgi import LoopguardMiddleware, _steps, _table


def slots():
    """Every filed slot, decoded: the agent's view of the table."""
    table = _table.table()
    data = bytes(table.buffer)
    assert struct.unpack_from("<II", data, 0) == (_table.MAGIC, _table.STEPS_VERSION)
    found = {}
    for index in range(_table.SLOTS):
        base = _table.RESERVED_BYTES + index * _table.SLOT_BYTES
        seq, tid, rid, started, step_started = struct.unpack_from("<IIQQQ", data, base)
        if rid == 0:
            continue
        flags, mlen, rlen, plen = data[base + 32:base + 36]
        text = base + _table.TEXT
        steps = _table.STEPS_AT + index * _table.STEP_BYTES
        long_tid, loop_tid, long_start, long_end, ended = struct.unpack_from("<IIQQQ", data, steps)
        found[rid] = dict(
            seq=seq,
            tid=tid,
            started=started,
            step_started=step_started,
            flags=flags,
            method=data[text:text + mlen].decode(),
            route=data[text + 16:text + 16 + rlen].decode() if flags & 1 else None,
            path=data[text + 80:text + 80 + plen].decode(),
            long_tid=long_tid,
            loop_tid=loop_tid,
            long=(long_start, long_end),
            ended=ended,
        )
    return found


class Route:
    def __init__(self, path):
        self.path = path


def call(app, path="/items/7", method="GET"):
    scope = {"type": "http", "method": method, "path": path}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    async def run():
        await app(scope, receive, send)

    asyncio.run(run())
    return sent


def newest():
    found = slots()
    rid = max(found)
    return rid, found[rid]


def test_a_request_is_filed_with_its_route_and_ended():
    seen = {}

    async def app(scope, receive, send):
        scope["route"] = Route("/items/{id}")
        rid, slot = newest()
        seen.update(slot)
        await send({"type": "http.response.start", "status": 200})

    call(LoopguardMiddleware(app))
    tid = threading.get_native_id()
    assert seen["method"] == "GET" and seen["path"] == "/items/7"
    assert seen["route"] == "/items/{id}"
    assert seen["tid"] == tid, "the step running now names the loop thread"
    assert seen["seq"] % 2 == 0
    assert seen["loop_tid"] == tid
    assert seen["flags"] & _table.FLAG_POLLS_TRACKED
    assert seen["ended"] == 0
    _, after = newest()
    assert after["ended"] >= after["started"] > 0
    assert after["tid"] == 0, "no step runs after the end"


def test_starlette_style_update_sets_the_route():
    async def app(scope, receive, send):
        scope.update({"route": Route("/users/{name}"), "endpoint": None})

    call(LoopguardMiddleware(app), path="/users/ada")
    _, slot = newest()
    assert slot["route"] == "/users/{name}"


def test_a_long_step_is_recorded_and_a_suspension_is_not_a_step():
    async def app(scope, receive, send):
        await asyncio.sleep(0.05)  # suspended: not a step
        time.sleep(0.02)  # blocks the loop: one long step

    call(LoopguardMiddleware(app))
    _, slot = newest()
    start, end = slot["long"]
    assert slot["long_tid"] == threading.get_native_id()
    assert 20e6 <= end - start < 45e6, (start, end)


def test_child_tasks_count_for_their_request_and_others_do_not():
    seen = {}

    async def child():
        await asyncio.sleep(0)
        rid, slot = newest()
        seen["child"] = slot["tid"]
        time.sleep(0.01)

    async def app(scope, receive, send):
        task = asyncio.get_running_loop().create_task(child())
        await task
        assert isinstance(task.get_coro(), _steps.Steps)

    call(LoopguardMiddleware(app))
    assert seen["child"] == threading.get_native_id()
    _, slot = newest()
    assert slot["long"][1] - slot["long"][0] >= 10e6


def test_an_existing_task_factory_is_chained():
    made = []

    def factory(loop, coro, **kwargs):
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def app(scope, receive, send):
        await asyncio.create_task(asyncio.sleep(0))

    async def run():
        asyncio.get_running_loop().set_task_factory(factory)
        scope = {"type": "http", "method": "GET", "path": "/"}
        await LoopguardMiddleware(app)(scope, None, None)

    asyncio.run(run())
    assert isinstance(made[0], _steps.Steps)
    assert not any(isinstance(c, _steps.Steps) for c in made[1:]), "tasks outside the request"


def test_exceptions_pass_through_and_end_the_request():
    async def app(scope, receive, send):
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError):
        call(LoopguardMiddleware(app))
    _, slot = newest()
    assert slot["ended"] > 0 and slot["seq"] % 2 == 0


def test_other_scopes_pass_untouched():
    seen = []

    async def app(scope, receive, send):
        seen.append(type(scope))

    async def run():
        await LoopguardMiddleware(app)({"type": "lifespan"}, None, None)

    before = max(slots(), default=0)
    asyncio.run(run())
    assert seen == [dict]
    assert max(slots(), default=0) == before


def test_texts_are_cut_to_their_width_and_slots_are_reused():
    async def app(scope, receive, send):
        pass

    mw = LoopguardMiddleware(app)
    for _ in range(_table.SLOTS + 3):
        call(mw, path="/" + "x" * 200, method="PROPFINDVERYLONGMETHOD")
    found = slots()
    assert len(found) == _table.SLOTS
    _, slot = newest()
    assert len(slot["path"]) == _table.TEXT_BYTES
    assert len(slot["method"]) == _table.METHOD_BYTES


def test_the_table_is_a_named_shared_mapping():
    _table.table()
    with open(f"/proc/{os.getpid()}/maps") as maps:
        names = [line.split()[-2] if line.rstrip().endswith("(deleted)") else "" for line in maps]
    assert "/memfd:loopguard-inflight" in names


def test_a_wrapped_child_task_can_be_cancelled_and_its_steps_end():
    seen = {}

    async def child():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise

    async def app(scope, receive, send):
        task = asyncio.get_running_loop().create_task(child())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen["repr"] = repr(task)

    call(LoopguardMiddleware(app))
    assert seen["cancelled"]
    assert "child" in seen["repr"] or "Steps" in seen["repr"]
    _, slot = newest()
    assert slot["tid"] == 0 and slot["seq"] % 2 == 0 and slot["ended"] > 0


def test_a_child_task_that_outlives_its_request_writes_nothing_after_the_end():
    """The slot may already hold the next request: a step of a task the
    ended request left running must not mark it."""
    holder = {}

    async def child():
        await asyncio.sleep(0.01)
        time.sleep(0.002)

    async def app(scope, receive, send):
        holder["task"] = asyncio.get_running_loop().create_task(child())

    mw = LoopguardMiddleware(app)

    async def run():
        await mw({"type": "http", "method": "GET", "path": "/outlive"}, None, None)
        rid, ended = newest()
        await holder["task"]
        return rid, ended

    rid, ended = asyncio.run(run())
    assert ended["ended"] > 0
    assert slots()[rid] == ended


def test_a_one_step_request_takes_three_write_sections():
    """Filing (with the step running), the route, the end (closing the
    step): after the filing, the slot's sequence moves by four."""
    seen = {}

    async def app(scope, receive, send):
        rid, slot = newest()
        seen["filed"] = slot["seq"]
        scope["route"] = Route("/items/{id}")

    call(LoopguardMiddleware(app))
    _, slot = newest()
    assert seen["filed"] % 2 == 0
    assert slot["seq"] - seen["filed"] == 4, "the route and the end: two sections"
    assert slot["tid"] == 0 and slot["ended"] > 0


def test_the_running_loop_is_looked_up_once_per_loop():
    """asyncio.get_running_loop() costs a getpid per call on Python 3.11."""
    looked_up = []
    real = asyncio.get_running_loop

    def counting():
        if "loopguard_asgi" in sys._getframe(1).f_code.co_filename:
            looked_up.append(1)
        return real()

    async def app(scope, receive, send):
        await asyncio.sleep(0)

    mw = LoopguardMiddleware(app)

    async def run():
        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            pass

        for _ in range(5):
            await mw({"type": "http", "method": "GET", "path": "/"}, receive, send)

    asyncio.get_running_loop = counting
    try:
        asyncio.run(run())
        asyncio.run(run())
    finally:
        asyncio.get_running_loop = real
    assert len(looked_up) == 2, "once for each new loop"


def test_the_c_path_runs_unless_it_is_turned_off():
    """CI builds the C module (gcc and the Python headers are there): a
    build that failed silently must not pass as the pure-Python path."""
    from loopguard_asgi import _impl

    if os.environ.get("LOOPGUARD_ASGI_NATIVE", "").lower() in ("0", "off", "false", "no"):
        assert _impl.native is None
    else:
        assert _impl.native is not None, _impl.why_not
        assert _steps.Steps is _impl.native.Steps


def _anonymous_table(kind):
    import mmap

    return kind(mmap.mmap(-1, _table.TABLE_BYTES))


def _masked(buffer):
    """The table's bytes with every time cut to whether it is set."""
    data = bytearray(buffer)
    for index in range(_table.SLOTS):
        base = _table.RESERVED_BYTES + index * _table.SLOT_BYTES
        steps = _table.STEPS_AT + index * _table.STEP_BYTES
        for at in (base + 16, base + 24, steps + 8, steps + 16, steps + 24):
            set_ = any(data[at:at + 8])
            data[at:at + 8] = bytes([set_]) + bytes(7)
    return bytes(data)


def test_both_paths_write_the_same_table():
    from loopguard_asgi import _impl

    if _impl.native is None:
        pytest.skip(f"no C path: {_impl.why_not}")
    tables = [_anonymous_table(_table.Table), _anonymous_table(_impl.native.Table)]
    for table in tables:
        slots = [table.start("GET", "/items/7", 11), table.start("PROPFINDVERYLONGMETHOD", "/" + "é" * 40, 12)]
        slots += [table.start(b"POST", b"/raw", 13), table.start("GET", "/\udcff", 14)]
        slots[0].route("/items/{id}")
        slots[0].route("/items/{id}")
        slots[1].route("/" + "r" * 100)
        slots[2].route(None)
        for slot in slots:
            slot.step_end(11)
            slot.step_begin(12)
            slot.step_begin(12)
            slot.step_end(12)
        slots[0].step_end(12)
        slots[0].step_begin(15)
        time.sleep(0.002)
        slots[0].step_last(15)
        slots[0].end()
        slots[0].end()
        slots[1].end()
        slots[1].route("/late")
        again = table.start("DELETE", "/again", 16)
        assert again is not None
    python, c = (_masked(table.buffer) for table in tables)
    assert python[:_table.STEPS_AT] == c[:_table.STEPS_AT], "slots"
    assert python[_table.STEPS_AT:] == c[_table.STEPS_AT:], "step records"


def test_the_pure_python_path_passes_the_same_tests():
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, LOOPGUARD_ASGI_NATIVE="off")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here, "-k", "not pure_python_path"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_a_missing_c_module_is_said_once(monkeypatch, caplog):
    from loopguard_asgi import _impl

    monkeypatch.setattr(_impl, "native", None)
    monkeypatch.setattr(_impl, "why_not", "its C module is not built: test")
    monkeypatch.setattr(_impl, "_chosen", False)
    monkeypatch.setattr(_impl, "_said", False)
    with caplog.at_level("WARNING", logger="loopguard_asgi"):
        _impl.say_once()
        _impl.say_once()
    said = [r.getMessage() for r in caplog.records if r.name == "loopguard_asgi"]
    assert len(said) == 1 and "pure-Python" in said[0] and "test" in said[0]
    monkeypatch.setattr(_impl, "_said", False)
    monkeypatch.setattr(_impl, "_chosen", True)
    caplog.clear()
    _impl.say_once()
    assert not caplog.records, "nothing said when the pure-Python path was chosen"


def test_a_forked_child_names_its_own_thread():
    """The thread id is cached per thread; the child of a fork runs on a
    thread of another id."""
    parent = _steps._native_id()
    assert parent == threading.get_native_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = _steps._native_id() == threading.get_native_id() != parent
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    said = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert said == b"1"
