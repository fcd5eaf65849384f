/* python/src/arena.c: threadloom._core.Arena and Buffer, NUMA-local (pinned) memory for batches.
 *
 * An Arena wraps a tl_arena_t; Arena.alloc() returns a Buffer owning one block, exposing it
 * through the buffer protocol (memoryview, numpy.frombuffer, bytes-like writes) and freeing it
 * when the Buffer is freed or dropped, on whatever thread that happens. Blocks are served from
 * the calling thread's own heap in the arena, so allocating threads share nothing.
 *
 * Invariants: a Buffer holds a strong reference to its Arena, so the C arena outlives every
 * block (and tl_arena_close answers TL_EBUSY while blocks live). `users` counts alloc and trim
 * calls in progress: close() marks the arena closed, waits for users to drain, then closes;
 * allocs never take a lock, so threads allocating from one Arena do not serialise on the object.
 *
 * Buffer exports (memoryviews and DLPack capsules, see dlpack.c) are counted; free() refuses
 * while any is alive. Taking an export and free() run under the Buffer's critical section, so
 * an export either sees the block and is counted before free() looks, or sees NULL. Releases
 * only decrement (from any thread); a DLPack export also holds a strong reference, so the block
 * outlives the Buffer object while a consumer holds the tensor. */
#include <sched.h>
#include <stdatomic.h>

#include "core.h"

typedef struct {
  PyObject_HEAD
  tl_arena_t* arena;     /* owned; valid until a successful close */
  _Atomic int closed;    /* 1 once close() has begun (allocs then fail with ClosedError) */
  _Atomic long users;    /* alloc and trim calls in progress */
} ArenaObject;

typedef struct {
  PyObject_HEAD
  PyObject* arena;       /* strong: the Arena the block came from */
  _Atomic(void*) ptr;    /* the block; NULL once freed (exchanged, so it is freed once) */
  Py_ssize_t size;       /* bytes requested */
  _Atomic long exports;  /* live buffer-protocol views; free() refuses while > 0 */
  _Atomic long dlpack_exports; /* live DLPack managed tensors; free() refuses while > 0 */
} BufferObject;

// ---------------------------------------------------------------------------------------------
// Buffer
// ---------------------------------------------------------------------------------------------

static void buffer_release_block(BufferObject* self) {
  void* p = atomic_exchange(&self->ptr, NULL);
  if (p) tl_arena_free(((ArenaObject*)self->arena)->arena, p);
}

static int buffer_getbuffer(PyObject* op, Py_buffer* view, int flags) {
  BufferObject* self = (BufferObject*)op;
  int rc = -1;
  Py_BEGIN_CRITICAL_SECTION(op);
  void* p = atomic_load(&self->ptr);
  if (!p) PyErr_SetString(PyExc_ValueError, "this Buffer was freed");
  else if (PyBuffer_FillInfo(view, op, p, self->size, 0, flags) == 0) {
    atomic_fetch_add(&self->exports, 1);
    rc = 0;
  }
  Py_END_CRITICAL_SECTION();
  return rc;
}

static void buffer_releasebuffer(PyObject* op, Py_buffer* view) {
  (void)view;
  atomic_fetch_sub(&((BufferObject*)op)->exports, 1);
}

static PyObject* buffer_free(PyObject* op, PyObject* unused) {
  (void)unused;
  BufferObject* self = (BufferObject*)op;
  PyObject* ret = NULL;
  Py_BEGIN_CRITICAL_SECTION(op);
  if (atomic_load(&self->exports) > 0)
    PyErr_SetString(PyExc_BufferError, "cannot free a Buffer while memoryviews of it exist: "
                                       "release them (memoryview.release()) first");
  else if (atomic_load(&self->dlpack_exports) > 0)
    PyErr_SetString(PyExc_BufferError, "cannot free a Buffer while DLPack exports of it are "
                                       "alive: drop the tensors imported from it (and any "
                                       "unconsumed __dlpack__ capsules) first");
  else {
    buffer_release_block(self);
    ret = Py_NewRef(Py_None);
  }
  Py_END_CRITICAL_SECTION();
  return ret;
}

static void buffer_dlpack_done(PyObject* op) {
  atomic_fetch_sub(&((BufferObject*)op)->dlpack_exports, 1);
}

static PyObject* buffer_dlpack(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
  PyObject *stream = NULL, *max_version = NULL, *dl_device = NULL, *copy = NULL;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO:__dlpack__", kwlist, &stream,
                                   &max_version, &dl_device, &copy))
    return NULL;
  int versioned;
  if (tl_py_dlpack_check_args(stream, max_version, dl_device, copy, &versioned) < 0) return NULL;
  BufferObject* self = (BufferObject*)op;
  void* p;
  Py_BEGIN_CRITICAL_SECTION(op);
  p = atomic_load(&self->ptr);
  if (p) atomic_fetch_add(&self->dlpack_exports, 1);
  Py_END_CRITICAL_SECTION();
  if (!p) {
    PyErr_SetString(PyExc_ValueError, "this Buffer was freed");
    return NULL;
  }
  /* On failure the export has already called buffer_dlpack_done. */
  return tl_py_dlpack_export_bytes(op, p, self->size, versioned, 0, buffer_dlpack_done);
}

static PyObject* buffer_dlpack_device(PyObject* op, PyObject* unused) {
  (void)op, (void)unused;
  return Py_BuildValue("(ii)", 1 /* kDLCPU */, 0);
}

static PyObject* buffer_enter(PyObject* op, PyObject* unused) {
  (void)unused;
  return Py_NewRef(op);
}

static PyObject* buffer_exit(PyObject* op, PyObject* args) {
  (void)args;
  return buffer_free(op, NULL);
}

static PyObject* buffer_get_ptr(PyObject* op, void* closure) {
  (void)closure;
  return PyLong_FromVoidPtr(atomic_load(&((BufferObject*)op)->ptr));
}

static PyObject* buffer_get_nbytes(PyObject* op, void* closure) {
  (void)closure;
  return PyLong_FromSsize_t(((BufferObject*)op)->size);
}

static PyObject* buffer_get_numa_node(PyObject* op, void* closure) {
  (void)closure;
  void* p = atomic_load(&((BufferObject*)op)->ptr);
  if (!p) {
    PyErr_SetString(PyExc_ValueError, "this Buffer was freed");
    return NULL;
  }
  int node, err = tl_arena_node_of(p, &node);
  return err ? tl_py_fail_obj(op, err) : PyLong_FromLong(node);
}

static Py_ssize_t buffer_len(PyObject* op) { return ((BufferObject*)op)->size; }

static int buffer_traverse(PyObject* op, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(op));
  Py_VISIT(((BufferObject*)op)->arena);
  return 0;
}

static void buffer_dealloc(PyObject* op) {
  BufferObject* self = (BufferObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  PyObject_GC_UnTrack(op);
  if (self->arena) buffer_release_block(self);
  Py_CLEAR(self->arena);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static PyMethodDef buffer_methods[] = {
    {"free", buffer_free, METH_NOARGS, "Returns the block to its arena now (idempotent)."},
    {"__dlpack__", (PyCFunction)(void (*)(void))buffer_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) -> PyCapsule: the "
     "block as a 1-D uint8 kDLCPU tensor, in place ('dltensor_versioned' when max_version >= "
     "(1, 0), else 'dltensor'). The tensor holds a reference to this Buffer; free() refuses "
     "while it lives. stream must be None; dl_device (1, 0) or None; copy=True is refused."},
    {"__dlpack_device__", buffer_dlpack_device, METH_NOARGS,
     "(1, 0): kDLCPU, device 0 (host memory)."},
    {"__enter__", buffer_enter, METH_NOARGS, NULL},
    {"__exit__", buffer_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef buffer_getset[] = {
    {"ptr", buffer_get_ptr, NULL, "address of the block (0 once freed)", NULL},
    {"nbytes", buffer_get_nbytes, NULL, "size in bytes", NULL},
    {"numa_node", buffer_get_numa_node, NULL, "NUMA node of the block's first page (as the kernel reports it)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot buffer_slots[] = {
    {Py_tp_doc, (void*)"A block of an Arena: a writable bytes-like object (buffer protocol). "
                       "Freed by free(), by leaving a with-block, or when dropped."},
    {Py_tp_dealloc, (void*)(uintptr_t)buffer_dealloc},
    {Py_tp_traverse, (void*)(uintptr_t)buffer_traverse},
    {Py_tp_methods, buffer_methods},
    {Py_tp_getset, buffer_getset},
    {Py_bf_getbuffer, (void*)(uintptr_t)buffer_getbuffer},
    {Py_bf_releasebuffer, (void*)(uintptr_t)buffer_releasebuffer},
    {Py_sq_length, (void*)(uintptr_t)buffer_len},
    {0, NULL},
};

PyType_Spec tl_py_buffer_spec = {
    .name = "threadloom._core.Buffer",
    .basicsize = sizeof(BufferObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = buffer_slots,
};

// ---------------------------------------------------------------------------------------------
// Arena
// ---------------------------------------------------------------------------------------------

static PyObject* arena_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"numa_node", "size", "pin", "prefault", NULL};
  int node = -1, prefault = 0;
  Py_ssize_t size = (Py_ssize_t)TL_ARENA_GRANULE;
  const char* pin = "auto";
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$insp:Arena", kwlist, &node, &size, &pin,
                                   &prefault))
    return NULL;
  tl_arena_options_t o = {.numa_node = node, .size = (size_t)size, .pin = TL_ARENA_PIN_AUTO,
                          .prefault = prefault};
  if (size <= 0) return PyErr_Format(PyExc_ValueError, "size must be > 0 bytes, not %zd", size);
  if (strcmp(pin, "auto") == 0) o.pin = TL_ARENA_PIN_AUTO;
  else if (strcmp(pin, "never") == 0) o.pin = TL_ARENA_PIN_NEVER;
  else if (strcmp(pin, "require") == 0) o.pin = TL_ARENA_PIN_REQUIRE;
  else return PyErr_Format(PyExc_ValueError, "pin must be 'auto', 'never' or 'require', not '%s'", pin);
  tl_arena_t* a = NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_arena_init(&a, &o);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) {
    PyObject* module = PyType_GetModule(type);
    return module ? tl_py_raise(get_state(module), err, detail) : NULL;
  }
  ArenaObject* self = (ArenaObject*)type->tp_alloc(type, 0);
  if (!self) {
    tl_arena_close(a);
    return NULL;
  }
  self->arena = a;
  atomic_init(&self->closed, 0);
  atomic_init(&self->users, 0);
  return (PyObject*)self;
}

static PyObject* arena_alloc(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"size", "alignment", NULL};
  Py_ssize_t size, alignment = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|n:alloc", kwlist, &size, &alignment)) return NULL;
  if (size <= 0 || alignment < 0)
    return PyErr_Format(PyExc_ValueError, "size must be > 0 and alignment >= 0 (got %zd, %zd)", size, alignment);
  ArenaObject* self = (ArenaObject*)op;
  PyObject* module = PyType_GetModule(Py_TYPE(op));
  if (!module) return NULL;
  core_state* st = get_state(module);
  BufferObject* buf = PyObject_GC_New(BufferObject, (PyTypeObject*)st->buffer_type);
  if (!buf) return NULL;
  buf->arena = NULL;
  atomic_init(&buf->ptr, NULL);
  atomic_init(&buf->exports, 0);
  atomic_init(&buf->dlpack_exports, 0);
  buf->size = size;
  atomic_fetch_add(&self->users, 1);
  if (atomic_load(&self->closed)) {
    atomic_fetch_sub(&self->users, 1);
    Py_DECREF(buf);
    return tl_py_fail(module, TL_ECLOSED);
  }
  void* p = NULL;
  int err = tl_arena_alloc(self->arena, (size_t)size, (size_t)alignment, &p);
  char detail[512] = "";
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  atomic_fetch_sub(&self->users, 1);
  if (err) {
    Py_DECREF(buf);
    return tl_py_raise(st, err, detail);
  }
  buf->arena = Py_NewRef(op);
  atomic_store(&buf->ptr, p);
  PyObject_GC_Track((PyObject*)buf);
  return (PyObject*)buf;
}

/* Closes the C arena once no alloc is in progress. Returns 0 or a TL_E* code (TL_EBUSY while
 * blocks live; the Arena then stays usable). */
static int arena_close_impl(ArenaObject* self) {
  if (atomic_exchange(&self->closed, 1)) return 0; /* another close is under way */
  while (atomic_load(&self->users) > 0) sched_yield(); /* allocs are short and never block */
  int err = tl_arena_close(self->arena);
  if (err) atomic_store(&self->closed, 0);
  else self->arena = NULL;
  return err;
}

static PyObject* arena_close(PyObject* op, PyObject* unused) {
  (void)unused;
  ArenaObject* self = (ArenaObject*)op;
  if (!self->arena) Py_RETURN_NONE;
  int err = arena_close_impl(self);
  if (err) return tl_py_fail_obj(op, err);
  Py_RETURN_NONE;
}

static PyObject* arena_stats(PyObject* op, PyObject* unused) {
  (void)unused;
  ArenaObject* self = (ArenaObject*)op;
  if (!self->arena || atomic_load(&self->closed)) return tl_py_fail_obj(op, TL_ECLOSED);
  tl_arena_stats_t s;
  int err = tl_arena_stats(self->arena, &s);
  if (err) return tl_py_fail_obj(op, err);
  return Py_BuildValue("{s:i,s:n,s:O,s:s,s:n,s:n,s:n,s:K,s:K,s:K,s:n,s:n}", "numa_node",
                       s.numa_node, "size", (Py_ssize_t)s.size, "pinned",
                       s.pinned ? Py_True : Py_False, "pin_detail", s.pin_detail, "bytes_in_use",
                       (Py_ssize_t)s.bytes_in_use, "blocks_in_use", (Py_ssize_t)s.blocks_in_use,
                       "peak_bytes", (Py_ssize_t)s.peak_bytes, "allocs",
                       (unsigned long long)s.allocs, "failed_allocs",
                       (unsigned long long)s.failed_allocs, "cache_hits",
                       (unsigned long long)s.cache_hits, "cached_bytes",
                       (Py_ssize_t)s.cached_bytes, "cached_blocks", (Py_ssize_t)s.cached_blocks);
}

static PyObject* arena_trim(PyObject* op, PyObject* unused) {
  (void)unused;
  ArenaObject* self = (ArenaObject*)op;
  atomic_fetch_add(&self->users, 1); /* like alloc: close waits for it */
  if (atomic_load(&self->closed)) { /* not closed: self->arena stays valid until users drain */
    atomic_fetch_sub(&self->users, 1);
    return tl_py_fail_obj(op, TL_ECLOSED);
  }
  int err = tl_arena_trim(self->arena);
  atomic_fetch_sub(&self->users, 1);
  if (err) return tl_py_fail_obj(op, err);
  Py_RETURN_NONE;
}

static void arena_dealloc(PyObject* op) {
  ArenaObject* self = (ArenaObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  /* Every Buffer holds a reference: none is left, so no block is live and close succeeds. */
  if (self->arena) arena_close_impl(self);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static PyMethodDef arena_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))arena_alloc, METH_VARARGS | METH_KEYWORDS,
     "alloc(size, alignment=0) -> Buffer from the calling thread's heap in this arena (alignment "
     "0: 64 bytes). Raises OutOfMemoryError when the arena is full (nothing is taken from "
     "outside it)."},
    {"close", arena_close, METH_NOARGS,
     "Closes the arena; raises BusyError while Buffers of it are alive. Its region stays mapped "
     "for reuse by a later Arena (mimalloc cannot give an arena back)."},
    {"stats", arena_stats, METH_NOARGS,
     "dict: numa_node, size, pinned, pin_detail, bytes_in_use, blocks_in_use, peak_bytes, "
     "allocs, failed_allocs, cache_hits (allocs served by a thread's cache of freed blocks), "
     "cached_bytes and cached_blocks (held by those caches: neither in use nor free to other "
     "threads)."},
    {"trim", arena_trim, METH_NOARGS,
     "Gives the blocks the calling thread's cache holds back to the arena now; every other "
     "thread gives its cached blocks back at its next alloc or free on this arena (or when it "
     "exits). Each allocating thread caches at most 8 freed blocks and 1/16 of the arena."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot arena_slots[] = {
    {Py_tp_doc, (void*)"Arena(*, numa_node=-1, size=64 MiB, pin='auto', prefault=False): a region bound "
                       "to a NUMA node, page-locked for fast GPU copies when a GPU is present "
                       "(pin='auto'; 'require' fails without one, 'never' skips it), managed by "
                       "mimalloc with one heap per allocating thread. prefault=True makes every "
                       "page resident at creation (~0.7 ms per MiB); by default a page is placed "
                       "on the node when first written."},
    {Py_tp_new, (void*)(uintptr_t)arena_new},
    {Py_tp_dealloc, (void*)(uintptr_t)arena_dealloc},
    {Py_tp_methods, arena_methods},
    {0, NULL},
};

PyType_Spec tl_py_arena_spec = {
    .name = "threadloom._core.Arena",
    .basicsize = sizeof(ArenaObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = arena_slots,
};
