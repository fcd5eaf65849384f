/* python/src/device_stream.c: threadloom._core.Stream (work submission), StagingPool and
 * StagingSlot (pinned staging), and DeviceBuffer imports of CUDA tensors.
 *
 * Submission: launch() is the bare path (one C call, no lock, no detach: measured by the
 * submission-rate benchmark). copy() and memset() detach around the enqueue (CUDA may stage a
 * pageable copy synchronously), hold every host buffer they were given until an event recorded
 * after the copy completed (the stream's pending list, reaped at each later copy and at
 * synchronize), and declare device buffers used on a stream other than their allocation stream
 * (tl_dbuf_record_stream) so a free from any thread cannot hand their memory to another stream
 * while this one still uses it.
 *
 * Invariants: the pending list of a Stream is only touched under the object's critical section;
 * a StagingSlot's `slot` is exchanged to NULL exactly once (hand-back), under its critical
 * section, which its buffer exports also take, so no memoryview can be created of a slot that
 * was handed back, and no hand-back happens while one is alive. */
#include "device.h"
#include "dlpack.h"

// ---------------------------------------------------------------------------------------------
// Host buffers of copies in flight
// ---------------------------------------------------------------------------------------------

struct tl_py_pending_s {
  tl_py_pending_t* next;
  tl_event_t* e;     /* recorded after the copy */
  Py_buffer view;    /* released once e completed */
};

/* Releases the pending host buffers whose event completed (or failed); all of them when
 * `all` (the stream was synchronised). Critical section on self held. */
static void pending_reap(StreamObject* self, int all) {
  while (self->pending) {
    tl_py_pending_t* p = self->pending;
    if (!all && tl_event_query(p->e) == TL_EAGAIN) return;
    self->pending = p->next;
    if (!self->pending) self->pending_tail = NULL;
    tl_event_close(p->e);
    PyBuffer_Release(&p->view);
    PyMem_RawFree(p);
  }
}

/* Keeps `view` (moved in) until the stream's work so far completed. 0 or -1 (on failure the
 * stream is synchronised first, so the buffer can go at once). */
static int pending_add(StreamObject* self, Py_buffer* view) {
  tl_py_pending_t* p = PyMem_RawCalloc(1, sizeof *p);
  int err = p ? tl_event_init(((DeviceObject*)self->device)->dev, 0, &p->e) : TL_ENOMEM;
  if (!err) err = tl_event_record(p->e, self->s);
  if (err) {
    if (p) tl_event_close(p->e); /* NULL when its init failed */
    PyMem_RawFree(p);
    TL_DETAIL_COPY(detail);
    Py_BEGIN_ALLOW_THREADS
    tl_stream_sync(self->s, -1);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(view);
    tl_pydev_fail_detail((PyObject*)self, err, detail);
    return -1;
  }
  p->view = *view;
  p->next = NULL;
  if (self->pending_tail) self->pending_tail->next = p;
  else self->pending = p;
  self->pending_tail = p;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------------------------

static PyObject* stream_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"device", "priority", NULL};
  PyObject* device;
  int priority = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i:Stream", kwlist, &device, &priority))
    return NULL;
  PyObject* m = PyType_GetModuleByDef(type, &tl_py_core_def);
  if (!m) return NULL;
  core_state* st = get_state(m);
  tl_device_t* d = tl_pydev_device_of(st, device);
  if (!d) return NULL;
  tl_stream_t* s = NULL;
  int err = tl_stream_acquire(d, priority, &s);
  if (err) {
    TL_DETAIL_COPY(detail);
    return tl_py_raise(st, err, detail);
  }
  StreamObject* self = (StreamObject*)type->tp_alloc(type, 0);
  if (!self) {
    tl_stream_release(s);
    return NULL;
  }
  self->device = Py_NewRef(device);
  self->s = s;
  self->pending = self->pending_tail = NULL;
  return (PyObject*)self;
}

static int stream_traverse(PyObject* op, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(op));
  Py_VISIT(((StreamObject*)op)->device);
  return 0;
}

static void stream_dealloc(PyObject* op) {
  StreamObject* self = (StreamObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  PyObject_GC_UnTrack(op);
  if (self->pending) { /* host buffers still read or written: wait for the copies */
    Py_BEGIN_ALLOW_THREADS
    tl_stream_sync(self->s, -1);
    Py_END_ALLOW_THREADS
    pending_reap(self, 1);
  }
  tl_stream_release(self->s);
  self->s = NULL;
  Py_CLEAR(self->device);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static PyObject* stream_launch(PyObject* op, PyObject* const* args, Py_ssize_t nargs) {
  unsigned long long ns = 0;
  if (nargs > 1) return PyErr_Format(PyExc_TypeError, "launch(ns=0) takes one argument");
  if (nargs == 1) {
    ns = PyLong_AsUnsignedLongLong(args[0]);
    if (ns == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
  }
  int err = tl_kernel_async(((StreamObject*)op)->s, ns);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* stream_query(PyObject* op, PyObject* unused) {
  (void)unused;
  int err = tl_stream_query(((StreamObject*)op)->s);
  if (err == TL_EAGAIN) Py_RETURN_FALSE;
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_TRUE;
}

static PyObject* stream_synchronize(PyObject* op, PyObject* args, PyObject* kwargs) {
  int ms;
  if (tl_pydev_timeout_arg(args, kwargs, "|O:synchronize", &ms) < 0) return NULL;
  StreamObject* self = (StreamObject*)op;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_stream_sync(self->s, ms);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err != TL_ETIMEDOUT) {
    Py_BEGIN_CRITICAL_SECTION(op);
    pending_reap(self, 1); /* done, or failed: nothing will touch the buffers */
    Py_END_CRITICAL_SECTION();
  }
  if (err) return tl_pydev_fail_detail(op, err, detail);
  Py_RETURN_NONE;
}

static PyObject* stream_wait_event(PyObject* op, PyObject* ev) {
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  if (!PyObject_TypeCheck(ev, (PyTypeObject*)st->event_type))
    return PyErr_Format(PyExc_TypeError, "wait_event takes an Event, not %T", ev);
  int err = tl_stream_wait_event(((StreamObject*)op)->s, ((EventObject*)ev)->e);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* stream_wait_stream(PyObject* op, PyObject* other) {
  core_state* st = tl_pydev_state(op);
  tl_stream_t* o = st ? tl_pydev_stream_of(st, other) : NULL;
  if (!o) return NULL;
  tl_event_t* e;
  int err = tl_event_init(tl_stream_device(o), 0, &e);
  if (!err) {
    err = tl_event_record(e, o);
    if (!err) err = tl_stream_wait_event(((StreamObject*)op)->s, e);
    tl_event_close(e);
  }
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* stream_record_event(PyObject* op, PyObject* args) {
  PyObject* ev = Py_None;
  if (!PyArg_ParseTuple(args, "|O:record_event", &ev)) return NULL;
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  StreamObject* self = (StreamObject*)op;
  PyObject* made = NULL;
  if (ev == Py_None) {
    PyObject* targs = Py_BuildValue("(O)", self->device);
    made = targs ? PyObject_Call(st->event_type, targs, NULL) : NULL;
    Py_XDECREF(targs);
    if (!made) return NULL;
    ev = made;
  } else if (!PyObject_TypeCheck(ev, (PyTypeObject*)st->event_type)) {
    return PyErr_Format(PyExc_TypeError, "record_event takes an Event or None, not %T", ev);
  }
  int err = tl_event_record(((EventObject*)ev)->e, self->s);
  if (err) {
    Py_XDECREF(made);
    return tl_pydev_fail(op, err);
  }
  return made ? made : Py_NewRef(ev);
}

static PyObject* stream_alloc(PyObject* op, PyObject* arg) {
  Py_ssize_t n = PyLong_AsSsize_t(arg);
  if (n == -1 && PyErr_Occurred()) return NULL;
  if (n <= 0) return PyErr_Format(PyExc_ValueError, "nbytes must be > 0, not %zd", n);
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  StreamObject* self = (StreamObject*)op;
  DeviceBufferObject* b = tl_pydev_dbuf_new(st, self->device);
  if (!b) return NULL;
  tl_dbuf_t* blk = NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS /* a cache miss calls cudaMalloc, an out-of-memory retry syncs */
  err = tl_dbuf_alloc(self->s, (size_t)n, &blk);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) {
    Py_DECREF(b);
    return tl_pydev_fail_detail(op, err, detail);
  }
  b->b = blk;
  atomic_store(&b->ptr, blk->ptr);
  b->nbytes = n;
  PyObject_GC_Track((PyObject*)b);
  return (PyObject*)b;
}

/* A DeviceBuffer argument used on stream s: its device pointer and size, after checking that
 * it is a live DeviceBuffer of s's device and declaring its use on s when s is not its
 * allocation stream. 0, or -1 with the exception set. */
static int dbuf_use(core_state* st, PyObject* self, PyObject* o, tl_stream_t* s, const char* what,
                    void** ptr, Py_ssize_t* nbytes) {
  if (!PyObject_TypeCheck(o, (PyTypeObject*)st->dbuf_type)) {
    PyErr_Format(PyExc_TypeError, "the %s must be a DeviceBuffer, not %T", what, o);
    return -1;
  }
  DeviceBufferObject* b = (DeviceBufferObject*)o;
  tl_device_t* d = ((DeviceObject*)b->device)->dev;
  if (d != tl_stream_device(s)) {
    PyErr_Format(PyExc_ValueError, "the %s is a DeviceBuffer of %s, the stream is on %s: use a "
                 "stream of the buffer's device", what, tl_device_name(d),
                 tl_device_name(tl_stream_device(s)));
    return -1;
  }
  *ptr = atomic_load(&b->ptr);
  *nbytes = b->nbytes;
  if (!*ptr) {
    PyErr_Format(PyExc_ValueError, "the %s DeviceBuffer was freed", what);
    return -1;
  }
  tl_dbuf_t* root = tl_pydev_dbuf_root(b);
  if (root && tl_dbuf_stream(root) != s) {
    int err = tl_dbuf_record_stream(root, s);
    if (err) {
      tl_pydev_fail(self, err);
      return -1;
    }
  }
  return 0;
}

/* An optional nbytes argument: None -> dflt; else 0 <= n <= limit, or -1 with ValueError. */
static int nbytes_arg(PyObject* nobj, Py_ssize_t dflt, Py_ssize_t limit, Py_ssize_t* out) {
  *out = dflt;
  if (nobj == Py_None) return 0;
  Py_ssize_t n = PyLong_AsSsize_t(nobj);
  if (n == -1 && PyErr_Occurred()) return -1;
  if (n < 0 || n > limit) {
    PyErr_Format(PyExc_ValueError, "nbytes=%zd: at most %zd bytes fit", n, limit);
    return -1;
  }
  *out = n;
  return 0;
}

/* One side of a copy: a DeviceBuffer (device memory) or a host object with the buffer
 * protocol (held in *view). */
typedef struct {
  int device;        /* 1: a DeviceBuffer */
  void* ptr;
  Py_ssize_t nbytes;
  Py_buffer view;    /* host side: held */
  int has_view;
} side_t;

static int side_get(core_state* st, PyObject* o, int writable, StreamObject* self, side_t* out,
                    const char* what) {
  memset(out, 0, sizeof *out);
  if (PyObject_TypeCheck(o, (PyTypeObject*)st->dbuf_type)) {
    out->device = 1;
    return dbuf_use(st, (PyObject*)self, o, self->s, what, &out->ptr, &out->nbytes);
  }
  if (PyObject_GetBuffer(o, &out->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
    if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "the %s must be a DeviceBuffer or a %sbytes-like host "
                   "object (bytearray, numpy array, threadloom Buffer), not %T", what,
                   writable ? "writable " : "", o);
    }
    return -1;
  }
  out->has_view = 1;
  out->ptr = out->view.buf;
  out->nbytes = out->view.len;
  return 0;
}

static PyObject* stream_copy(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"dst", "src", "nbytes", NULL};
  PyObject *dst, *src, *nobj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O:copy", kwlist, &dst, &src, &nobj))
    return NULL;
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  StreamObject* self = (StreamObject*)op;
  side_t d, s;
  if (side_get(st, dst, 1, self, &d, "destination") < 0) return NULL;
  if (side_get(st, src, 0, self, &s, "source") < 0) {
    if (d.has_view) PyBuffer_Release(&d.view);
    return NULL;
  }
  PyObject* ret = NULL;
  Py_ssize_t n = d.nbytes < s.nbytes ? d.nbytes : s.nbytes;
  tl_copy_kind_t kind = d.device && s.device ? TL_COPY_D2D : d.device ? TL_COPY_H2D : TL_COPY_D2H;
  if (!d.device && !s.device) {
    PyErr_SetString(PyExc_TypeError, "copy between two host objects: use memoryview slicing "
                    "(dst[:] = src); Stream.copy moves bytes to or from a DeviceBuffer");
    goto done;
  }
  if (nobj != Py_None) {
    n = PyLong_AsSsize_t(nobj);
    if (n == -1 && PyErr_Occurred()) goto done;
    if (n < 0 || n > d.nbytes || n > s.nbytes) {
      PyErr_Format(PyExc_ValueError, "nbytes=%zd: the destination has %zd bytes, the source %zd",
                   n, d.nbytes, s.nbytes);
      goto done;
    }
  } else if (d.nbytes != s.nbytes) {
    PyErr_Format(PyExc_ValueError, "the destination has %zd bytes, the source %zd: give nbytes= "
                 "to copy a prefix", d.nbytes, s.nbytes);
    goto done;
  }
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_copy_async(self->s, d.ptr, s.ptr, (size_t)n, kind);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) {
    tl_pydev_fail_detail(op, err, detail);
    goto done;
  }
  int bad = 0;
  Py_BEGIN_CRITICAL_SECTION(op);
  pending_reap(self, 0);
  /* the host side stays held until the copy completed (pending_add takes it over) */
  if (d.has_view) {
    d.has_view = 0;
    bad = pending_add(self, &d.view) < 0;
  }
  if (!bad && s.has_view) {
    s.has_view = 0;
    bad = pending_add(self, &s.view) < 0;
  }
  Py_END_CRITICAL_SECTION();
  if (!bad) ret = Py_NewRef(Py_None);
done:
  if (d.has_view) PyBuffer_Release(&d.view);
  if (s.has_view) PyBuffer_Release(&s.view);
  return ret;
}

static PyObject* stream_memset(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"dst", "value", "nbytes", NULL};
  PyObject *dst, *nobj = Py_None;
  int value;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oi|O:memset", kwlist, &dst, &value, &nobj))
    return NULL;
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  StreamObject* self = (StreamObject*)op;
  void* p;
  Py_ssize_t size, n;
  if (dbuf_use(st, op, dst, self->s, "memset destination", &p, &size) < 0 ||
      nbytes_arg(nobj, size, size, &n) < 0)
    return NULL;
  int err = tl_memset_async(self->s, p, value, (size_t)n);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

/* A Python callable run by the backend after the stream's earlier work. */
static void stream_trampoline(void* arg) {
  PyObject* fn = arg;
  if (!Py_IsInitialized()) return; /* at exit: leak rather than touch a dead interpreter */
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject* r = PyObject_CallNoArgs(fn);
  if (!r) PyErr_WriteUnraisable(fn);
  Py_XDECREF(r);
  Py_DECREF(fn);
  PyGILState_Release(g);
}

static PyObject* stream_callback(PyObject* op, PyObject* fn) {
  if (!PyCallable_Check(fn))
    return PyErr_Format(PyExc_TypeError, "callback takes a callable, not %T", fn);
  Py_INCREF(fn); /* the trampoline's; dropped there, or here if the call fails */
  int err = tl_stream_callback(((StreamObject*)op)->s, stream_trampoline, fn);
  if (err) {
    Py_DECREF(fn);
    return tl_pydev_fail(op, err);
  }
  Py_RETURN_NONE;
}

static PyObject* stream_get_device(PyObject* op, void* c) {
  (void)c;
  return Py_NewRef(((StreamObject*)op)->device);
}
static PyObject* stream_get_priority(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromLong(tl_stream_priority(((StreamObject*)op)->s));
}
static PyObject* stream_get_handle(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromVoidPtr(tl_stream_handle(((StreamObject*)op)->s));
}

static PyObject* stream_repr(PyObject* op) {
  StreamObject* self = (StreamObject*)op;
  return PyUnicode_FromFormat("<Stream %p on %s, priority %d>", tl_stream_handle(self->s),
                              tl_device_name(tl_stream_device(self->s)),
                              tl_stream_priority(self->s));
}

static PyMethodDef stream_methods[] = {
    {"launch", (PyCFunction)(void (*)(void))stream_launch, METH_FASTCALL,
     "launch(ns=0): enqueues a kernel that occupies the device for ns nanoseconds (sim: the "
     "compute engine; cuda: a one-thread spin kernel). ns=0 is the cheapest launch."},
    {"copy", (PyCFunction)(void (*)(void))stream_copy, METH_VARARGS | METH_KEYWORDS,
     "copy(dst, src, nbytes=None): enqueues a copy between a DeviceBuffer and a bytes-like host "
     "object (or two DeviceBuffers). The host object is held until the copy completed; read a "
     "destination only after an event recorded later completed (or synchronize())."},
    {"memset", (PyCFunction)(void (*)(void))stream_memset, METH_VARARGS | METH_KEYWORDS,
     "memset(dst, value, nbytes=None): enqueues a memset of a DeviceBuffer."},
    {"alloc", stream_alloc, METH_O,
     "alloc(nbytes) -> DeviceBuffer from the device's caching allocator, for use on this "
     "stream (stream-ordered)."},
    {"query", stream_query, METH_NOARGS,
     "True when all queued work is done; raises the error of failed work (once)."},
    {"synchronize", (PyCFunction)(void (*)(void))stream_synchronize, METH_VARARGS | METH_KEYWORDS,
     "synchronize(timeout=None): blocks (detached) until the queued work is done."},
    {"wait_event", stream_wait_event, METH_O,
     "wait_event(event): later work waits for the event's last record (the host does not)."},
    {"wait_stream", stream_wait_stream, METH_O,
     "wait_stream(other): later work waits for what other has queued so far."},
    {"record_event", stream_record_event, METH_VARARGS,
     "record_event(event=None) -> the Event, recorded here (a new one when None)."},
    {"callback", stream_callback, METH_O,
     "callback(fn): fn() runs on a backend thread after the earlier work; later work waits for "
     "it. fn must not use the device API. Exceptions are printed (sys.unraisablehook)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef stream_getset[] = {
    {"device", stream_get_device, NULL, "the Device", NULL},
    {"priority", stream_get_priority, NULL, "the priority (0 default, lower is more urgent)", NULL},
    {"handle", stream_get_handle, NULL, "the backend's handle as an int (cuda: cudaStream_t)", NULL},
    {"cuda_stream", stream_get_handle, NULL, "the same as handle (torch.cuda.Stream's name)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot stream_slots[] = {
    {Py_tp_doc, (void*)"Stream(device, priority=0): an in-order queue of device work from the "
                       "calling thread's pool (given back when the object dies)."},
    {Py_tp_new, (void*)(uintptr_t)stream_new},
    {Py_tp_dealloc, (void*)(uintptr_t)stream_dealloc},
    {Py_tp_traverse, (void*)(uintptr_t)stream_traverse},
    {Py_tp_repr, (void*)(uintptr_t)stream_repr},
    {Py_tp_methods, stream_methods},
    {Py_tp_getset, stream_getset},
    {0, NULL},
};

PyType_Spec tl_py_stream_spec = {
    .name = "threadloom._core.Stream",
    .basicsize = sizeof(StreamObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_BASETYPE |
             Py_TPFLAGS_HAVE_GC,
    .slots = stream_slots,
};

// ---------------------------------------------------------------------------------------------
// DeviceBuffer imports of CUDA tensors
// ---------------------------------------------------------------------------------------------

PyObject* tl_py_device_import(PyObject* module, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"obj", "stream", NULL};
  PyObject *obj, *stream;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:import_dlpack", kwlist, &obj, &stream))
    return NULL;
  core_state* st = get_state(module);
  tl_stream_t* s = tl_pydev_stream_of(st, stream);
  if (!s) return NULL;
  tl_device_t* d = tl_stream_device(s);
  tl_device_props_t pr;
  tl_device_props(d, &pr);
  if (pr.kind != TL_DEVICE_CUDA) {
    char detail[300];
    snprintf(detail, sizeof detail, "import_dlpack takes CUDA tensors onto a cuda device; %s is "
             "simulated (its memory is host memory: use numpy/torch.from_dlpack on its buffers, "
             "or copy host tensors with Stream.copy)", tl_device_name(d));
    return tl_py_raise(st, TL_EINVAL, detail);
  }
  if (tl_py_dlpack_cuda_device(module, obj, "import_dlpack", pr.index) < 0) return NULL;
  tl_py_cuda_tensor_t t;
  if (tl_py_dlpack_cuda_borrow(module, obj, (unsigned long long)(uintptr_t)tl_stream_handle(s),
                               pr.index, "import_dlpack", &t) < 0)
    return NULL;
  PyObject* dev = NULL;
  PyObject* sdev = PyObject_GetAttrString(stream, "device");
  if (!sdev) {
    tl_py_dlpack_cuda_release(&t);
    return NULL;
  }
  dev = sdev;
  DeviceBufferObject* b = tl_pydev_dbuf_new(st, dev);
  Py_DECREF(sdev);
  if (!b) {
    tl_py_dlpack_cuda_release(&t);
    return NULL;
  }
  size_t elem = (size_t)t.dtype.bits / 8 * t.dtype.lanes;
  b->capsule = t.capsule; /* kept, unconsumed: its destructor frees the producer's tensor */
  b->base = Py_NewRef(obj); /* the producer's object keeps the memory */
  atomic_store(&b->ptr, t.data);
  b->nbytes = (Py_ssize_t)((size_t)t.count * elem);
  PyObject_GC_Track((PyObject*)b);
  return (PyObject*)b;
}

/* import_sim(obj): sim device memory is host memory, so a sim DeviceBuffer exported as kDLCPU
 * (a torch tensor over it) comes back here as a bytes-like object; the sim's block map says
 * which device it belongs to, and the DeviceBuffer over it keeps obj alive. */
PyObject* tl_py_sim_import(PyObject* module, PyObject* obj) {
  core_state* st = get_state(module);
  Py_buffer v;
  if (PyObject_GetBuffer(obj, &v, PyBUF_SIMPLE) < 0) return NULL;
  void* p = v.buf;
  Py_ssize_t n = v.len;
  PyBuffer_Release(&v);
  tl_device_t* d = NULL;
  int err = tl_sim_owner(p, (size_t)(n > 0 ? n : 1), &d);
  if (err == TL_ENOENT) Py_RETURN_NONE; /* other memory: a probe, not an error */
  if (err) {
    TL_DETAIL_COPY(detail);
    return tl_py_raise(st, err, detail);
  }
  PyObject* dev = tl_pydev_device_wrap(st, d);
  if (!dev) return NULL;
  DeviceBufferObject* b = tl_pydev_dbuf_new(st, dev);
  Py_DECREF(dev);
  if (!b) return NULL;
  b->base = Py_NewRef(obj); /* the exporter keeps the memory (and the sim buffer under it) */
  atomic_store(&b->ptr, p);
  b->nbytes = n;
  PyObject_GC_Track((PyObject*)b);
  return (PyObject*)b;
}

// ---------------------------------------------------------------------------------------------
// StagingPool and StagingSlot
// ---------------------------------------------------------------------------------------------

typedef struct {
  PyObject_HEAD
  PyObject* device;      /* strong */
  tl_staging_t* p;       /* owned; NULL once closed */
} StagingPoolObject;

typedef struct {
  PyObject_HEAD
  PyObject* pool;        /* strong: the pool outlives its slots */
  tl_staging_slot_t* slot; /* NULL once handed back (critical section) */
  Py_ssize_t exports;    /* live memoryviews (critical section) */
} StagingSlotObject;

static PyObject* pool_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"device", "slot_bytes", "slots", "numa_node", NULL};
  PyObject* device;
  Py_ssize_t bytes;
  int slots = 4, node = -1;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|ii:StagingPool", kwlist, &device, &bytes,
                                   &slots, &node))
    return NULL;
  PyObject* m = PyType_GetModuleByDef(type, &tl_py_core_def);
  if (!m) return NULL;
  core_state* st = get_state(m);
  tl_device_t* d = tl_pydev_device_of(st, device);
  if (!d) return NULL;
  if (bytes <= 0 || slots < 1)
    return PyErr_Format(PyExc_ValueError, "slot_bytes must be > 0 and slots >= 1 (got %zd, %d)",
                        bytes, slots);
  tl_staging_options_t o = {.device = d, .slot_bytes = (size_t)bytes, .slots = slots,
                            .numa_node = node};
  tl_staging_t* p = NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS /* an arena and cudaHostRegister: milliseconds */
  err = tl_staging_init(&p, &o);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_py_raise(st, err, detail);
  StagingPoolObject* self = (StagingPoolObject*)type->tp_alloc(type, 0);
  if (!self) {
    tl_staging_close(p);
    return NULL;
  }
  self->device = Py_NewRef(device);
  self->p = p;
  return (PyObject*)self;
}

static void pool_dealloc(PyObject* op) {
  StagingPoolObject* self = (StagingPoolObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  if (self->p) { /* every slot holds a reference: none is out */
    Py_BEGIN_ALLOW_THREADS
    tl_staging_close(self->p);
    Py_END_ALLOW_THREADS
  }
  Py_XDECREF(self->device);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static PyObject* pool_acquire(PyObject* op, PyObject* args, PyObject* kwargs) {
  int ms;
  if (tl_pydev_timeout_arg(args, kwargs, "|O:acquire", &ms) < 0) return NULL;
  StagingPoolObject* self = (StagingPoolObject*)op;
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  if (!self->p) return tl_py_raise(st, TL_ECLOSED, "StagingPool.acquire: the pool is closed");
  StagingSlotObject* s = PyObject_New(StagingSlotObject, (PyTypeObject*)st->slot_type);
  if (!s) return NULL;
  s->pool = Py_NewRef(op);
  s->slot = NULL;
  s->exports = 0;
  tl_staging_slot_t* slot = NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_staging_acquire(self->p, ms, &slot);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) {
    Py_DECREF(s);
    return tl_py_raise(st, err, detail);
  }
  s->slot = slot;
  return (PyObject*)s;
}

static PyObject* pool_stats(PyObject* op, PyObject* unused) {
  (void)unused;
  StagingPoolObject* self = (StagingPoolObject*)op;
  if (!self->p) return tl_pydev_fail_detail(op, TL_ECLOSED, "the pool is closed");
  tl_staging_stats_t s;
  int err = tl_staging_stats(self->p, &s);
  if (err) return tl_pydev_fail(op, err);
  return Py_BuildValue("{s:i,s:i,s:i,s:i,s:O,s:s,s:K,s:K,s:d}", "slots", s.slots, "free", s.free,
                       "pending", s.pending, "out", s.out, "pinned", s.pinned ? Py_True : Py_False,
                       "pin_detail", s.pin_detail, "acquires", (unsigned long long)s.acquires,
                       "waits", (unsigned long long)s.waits, "wait_s", s.wait_ns / 1e9);
}

static PyObject* pool_close(PyObject* op, PyObject* unused) {
  (void)unused;
  StagingPoolObject* self = (StagingPoolObject*)op;
  if (!self->p) Py_RETURN_NONE;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_staging_close(self->p);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail_detail(op, err, detail);
  self->p = NULL;
  Py_RETURN_NONE;
}

static PyObject* pool_get_device(PyObject* op, void* c) {
  (void)c;
  return Py_NewRef(((StagingPoolObject*)op)->device);
}

static PyMethodDef pool_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))pool_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(timeout=None) -> StagingSlot: a free slot, waiting (detached) for the oldest "
     "pending copy when none is free; TimedOutError after timeout seconds."},
    {"stats", pool_stats, METH_NOARGS,
     "dict: slots, free, pending, out, pinned, pin_detail, acquires, waits, wait_s."},
    {"close", pool_close, METH_NOARGS,
     "Waits for pending copies and frees the pool; BusyError while slots are held."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"device", pool_get_device, NULL, "the Device the slots feed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot pool_slots[] = {
    {Py_tp_doc, (void*)"StagingPool(device, slot_bytes, slots=4, numa_node=-1): page-locked host "
                       "slots on the device's NUMA node, each reused only after its last copy "
                       "completed."},
    {Py_tp_new, (void*)(uintptr_t)pool_new},
    {Py_tp_dealloc, (void*)(uintptr_t)pool_dealloc},
    {Py_tp_methods, pool_methods},
    {Py_tp_getset, pool_getset},
    {0, NULL},
};

PyType_Spec tl_py_staging_spec = {
    .name = "threadloom._core.StagingPool",
    .basicsize = sizeof(StagingPoolObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = pool_slots,
};

/* Takes the slot for a hand-back: NULL with BufferError while memoryviews live, ValueError when
 * it was handed back already. */
static tl_staging_slot_t* slot_take(PyObject* op) {
  StagingSlotObject* self = (StagingSlotObject*)op;
  tl_staging_slot_t* s = NULL;
  Py_BEGIN_CRITICAL_SECTION(op);
  if (!self->slot)
    PyErr_SetString(PyExc_ValueError, "this StagingSlot was handed back already: acquire "
                                      "another one");
  else if (self->exports > 0)
    PyErr_SetString(PyExc_BufferError, "cannot hand a StagingSlot back while memoryviews of it "
                                       "are alive: release them first (a view would let a "
                                       "producer write the slot while its copy reads it)");
  else {
    s = self->slot;
    self->slot = NULL;
  }
  Py_END_CRITICAL_SECTION();
  return s;
}

/* The arguments of copy_to_device / copy_from_device: (buffer, stream, nbytes=None), the
 * DeviceBuffer checked and its use on the stream declared. 0 or -1. */
static int slot_copy_args(PyObject* op, PyObject* args, PyObject* kwargs, const char* fmt,
                          const char* what, tl_stream_t** s, void** p, Py_ssize_t* n) {
  static char* kwlist[] = {"buffer", "stream", "nbytes", NULL};
  PyObject *buf, *stream, *nobj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kwlist, &buf, &stream, &nobj)) return -1;
  core_state* st = tl_pydev_state(op);
  if (!st || !(*s = tl_pydev_stream_of(st, stream))) return -1;
  Py_ssize_t size;
  if (dbuf_use(st, op, buf, *s, what, p, &size) < 0) return -1;
  return nbytes_arg(nobj, size, size, n);
}

static PyObject* slot_copy_to_device(PyObject* op, PyObject* args, PyObject* kwargs) {
  tl_stream_t* s;
  void* p;
  Py_ssize_t n;
  if (slot_copy_args(op, args, kwargs, "OO|O:copy_to_device", "copy_to_device destination", &s,
                     &p, &n) < 0)
    return NULL;
  tl_staging_slot_t* slot = slot_take(op);
  if (!slot) return NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_staging_copy_to_device(slot, p, (size_t)n, s);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail_detail(op, err, detail); /* the slot came back either way */
  Py_RETURN_NONE;
}

static PyObject* slot_release(PyObject* op, PyObject* args) {
  PyObject* stream = Py_None;
  if (!PyArg_ParseTuple(args, "|O:release", &stream)) return NULL;
  tl_stream_t* s = NULL;
  if (stream != Py_None) {
    core_state* st = tl_pydev_state(op);
    if (!st || !(s = tl_pydev_stream_of(st, stream))) return NULL;
  }
  tl_staging_slot_t* slot = slot_take(op);
  if (!slot) return NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_staging_release(slot, s);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail_detail(op, err, detail);
  Py_RETURN_NONE;
}

static PyObject* slot_copy_from_device(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"buffer", "stream", "nbytes", "offset", NULL};
  PyObject *buf, *stream, *nobj = Py_None;
  Py_ssize_t off = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|On:copy_from_device", kwlist, &buf, &stream,
                                   &nobj, &off))
    return NULL;
  core_state* st = tl_pydev_state(op);
  tl_stream_t* s;
  if (!st || !(s = tl_pydev_stream_of(st, stream))) return NULL;
  void* p;
  Py_ssize_t size, n;
  if (dbuf_use(st, op, buf, s, "copy_from_device source", &p, &size) < 0 ||
      nbytes_arg(nobj, size, size, &n) < 0)
    return NULL;
  StagingSlotObject* self = (StagingSlotObject*)op;
  int err = 0;
  size_t cap = 0;
  Py_BEGIN_CRITICAL_SECTION(op);
  if (!self->slot) err = 1;
  else if (off < 0 || (size_t)off > self->slot->size || (size_t)n > self->slot->size - (size_t)off) {
    err = 2;
    cap = self->slot->size;
  } else err = tl_staging_copy_from_device(self->slot, (size_t)off, p, (size_t)n, s);
  Py_END_CRITICAL_SECTION();
  if (err == 1) return PyErr_Format(PyExc_ValueError, "this StagingSlot was handed back already");
  if (err == 2)
    return PyErr_Format(PyExc_ValueError, "nbytes=%zd at offset=%zd do not fit the %zu-byte slot",
                        n, off, cap);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

/* offset_of(obj): where obj's bytes lie in the slot (a view of it made by a producer, e.g. a
 * batch collated straight into it), or None when they do not lie wholly inside or are not
 * C-contiguous. The buffer is taken and released on this call. */
static PyObject* slot_offset_of(PyObject* op, PyObject* obj) {
  Py_buffer v;
  if (PyObject_GetBuffer(obj, &v, PyBUF_C_CONTIGUOUS) < 0) {
    if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_TypeError) &&
        !PyErr_ExceptionMatches(PyExc_ValueError))
      return NULL;
    PyErr_Clear(); /* no buffer, or not contiguous: not a view of the slot */
    Py_RETURN_NONE;
  }
  StagingSlotObject* self = (StagingSlotObject*)op;
  Py_ssize_t off = -1;
  Py_BEGIN_CRITICAL_SECTION(op);
  if (self->slot) {
    uintptr_t base = (uintptr_t)self->slot->ptr, p = (uintptr_t)v.buf;
    if (p >= base && p - base <= self->slot->size && (size_t)v.len <= self->slot->size - (p - base))
      off = (Py_ssize_t)(p - base);
  }
  Py_END_CRITICAL_SECTION();
  PyBuffer_Release(&v);
  if (off < 0) Py_RETURN_NONE;
  return PyLong_FromSsize_t(off);
}

static PyObject* slot_wait(PyObject* op, PyObject* args, PyObject* kwargs) {
  int ms;
  if (tl_pydev_timeout_arg(args, kwargs, "|O:wait", &ms) < 0) return NULL;
  tl_staging_slot_t* slot = ((StagingSlotObject*)op)->slot;
  if (!slot) return PyErr_Format(PyExc_ValueError, "this StagingSlot was handed back already");
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_staging_wait(slot, ms);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail_detail(op, err, detail);
  Py_RETURN_NONE;
}

static int slot_getbuffer(PyObject* op, Py_buffer* view, int flags) {
  StagingSlotObject* self = (StagingSlotObject*)op;
  int rc = -1;
  Py_BEGIN_CRITICAL_SECTION(op);
  if (!self->slot)
    PyErr_SetString(PyExc_ValueError, "this StagingSlot was handed back: it cannot be read or "
                                      "written any more");
  else if (PyBuffer_FillInfo(view, op, self->slot->ptr, (Py_ssize_t)self->slot->size, 0,
                             flags) == 0) {
    self->exports++;
    rc = 0;
  }
  Py_END_CRITICAL_SECTION();
  return rc;
}

static void slot_releasebuffer(PyObject* op, Py_buffer* view) {
  (void)view;
  Py_BEGIN_CRITICAL_SECTION(op);
  ((StagingSlotObject*)op)->exports--;
  Py_END_CRITICAL_SECTION();
}

static void slot_dealloc(PyObject* op) {
  StagingSlotObject* self = (StagingSlotObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  if (self->slot) { /* dropped while held: back to the pool (it still waits for its copy) */
    tl_staging_release(self->slot, NULL);
    self->slot = NULL;
  }
  Py_XDECREF(self->pool);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static PyObject* slot_enter(PyObject* op, PyObject* unused) {
  (void)unused;
  return Py_NewRef(op);
}

static PyObject* slot_exit(PyObject* op, PyObject* args) {
  (void)args;
  if (!((StagingSlotObject*)op)->slot) Py_RETURN_NONE; /* handed back inside the block */
  PyObject* empty = PyTuple_New(0);
  if (!empty) return NULL;
  PyObject* r = slot_release(op, empty);
  Py_DECREF(empty);
  return r;
}

static PyObject* slot_get_nbytes(PyObject* op, void* c) {
  (void)c;
  tl_staging_slot_t* s = ((StagingSlotObject*)op)->slot;
  return PyLong_FromSize_t(s ? s->size : 0);
}
static PyObject* slot_get_index(PyObject* op, void* c) {
  (void)c;
  tl_staging_slot_t* s = ((StagingSlotObject*)op)->slot;
  return PyLong_FromLong(s ? s->index : -1);
}
static PyObject* slot_get_ptr(PyObject* op, void* c) {
  (void)c;
  tl_staging_slot_t* s = ((StagingSlotObject*)op)->slot;
  return PyLong_FromVoidPtr(s ? s->ptr : NULL);
}
static Py_ssize_t slot_len(PyObject* op) {
  tl_staging_slot_t* s = ((StagingSlotObject*)op)->slot;
  return s ? (Py_ssize_t)s->size : 0;
}

static PyMethodDef slot_methods[] = {
    {"copy_to_device", (PyCFunction)(void (*)(void))slot_copy_to_device,
     METH_VARARGS | METH_KEYWORDS,
     "copy_to_device(buffer, stream, nbytes=None): enqueues the copy of the slot's first bytes into "
     "the DeviceBuffer on stream and hands the slot back; the pool reuses it only once the "
     "copy completed. BufferError while memoryviews of the slot are alive."},
    {"copy_from_device", (PyCFunction)(void (*)(void))slot_copy_from_device,
     METH_VARARGS | METH_KEYWORDS,
     "copy_from_device(buffer, stream, nbytes=None, offset=0): enqueues a copy of the "
     "DeviceBuffer's first nbytes into the slot at offset and records the slot's event (several "
     "copies on one stream: it covers them all); wait() before reading it."},
    {"offset_of", slot_offset_of, METH_O,
     "offset_of(obj) -> int or None: where a C-contiguous bytes-like obj lies inside the slot "
     "(a view a producer made of it), None when it does not lie wholly inside."},
    {"wait", (PyCFunction)(void (*)(void))slot_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None): blocks until the slot's last copy completed."},
    {"release", slot_release, METH_VARARGS,
     "release(stream=None): hands the slot back; with a stream, reused only after the work "
     "queued there so far."},
    {"__enter__", slot_enter, METH_NOARGS, NULL},
    {"__exit__", slot_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef slot_getset[] = {
    {"nbytes", slot_get_nbytes, NULL, "the slot's size (0 once handed back)", NULL},
    {"index", slot_get_index, NULL, "the slot's number in its pool (-1 once handed back)", NULL},
    {"ptr", slot_get_ptr, NULL, "its host address (0 once handed back)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot slot_slots[] = {
    {Py_tp_doc, (void*)"A page-locked host slot of a StagingPool (a writable bytes-like object "
                       "while held). Hand it back with copy_to_device() or release()."},
    {Py_tp_dealloc, (void*)(uintptr_t)slot_dealloc},
    {Py_tp_methods, slot_methods},
    {Py_tp_getset, slot_getset},
    {Py_bf_getbuffer, (void*)(uintptr_t)slot_getbuffer},
    {Py_bf_releasebuffer, (void*)(uintptr_t)slot_releasebuffer},
    {Py_sq_length, (void*)(uintptr_t)slot_len},
    {0, NULL},
};

PyType_Spec tl_py_slot_spec = {
    .name = "threadloom._core.StagingSlot",
    .basicsize = sizeof(StagingSlotObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = slot_slots,
};
