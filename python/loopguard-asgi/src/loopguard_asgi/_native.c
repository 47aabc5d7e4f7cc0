/*
 * loopguard_asgi._native: the middleware's per-request and per-step work in
 * C. The same objects as the pure-Python modules (_table.py, _steps.py,
 * __init__.py's scope), writing the same table the same way: the layout
 * and the sequence lock are described in _table.py, whose constants the
 * module's init checks against its own.
 *
 * Only the thread running a request's steps writes its slot (the GIL holds
 * across each call here), inside a write section: the sequence made odd,
 * the fields, the sequence made even, with compiler barriers between (x86
 * keeps stores in order; the agent reads from another process).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x6669676Cu /* "lgif" */
#define STEPS_VERSION 1u
#define RESERVED_BYTES 8
#define SLOTS 256
#define SLOT_BYTES 184
#define METHOD_BYTES 16
#define TEXT_BYTES 64
#define TEXT 40
#define STEPS_AT (RESERVED_BYTES + SLOTS * SLOT_BYTES)
#define STEP_BYTES 32
#define TABLE_BYTES (STEPS_AT + SLOTS * STEP_BYTES)

#define FLAG_HAS_ROUTE 1
#define FLAG_POLLS_TRACKED 2
#define LONG_STEP_NS 1000000ull

/* Offsets inside a slot and a step record. */
#define SLOT_SEQ 0
#define SLOT_TID 4
#define SLOT_ID 8
#define SLOT_STARTED 16
#define SLOT_STEP_STARTED 24
#define SLOT_FLAGS 32
#define SLOT_METHOD_LEN 33
#define SLOT_ROUTE_LEN 34
#define SLOT_PATH_LEN 35
#define SLOT_METHOD TEXT
#define SLOT_ROUTE (TEXT + METHOD_BYTES)
#define SLOT_PATH (TEXT + METHOD_BYTES + TEXT_BYTES)
#define STEP_LONG_TID 0
#define STEP_LOOP_TID 4
#define STEP_LONG_START 8
#define STEP_LONG_END 16
#define STEP_ENDED 24

#define BARRIER() __atomic_thread_fence(__ATOMIC_RELEASE)

static inline void put32(unsigned char *at, uint32_t value) { memcpy(at, &value, 4); }
static inline void put64(unsigned char *at, uint64_t value) { memcpy(at, &value, 8); }
static inline uint32_t get32(const unsigned char *at)
{
    uint32_t value;
    memcpy(&value, at, 4);
    return value;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* This thread's kernel id, one system call per thread (forgotten in a
 * forked child, whose thread has another). */
static __thread uint32_t cached_tid;

static void forget_tid(void) { cached_tid = 0; }

static inline uint32_t native_tid(void)
{
    if (cached_tid == 0)
        cached_tid = (uint32_t)syscall(SYS_gettid);
    return cached_tid;
}

/* ------------------------------------------------------------------ Table */

typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* the shared mapping, held while the table lives */
    unsigned char *base;
    PyObject *buffer;    /* the mapping object, for readers (tests) */
    uint64_t next_id;
    /* Free slots in a ring, the longest free first. */
    uint16_t free_ring[SLOTS];
    unsigned free_head;
    unsigned free_count;
} TableObject;

typedef struct {
    PyObject_HEAD
    TableObject *table;
    unsigned char *at;   /* the slot */
    unsigned char *step; /* its step record */
    PyObject *route_text;
    uint64_t id;
    uint64_t step_began;
    uint32_t seq;
    uint32_t tid;
    int depth;
    int index;
    char running;
    char ended;
} SlotObject;

static PyTypeObject TableType;
static PyTypeObject SlotType;

static void table_free_slot(TableObject *table, int index)
{
    table->free_ring[(table->free_head + table->free_count) % SLOTS] = (uint16_t)index;
    table->free_count++;
}

static PyObject *table_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *buffer;
    static char *names[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:Table", names, &buffer))
        return NULL;
    TableObject *self = (TableObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (self->view.len < TABLE_BYTES) {
        PyBuffer_Release(&self->view);
        self->view.obj = NULL;
        Py_DECREF(self);
        PyErr_Format(PyExc_ValueError, "the table needs %d bytes", TABLE_BYTES);
        return NULL;
    }
    self->base = self->view.buf;
    Py_INCREF(buffer);
    self->buffer = buffer;
    self->next_id = 1;
    put32(self->base, MAGIC);
    put32(self->base + 4, STEPS_VERSION);
    self->free_head = 0;
    self->free_count = 0;
    for (int index = 1; index < SLOTS; index++)
        table_free_slot(self, index);
    table_free_slot(self, 0);
    return (PyObject *)self;
}

static void table_dealloc(TableObject *self)
{
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    Py_XDECREF(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* `text` (str, or bytes-like) as bytes: a pointer and a length, valid
 * while *keep lives (a str's UTF-8 is cached in the str itself). */
static int text_bytes(PyObject *text, const char **data, Py_ssize_t *len, PyObject **keep)
{
    *keep = NULL;
    if (PyUnicode_Check(text)) {
        *data = PyUnicode_AsUTF8AndSize(text, len);
        if (*data != NULL)
            return 0;
        PyErr_Clear();
        *keep = PyUnicode_AsEncodedString(text, "utf-8", "replace");
    } else if (PyBytes_Check(text)) {
        *data = PyBytes_AS_STRING(text);
        *len = PyBytes_GET_SIZE(text);
        return 0;
    } else {
        *keep = PyBytes_FromObject(text);
    }
    if (*keep == NULL)
        return -1;
    *data = PyBytes_AS_STRING(*keep);
    *len = PyBytes_GET_SIZE(*keep);
    return 0;
}

/* Copies at most `width` bytes of `data` into `at`, zero-filling the rest
 * of the field; returns the length kept. */
static unsigned put_text(unsigned char *at, size_t width, const char *data, Py_ssize_t len)
{
    size_t kept = (size_t)len < width ? (size_t)len : width;
    memcpy(at, data, kept);
    memset(at + kept, 0, width - kept);
    return (unsigned)kept;
}

static inline void section_open(SlotObject *slot)
{
    slot->seq = slot->seq + 1;
    put32(slot->at + SLOT_SEQ, slot->seq);
    BARRIER();
}

static inline void section_close(SlotObject *slot)
{
    BARRIER();
    slot->seq = slot->seq + 1;
    put32(slot->at + SLOT_SEQ, slot->seq);
}

/* Files a new request; its Slot, or None when every slot is in flight.
 * One write section holds the whole slot and its step record, with the
 * step that files it marked running on `tid`. */
static PyObject *table_start(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "start(method, path, tid)");
        return NULL;
    }
    unsigned long tid = PyLong_AsUnsignedLong(args[2]);
    if (tid == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (self->free_count == 0)
        Py_RETURN_NONE;
    const char *method, *path;
    Py_ssize_t method_len, path_len;
    PyObject *keep_method, *keep_path;
    if (text_bytes(args[0], &method, &method_len, &keep_method) < 0)
        return NULL;
    if (text_bytes(args[1], &path, &path_len, &keep_path) < 0) {
        Py_XDECREF(keep_method);
        return NULL;
    }
    SlotObject *slot = PyObject_New(SlotObject, &SlotType);
    if (slot == NULL) {
        Py_XDECREF(keep_method);
        Py_XDECREF(keep_path);
        return NULL;
    }
    int index = self->free_ring[self->free_head];
    self->free_head = (self->free_head + 1) % SLOTS;
    self->free_count--;
    Py_INCREF(self);
    slot->table = self;
    slot->index = index;
    slot->at = self->base + RESERVED_BYTES + (size_t)index * SLOT_BYTES;
    slot->step = self->base + STEPS_AT + (size_t)index * STEP_BYTES;
    slot->route_text = NULL;
    slot->id = self->next_id++;
    slot->tid = (uint32_t)tid;
    slot->depth = 0;
    slot->running = 1;
    slot->ended = 0;
    uint64_t now = now_ns();
    slot->step_began = now;

    unsigned char *at = slot->at;
    slot->seq = get32(at + SLOT_SEQ) | 1;
    put32(at + SLOT_SEQ, slot->seq);
    BARRIER();
    put32(at + SLOT_TID, slot->tid);
    put64(at + SLOT_ID, slot->id);
    put64(at + SLOT_STARTED, now);
    put64(at + SLOT_STEP_STARTED, now);
    at[SLOT_FLAGS] = FLAG_POLLS_TRACKED;
    at[SLOT_METHOD_LEN] = (unsigned char)put_text(at + SLOT_METHOD, METHOD_BYTES, method, method_len);
    at[SLOT_ROUTE_LEN] = 0;
    memset(at + SLOT_ROUTE, 0, TEXT_BYTES);
    at[SLOT_PATH_LEN] = (unsigned char)put_text(at + SLOT_PATH, TEXT_BYTES, path, path_len);
    memset(at + SLOT_PATH_LEN + 1, 0, TEXT - SLOT_PATH_LEN - 1);
    memset(slot->step, 0, STEP_BYTES);
    put32(slot->step + STEP_LOOP_TID, slot->tid);
    section_close(slot);
    Py_XDECREF(keep_method);
    Py_XDECREF(keep_path);
    return (PyObject *)slot;
}

static PyMethodDef table_methods[] = {
    {"start", (PyCFunction)(void (*)(void))table_start, METH_FASTCALL,
     "start(method, path, tid): files a new request; its Slot, or None when all slots are in flight"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef table_members[] = {
    {"buffer", T_OBJECT, offsetof(TableObject, buffer), READONLY, "the shared mapping"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopguard_asgi._native.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Table(buffer): the in-flight table in a shared writable mapping",
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_members = table_members,
};

/* ------------------------------------------------------------------- Slot */

static void slot_route(SlotObject *self, PyObject *template)
{
    if (template == self->route_text || self->ended || template == NULL || !PyUnicode_Check(template))
        return;
    const char *data;
    Py_ssize_t len;
    PyObject *keep;
    if (text_bytes(template, &data, &len, &keep) < 0) {
        PyErr_Clear();
        return;
    }
    Py_INCREF(template);
    Py_XSETREF(self->route_text, template);
    unsigned char *at = self->at;
    section_open(self);
    size_t kept = (size_t)len < TEXT_BYTES ? (size_t)len : TEXT_BYTES;
    memcpy(at + SLOT_ROUTE, data, kept);
    at[SLOT_FLAGS] = FLAG_POLLS_TRACKED | FLAG_HAS_ROUTE;
    at[SLOT_ROUTE_LEN] = (unsigned char)kept;
    section_close(self);
    Py_XDECREF(keep);
}

/* Keeps the step that ends at `ended` as the slot's long step (inside a
 * write section). */
static inline void slot_long_step(SlotObject *self, uint32_t tid, uint64_t ended)
{
    put32(self->step + STEP_LONG_TID, tid);
    put64(self->step + STEP_LONG_START, self->step_began);
    put64(self->step + STEP_LONG_END, ended);
}

static inline void slot_step_begin(SlotObject *self, uint32_t tid)
{
    self->depth++;
    if (self->depth != 1 || self->ended || self->running)
        return;
    self->running = 1;
    uint64_t began = now_ns();
    self->step_began = began;
    section_open(self);
    put32(self->at + SLOT_TID, tid);
    put64(self->at + SLOT_STEP_STARTED, began);
    section_close(self);
}

static inline void slot_step_end(SlotObject *self, uint32_t tid)
{
    self->depth--;
    if (self->depth != 0 || self->ended)
        return;
    self->running = 0;
    uint64_t ended = now_ns();
    section_open(self);
    put32(self->at + SLOT_TID, 0);
    if (ended - self->step_began >= LONG_STEP_NS)
        slot_long_step(self, tid, ended);
    section_close(self);
}

/* The request's own coroutine returned or raised: its step goes on in the
 * middleware, which ends the request at once; end closes the step. */
static inline void slot_step_last(SlotObject *self) { self->depth--; }

static void slot_end(SlotObject *self)
{
    if (self->ended)
        return;
    self->ended = 1;
    uint64_t ended = now_ns();
    section_open(self);
    put32(self->at + SLOT_TID, 0);
    if (self->running && ended - self->step_began >= LONG_STEP_NS)
        slot_long_step(self, self->tid, ended);
    self->running = 0;
    put64(self->step + STEP_ENDED, ended);
    section_close(self);
    table_free_slot(self->table, self->index);
}

static int tid_arg(PyObject *arg, uint32_t *tid)
{
    unsigned long value = PyLong_AsUnsignedLong(arg);
    if (value == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    *tid = (uint32_t)value;
    return 0;
}

static PyObject *slot_py_route(SlotObject *self, PyObject *template)
{
    slot_route(self, template);
    Py_RETURN_NONE;
}

static PyObject *slot_py_step_begin(SlotObject *self, PyObject *arg)
{
    uint32_t tid;
    if (tid_arg(arg, &tid) < 0)
        return NULL;
    slot_step_begin(self, tid);
    Py_RETURN_NONE;
}

static PyObject *slot_py_step_end(SlotObject *self, PyObject *arg)
{
    uint32_t tid;
    if (tid_arg(arg, &tid) < 0)
        return NULL;
    slot_step_end(self, tid);
    Py_RETURN_NONE;
}

static PyObject *slot_py_step_last(SlotObject *self, PyObject *arg)
{
    (void)arg;
    slot_step_last(self);
    Py_RETURN_NONE;
}

static PyObject *slot_py_end(SlotObject *self, PyObject *unused)
{
    (void)unused;
    slot_end(self);
    Py_RETURN_NONE;
}

static void slot_dealloc(SlotObject *self)
{
    Py_XDECREF(self->route_text);
    Py_XDECREF(self->table);
    PyObject_Free(self);
}

static PyObject *slot_get_ended(SlotObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->ended);
}

static PyObject *slot_get_id(SlotObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->id);
}

static PyObject *slot_get_index(SlotObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->index);
}

static PyMethodDef slot_methods[] = {
    {"route", (PyCFunction)slot_py_route, METH_O, "route(template): the router matched"},
    {"step_begin", (PyCFunction)slot_py_step_begin, METH_O, "step_begin(tid)"},
    {"step_end", (PyCFunction)slot_py_step_end, METH_O, "step_end(tid)"},
    {"step_last", (PyCFunction)slot_py_step_last, METH_O, "step_last(tid)"},
    {"end", (PyCFunction)slot_py_end, METH_NOARGS, "end(): the request ended"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef slot_getset[] = {
    {"ended", (getter)slot_get_ended, NULL, "whether the request ended", NULL},
    {"id", (getter)slot_get_id, NULL, "the request's id", NULL},
    {"index", (getter)slot_get_index, NULL, "the slot's index", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SlotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopguard_asgi._native.Slot",
    .tp_basicsize = sizeof(SlotObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A request's slot (made by Table.start)",
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_methods = slot_methods,
    .tp_getset = slot_getset,
};

/* ------------------------------------------------------------------ Steps */

typedef struct {
    PyObject_HEAD
    PyObject *coro;
    SlotObject *slot;
    uint32_t tid;
    char own; /* the request's own coroutine: its last step is the middleware's */
} StepsObject;

static PyTypeObject StepsType;

static PyObject *steps_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *coro, *slot;
    unsigned long tid;
    int own = 0;
    static char *names[] = {"coro", "slot", "tid", "own", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!k|p:Steps", names, &coro, &SlotType, &slot, &tid, &own))
        return NULL;
    StepsObject *self = (StepsObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(coro);
    self->coro = coro;
    Py_INCREF(slot);
    self->slot = (SlotObject *)slot;
    self->tid = (uint32_t)tid;
    self->own = (char)own;
    return (PyObject *)self;
}

static StepsObject *steps_make(PyObject *coro, SlotObject *slot, uint32_t tid, int own)
{
    StepsObject *self = PyObject_GC_New(StepsObject, &StepsType);
    if (self == NULL)
        return NULL;
    Py_INCREF(coro);
    self->coro = coro;
    Py_INCREF(slot);
    self->slot = slot;
    self->tid = tid;
    self->own = (char)own;
    PyObject_GC_Track(self);
    return self;
}

static int steps_traverse(StepsObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->coro);
    Py_VISIT(self->slot);
    return 0;
}

static int steps_clear(StepsObject *self)
{
    Py_CLEAR(self->coro);
    Py_CLEAR(self->slot);
    return 0;
}

static void steps_dealloc(StepsObject *self)
{
    PyObject_GC_UnTrack(self);
    steps_clear(self);
    PyObject_GC_Del(self);
}

static inline void steps_done(StepsObject *self)
{
    if (self->own)
        slot_step_last(self->slot);
    else
        slot_step_end(self->slot, self->tid);
}

/* One step: the slot marked around a send into the coroutine. */
static PySendResult steps_am_send(StepsObject *self, PyObject *arg, PyObject **result)
{
    if (self->coro == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Steps: cleared");
        *result = NULL;
        return PYGEN_ERROR;
    }
    SlotObject *slot = self->slot;
    slot_step_begin(slot, self->tid);
    PySendResult status = PyIter_Send(self->coro, arg, result);
    if (status == PYGEN_NEXT)
        slot_step_end(slot, self->tid);
    else
        steps_done(self);
    return status;
}

/* A returned value as the StopIteration that carries it. */
static void set_stop_iteration(PyObject *value)
{
    if (value == Py_None) {
        PyErr_SetNone(PyExc_StopIteration);
        return;
    }
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
}

static PyObject *steps_send_value(StepsObject *self, PyObject *value)
{
    PyObject *result;
    PySendResult status = steps_am_send(self, value, &result);
    if (status == PYGEN_NEXT)
        return result;
    if (status == PYGEN_RETURN) {
        set_stop_iteration(result);
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *steps_iternext(StepsObject *self)
{
    PyObject *result;
    PySendResult status = steps_am_send(self, Py_None, &result);
    if (status == PYGEN_NEXT)
        return result;
    if (status == PYGEN_RETURN) {
        if (result != Py_None)
            set_stop_iteration(result);
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *steps_throw(StepsObject *self, PyObject *args)
{
    if (self->coro == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Steps: cleared");
        return NULL;
    }
    PyObject *throw = PyObject_GetAttrString(self->coro, "throw");
    if (throw == NULL)
        return NULL;
    SlotObject *slot = self->slot;
    slot_step_begin(slot, self->tid);
    PyObject *result = PyObject_Call(throw, args, NULL);
    Py_DECREF(throw);
    if (result == NULL)
        steps_done(self);
    else
        slot_step_end(slot, self->tid);
    return result;
}

static PyObject *steps_close(StepsObject *self, PyObject *unused)
{
    (void)unused;
    if (self->coro == NULL)
        Py_RETURN_NONE;
    return PyObject_CallMethod(self->coro, "close", NULL);
}

static PyObject *steps_await(PyObject *self)
{
    Py_INCREF(self);
    return self;
}

/* What asyncio's task repr and debug tools read from a coroutine. */
static PyObject *steps_coro_attr(StepsObject *self, const char *name, PyObject *otherwise)
{
    if (self->coro != NULL) {
        PyObject *value = PyObject_GetAttrString(self->coro, name);
        if (value != NULL)
            return value;
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
    }
    Py_INCREF(otherwise);
    return otherwise;
}

static PyObject *steps_cr_frame(StepsObject *self, void *c) { (void)c; return steps_coro_attr(self, "cr_frame", Py_None); }
static PyObject *steps_cr_running(StepsObject *self, void *c) { (void)c; return steps_coro_attr(self, "cr_running", Py_False); }
static PyObject *steps_cr_await(StepsObject *self, void *c) { (void)c; return steps_coro_attr(self, "cr_await", Py_None); }
static PyObject *steps_cr_code(StepsObject *self, void *c) { (void)c; return steps_coro_attr(self, "cr_code", Py_None); }

static PyMethodDef steps_methods[] = {
    {"send", (PyCFunction)steps_send_value, METH_O, "send(value): one step"},
    {"throw", (PyCFunction)steps_throw, METH_VARARGS, "throw(...): one step that raises in the coroutine"},
    {"close", (PyCFunction)steps_close, METH_NOARGS, "close()"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef steps_getset[] = {
    {"cr_frame", (getter)steps_cr_frame, NULL, NULL, NULL},
    {"cr_running", (getter)steps_cr_running, NULL, NULL, NULL},
    {"cr_await", (getter)steps_cr_await, NULL, NULL, NULL},
    {"cr_code", (getter)steps_cr_code, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyAsyncMethods steps_as_async = {
    .am_await = steps_await,
    .am_send = (sendfunc)steps_am_send,
};

static PyTypeObject StepsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopguard_asgi._native.Steps",
    .tp_basicsize = sizeof(StepsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Steps(coro, slot, tid, own=False): a coroutine that marks its request's slot around every step of coro",
    .tp_new = steps_new,
    .tp_dealloc = (destructor)steps_dealloc,
    .tp_traverse = (traverseproc)steps_traverse,
    .tp_clear = (inquiry)steps_clear,
    .tp_as_async = &steps_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)steps_iternext,
    .tp_methods = steps_methods,
    .tp_getset = steps_getset,
};

/* ------------------------------------------------------------------ Scope */

/* The request's scope, a dict that tells the slot the route template as
 * soon as the router stores it (scope["route"], Starlette and FastAPI). */
typedef struct {
    PyDictObject dict;
    SlotObject *slot;
} ScopeObject;

static PyTypeObject ScopeType;
static PyObject *str_route; /* "route" */
static PyObject *str_path;  /* "path" */
static PyObject *dict_update; /* dict.update */

static int is_route_key(PyObject *key)
{
    if (key == str_route)
        return 1;
    return PyUnicode_Check(key) && PyUnicode_GET_LENGTH(key) == 5 &&
           PyUnicode_CompareWithASCIIString(key, "route") == 0;
}

static void scope_tell_route(ScopeObject *self, PyObject *route)
{
    if (self->slot == NULL)
        return;
    PyObject *template = PyObject_GetAttr(route, str_path);
    if (template == NULL) {
        PyErr_Clear();
        return;
    }
    slot_route(self->slot, template);
    Py_DECREF(template);
}

static int scope_ass_subscript(ScopeObject *self, PyObject *key, PyObject *value)
{
    if (value == NULL)
        return PyDict_DelItem((PyObject *)self, key);
    if (PyDict_SetItem((PyObject *)self, key, value) < 0)
        return -1;
    if (is_route_key(key))
        scope_tell_route(self, value);
    return 0;
}

static PyObject *scope_update(ScopeObject *self, PyObject *args, PyObject *kwargs)
{
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *full = PyTuple_New(n + 1);
    if (full == NULL)
        return NULL;
    Py_INCREF(self);
    PyTuple_SET_ITEM(full, 0, (PyObject *)self);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(args, i);
        Py_INCREF(item);
        PyTuple_SET_ITEM(full, i + 1, item);
    }
    PyObject *result = PyObject_Call(dict_update, full, kwargs);
    Py_DECREF(full);
    if (result == NULL)
        return NULL;
    Py_DECREF(result);
    int touched = kwargs != NULL && PyDict_GetItemWithError(kwargs, str_route) != NULL;
    if (!touched && n > 0) {
        int found = PySequence_Contains(PyTuple_GET_ITEM(args, 0), str_route);
        if (found < 0)
            PyErr_Clear();
        touched = found > 0;
    }
    if (touched) {
        PyObject *route = PyDict_GetItemWithError((PyObject *)self, str_route);
        if (route != NULL)
            scope_tell_route(self, route);
        else
            PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyObject *scope_copy(ScopeObject *self, PyObject *unused)
{
    (void)unused;
    return PyDict_Copy((PyObject *)self);
}

static int scope_traverse(ScopeObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slot);
    return PyDict_Type.tp_traverse((PyObject *)self, visit, arg);
}

static int scope_clear(ScopeObject *self)
{
    Py_CLEAR(self->slot);
    return PyDict_Type.tp_clear((PyObject *)self);
}

static void scope_dealloc(ScopeObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->slot);
    PyDict_Type.tp_dealloc((PyObject *)self);
}

static PyMappingMethods scope_as_mapping = {
    .mp_ass_subscript = (objobjargproc)scope_ass_subscript,
};

static PyMethodDef scope_methods[] = {
    {"update", (PyCFunction)(void (*)(void))scope_update, METH_VARARGS | METH_KEYWORDS, "dict.update, telling the slot a route"},
    {"copy", (PyCFunction)scope_copy, METH_NOARGS, "a plain dict copy"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScopeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopguard_asgi._native.Scope",
    .tp_basicsize = sizeof(ScopeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A request's scope that tells its slot the route template",
    .tp_dealloc = (destructor)scope_dealloc,
    .tp_traverse = (traverseproc)scope_traverse,
    .tp_clear = (inquiry)scope_clear,
    .tp_as_mapping = &scope_as_mapping,
    .tp_methods = scope_methods,
};

/* scope_for(scope, slot): the request's scope, tracked for `slot`. */
static PyObject *scope_for(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyDict_Check(args[0]) || !PyObject_TypeCheck(args[1], &SlotType)) {
        PyErr_SetString(PyExc_TypeError, "scope_for(scope: dict, slot: Slot)");
        return NULL;
    }
    ScopeObject *self = (ScopeObject *)PyObject_CallOneArg((PyObject *)&ScopeType, args[0]);
    if (self == NULL)
        return NULL;
    Py_INCREF(args[1]);
    self->slot = (SlotObject *)args[1];
    return (PyObject *)self;
}

/* ------------------------------------------------------------ TaskFactory */

/* A task factory that wraps every task created while a request's context
 * is current in Steps, then hands it to the factory it replaced (or makes
 * an asyncio.Task). */
typedef struct {
    PyObject_HEAD
    PyObject *previous; /* None or a callable */
    PyObject *current;  /* the ContextVar holding the request's slot */
} FactoryObject;

static PyTypeObject FactoryType;
static PyObject *task_type;   /* asyncio.Task */
static PyObject *str_context; /* "context" */
static PyObject *str_loop;    /* "loop" */

static PyObject *factory_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *previous, *current;
    static char *names[] = {"previous", "current", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:TaskFactory", names, &previous, &current))
        return NULL;
    if (!PyContextVar_CheckExact(current)) {
        PyErr_SetString(PyExc_TypeError, "TaskFactory: current must be a ContextVar");
        return NULL;
    }
    FactoryObject *self = (FactoryObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(previous);
    self->previous = previous;
    Py_INCREF(current);
    self->current = current;
    return (PyObject *)self;
}

static int factory_traverse(FactoryObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->previous);
    Py_VISIT(self->current);
    return 0;
}

static int factory_clear(FactoryObject *self)
{
    Py_CLEAR(self->previous);
    Py_CLEAR(self->current);
    return 0;
}

static void factory_dealloc(FactoryObject *self)
{
    PyObject_GC_UnTrack(self);
    factory_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The slot of the request current in `context` (or in this context):
 * a new reference, or NULL with no error when there is none. */
static PyObject *current_slot(FactoryObject *self, PyObject *kwargs)
{
    PyObject *context = kwargs != NULL ? PyDict_GetItemWithError(kwargs, str_context) : NULL;
    PyObject *slot = NULL;
    if (context != NULL && context != Py_None) {
        if (PyContext_CheckExact(context)) {
            slot = PyObject_GetItem(context, self->current);
            if (slot == NULL)
                PyErr_Clear();
        }
        return slot;
    }
    if (PyErr_Occurred())
        PyErr_Clear();
    if (PyContextVar_Get(self->current, Py_None, &slot) < 0) {
        PyErr_Clear();
        return NULL;
    }
    return slot;
}

static PyObject *factory_call(FactoryObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *loop, *coro;
    if (!PyArg_UnpackTuple(args, "loopguard_task_factory", 2, 2, &loop, &coro))
        return NULL;
    PyObject *slot = current_slot(self, kwargs);
    PyObject *wrapped = NULL;
    if (slot != NULL && Py_IS_TYPE(slot, &SlotType) && !((SlotObject *)slot)->ended &&
        !Py_IS_TYPE(coro, &StepsType)) {
        wrapped = (PyObject *)steps_make(coro, (SlotObject *)slot, native_tid(), 0);
        if (wrapped == NULL) {
            Py_DECREF(slot);
            return NULL;
        }
        coro = wrapped;
    }
    Py_XDECREF(slot);
    PyObject *task;
    if (self->previous != Py_None) {
        PyObject *call = PyTuple_Pack(2, loop, coro);
        task = call == NULL ? NULL : PyObject_Call(self->previous, call, kwargs);
        Py_XDECREF(call);
    } else {
        PyObject *options = kwargs != NULL ? PyDict_Copy(kwargs) : PyDict_New();
        PyObject *call = PyTuple_Pack(1, coro);
        task = NULL;
        if (options != NULL && call != NULL && PyDict_SetItem(options, str_loop, loop) == 0)
            task = PyObject_Call(task_type, call, options);
        Py_XDECREF(options);
        Py_XDECREF(call);
    }
    Py_XDECREF(wrapped);
    return task;
}

static PyObject *factory_get_loopguard(PyObject *self, void *closure)
{
    (void)self;
    (void)closure;
    Py_RETURN_TRUE;
}

static PyGetSetDef factory_getset[] = {
    {"loopguard", factory_get_loopguard, NULL, "marks loopguard's factory", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FactoryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopguard_asgi._native.TaskFactory",
    .tp_basicsize = sizeof(FactoryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "TaskFactory(previous, current): wraps tasks created in a request's context",
    .tp_new = factory_new,
    .tp_dealloc = (destructor)factory_dealloc,
    .tp_traverse = (traverseproc)factory_traverse,
    .tp_clear = (inquiry)factory_clear,
    .tp_call = (ternaryfunc)factory_call,
    .tp_getset = factory_getset,
};

/* ----------------------------------------------------------------- module */

static PyObject *py_native_id(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLong(native_tid());
}

static PyMethodDef module_methods[] = {
    {"native_id", py_native_id, METH_NOARGS, "this thread's kernel id, one system call per thread"},
    {"scope_for", (PyCFunction)(void (*)(void))scope_for, METH_FASTCALL, "scope_for(scope, slot): the scope, tracked for slot"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "loopguard_asgi._native",
    .m_doc = "The loopguard-asgi middleware's hot path in C (see _table.py for the table).",
    .m_size = -1,
    .m_methods = module_methods,
};

static int add_constant(PyObject *module, const char *name, long value)
{
    return PyModule_AddIntConstant(module, name, value);
}

PyMODINIT_FUNC PyInit__native(void)
{
    ScopeType.tp_base = &PyDict_Type;
    if (PyType_Ready(&TableType) < 0 || PyType_Ready(&SlotType) < 0 || PyType_Ready(&StepsType) < 0 ||
        PyType_Ready(&ScopeType) < 0 || PyType_Ready(&FactoryType) < 0)
        return NULL;
    str_route = PyUnicode_InternFromString("route");
    str_path = PyUnicode_InternFromString("path");
    str_context = PyUnicode_InternFromString("context");
    str_loop = PyUnicode_InternFromString("loop");
    if (str_route == NULL || str_path == NULL || str_context == NULL || str_loop == NULL)
        return NULL;
    dict_update = PyObject_GetAttrString((PyObject *)&PyDict_Type, "update");
    if (dict_update == NULL)
        return NULL;
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (asyncio == NULL)
        return NULL;
    task_type = PyObject_GetAttrString(asyncio, "Task");
    Py_DECREF(asyncio);
    if (task_type == NULL)
        return NULL;
    if (pthread_atfork(NULL, NULL, forget_tid) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    PyTypeObject *types[] = {&TableType, &SlotType, &StepsType, &ScopeType, &FactoryType};
    const char *names[] = {"Table", "Slot", "Steps", "Scope", "TaskFactory"};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(module, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(module);
            return NULL;
        }
    }
    if (add_constant(module, "MAGIC", MAGIC) < 0 || add_constant(module, "STEPS_VERSION", STEPS_VERSION) < 0 ||
        add_constant(module, "SLOTS", SLOTS) < 0 || add_constant(module, "SLOT_BYTES", SLOT_BYTES) < 0 ||
        add_constant(module, "STEPS_AT", STEPS_AT) < 0 || add_constant(module, "STEP_BYTES", STEP_BYTES) < 0 ||
        add_constant(module, "TABLE_BYTES", TABLE_BYTES) < 0 ||
        add_constant(module, "LONG_STEP_NS", (long)LONG_STEP_NS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
