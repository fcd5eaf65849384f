/* python/src/nccl.c: NCCL unique ids, communicators and their collectives.
 *
 * _core.nccl_unique_id() -> 128 bytes (ncclGetUniqueId; no GPU needed), and
 * _core.NcclComm(unique_id, nranks, rank, device, timeout=None): one ncclComm_t, made by the GPU
 * thread that will drive it (non-blocking init, polled until every rank joined, detached from
 * the interpreter; aborted after `timeout` seconds). Its collectives take CUDA tensors through
 * DLPack (torch, cupy, JAX), on the communicator's device, and enqueue NCCL work on a CUDA
 * stream: the `stream=` argument (an int cudaStream_t or an object with .cuda_stream, such as
 * torch.cuda.Stream), by default torch's current stream of the device when torch is already
 * imported, else the legacy default stream (0). They return once the work is enqueued, like
 * torch.distributed's: the result is ready in stream order. abort() may come from any thread
 * (the cluster watchdog, spmd's failure handling) while another thread is in a collective;
 * close() destroys it. threadloom.comm.NcclComm subclasses it with allreduce_buckets (Python:
 * it flattens with the tensors' own library, then calls allreduce here per bucket).
 *
 * Free-threading: `lock` guards `comm` and `users`: abort() and close() hold it around their C
 * call (the C layer allows abort concurrently with collectives and with itself, not with close,
 * which frees the communicator); a collective holds it only to check `comm` and count itself in
 * `users`, and close() refuses (BusyError) while users > 0, so it never frees a communicator a
 * collective is using. The NCCL calls themselves detach from the interpreter. */
#include "core.h"

typedef struct {
  PyObject_HEAD
  PyMutex lock;          /* guards comm and users */
  tl_nccl_comm_t* comm;  /* owned; NULL after close() */
  int users;             /* collectives running on comm (any thread); close() waits for none */
  int nranks;            /* the world's size */
  int rank;              /* this communicator's rank */
  int device;            /* the CUDA device it was made on */
} NcclCommObject;

PyObject* tl_py_nccl_unique_id(PyObject* module, PyObject* unused) {
  (void)unused;
  tl_nccl_id_t id;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_nccl_unique_id(&id);
  Py_END_ALLOW_THREADS
  if (err) return tl_py_fail(module, err);
  return PyBytes_FromStringAndSize((const char*)id.bytes, sizeof id.bytes);
}

/* Milliseconds of a timeout in seconds (None: -1, no limit); -1 and ValueError on a bad one. */
static int timeout_ms(PyObject* timeout, int* out) {
  *out = -1;
  if (!timeout || timeout == Py_None) return 0;
  double t = PyFloat_AsDouble(timeout);
  if (t == -1.0 && PyErr_Occurred()) return -1;
  if (!(t > 0) || t > 2e6) {
    PyErr_Format(PyExc_ValueError, "timeout must be positive seconds (below 2e6) or None, not %R",
                 timeout);
    return -1;
  }
  *out = (int)(t * 1000.0 + 0.5);
  if (*out == 0) *out = 1;
  return 0;
}

static PyObject* ncclcomm_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"unique_id", "nranks", "rank", "device", "timeout", NULL};
  Py_buffer uid;
  int nranks, rank, device, ms;
  PyObject* timeout = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iii|O:NcclComm", kwlist, &uid, &nranks, &rank,
                                   &device, &timeout))
    return NULL;
  if (uid.len != TL_NCCL_ID_BYTES) {
    PyErr_Format(PyExc_ValueError, "NcclComm: unique_id must be %d bytes (from nccl_unique_id()), "
                 "not %zd", TL_NCCL_ID_BYTES, uid.len);
    PyBuffer_Release(&uid);
    return NULL;
  }
  tl_nccl_id_t id;
  memcpy(id.bytes, uid.buf, sizeof id.bytes);
  PyBuffer_Release(&uid);
  if (timeout_ms(timeout, &ms) < 0) return NULL;
  NcclCommObject* self = (NcclCommObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->nranks = nranks;
  self->rank = rank;
  self->device = device;
  tl_nccl_comm_t* c = NULL;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_nccl_comm_init(&c, &id, nranks, rank, device, ms);
  Py_END_ALLOW_THREADS
  if (err) {
    tl_py_fail_obj((PyObject*)self, err); /* same OS thread: the detail is still there */
    Py_DECREF(self);
    return NULL;
  }
  self->comm = c;
  return (PyObject*)self;
}

/* _core._nccl_comm_closed(nranks, rank, device, type=NcclComm): an NcclComm (or an instance of
 * the subclass `type`, threadloom.comm.NcclComm) that is already closed, for tests of the
 * collectives' argument checks on machines without a GPU (every check that needs no
 * communicator runs before the closed state is reported). */
PyObject* tl_py_nccl_comm_closed(PyObject* module, PyObject* args) {
  int nranks, rank, device;
  PyTypeObject* base = (PyTypeObject*)get_state(module)->ncclcomm_type;
  PyTypeObject* type = base;
  if (!PyArg_ParseTuple(args, "iii|O!:_nccl_comm_closed", &nranks, &rank, &device, &PyType_Type,
                        &type))
    return NULL;
  if (!PyType_IsSubtype(type, base)) {
    PyErr_Format(PyExc_TypeError, "_nccl_comm_closed: %s is not an NcclComm type", type->tp_name);
    return NULL;
  }
  NcclCommObject* self = (NcclCommObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->nranks = nranks;
  self->rank = rank;
  self->device = device;
  return (PyObject*)self;
}

static void ncclcomm_dealloc(PyObject* op) {
  NcclCommObject* self = (NcclCommObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  if (self->comm) {
    /* Dropped without close(): destroy it (no collective can run: they hold a reference). */
    tl_nccl_comm_t* c = self->comm;
    self->comm = NULL;
    Py_BEGIN_ALLOW_THREADS
    tl_nccl_comm_close(c);
    Py_END_ALLOW_THREADS
  }
  tp->tp_free(op);
  Py_DECREF(tp); /* heap type: each instance holds a reference to its type */
}

static PyObject* ncclcomm_abort(PyObject* op, PyObject* unused) {
  (void)unused;
  NcclCommObject* self = (NcclCommObject*)op;
  int err = 0;
  PyMutex_Lock(&self->lock);
  tl_nccl_comm_t* c = self->comm;
  if (c) {
    Py_BEGIN_ALLOW_THREADS
    err = tl_nccl_comm_abort(c);
    Py_END_ALLOW_THREADS
  }
  PyMutex_Unlock(&self->lock);
  if (err) return tl_py_fail_obj(op, err);
  Py_RETURN_NONE;
}

static PyObject* ncclcomm_close(PyObject* op, PyObject* unused) {
  (void)unused;
  NcclCommObject* self = (NcclCommObject*)op;
  int err = 0;
  PyMutex_Lock(&self->lock);
  if (self->users > 0) {
    int users = self->users;
    PyMutex_Unlock(&self->lock);
    PyObject* module = tl_py_module_of(op);
    char detail[200];
    snprintf(detail, sizeof detail, "NcclComm.close: %d collective(s) still running on it in "
             "other threads; abort() first to make them return, then close()", users);
    return module ? tl_py_raise(get_state(module), TL_EBUSY, detail) : NULL;
  }
  tl_nccl_comm_t* c = self->comm;
  self->comm = NULL;
  if (c) {
    Py_BEGIN_ALLOW_THREADS
    err = tl_nccl_comm_close(c);
    Py_END_ALLOW_THREADS
  }
  PyMutex_Unlock(&self->lock);
  if (err) return tl_py_fail_obj(op, err);
  Py_RETURN_NONE;
}

static PyObject* ncclcomm_check(PyObject* op, PyObject* unused) {
  (void)unused;
  NcclCommObject* self = (NcclCommObject*)op;
  int err = TL_ECLOSED;
  PyMutex_Lock(&self->lock);
  tl_nccl_comm_t* c = self->comm;
  if (c) {
    Py_BEGIN_ALLOW_THREADS
    err = tl_nccl_comm_check(c);
    Py_END_ALLOW_THREADS
  }
  PyMutex_Unlock(&self->lock);
  if (err) return tl_py_fail_obj(op, err);
  Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------------------------
// Collectives
// ---------------------------------------------------------------------------------------------

enum { COLL_ALLREDUCE, COLL_BROADCAST, COLL_ALLGATHER, COLL_REDUCE_SCATTER };
static const char* const coll_names[] = {"NcclComm.allreduce", "NcclComm.broadcast",
                                         "NcclComm.allgather", "NcclComm.reduce_scatter"};

static int parse_op(PyObject* op, tl_nccl_op_t* out) {
  static const char* const names[] = {"sum", "prod", "max", "min", "avg"};
  if (op && PyUnicode_Check(op)) {
    for (int i = 0; i < 5; i++)
      if (PyUnicode_CompareWithASCIIString(op, names[i]) == 0) {
        *out = (tl_nccl_op_t)i;
        return 0;
      }
  }
  PyErr_Format(PyExc_ValueError, "op must be one of sum, prod, max, min, avg, not %R", op);
  return -1;
}

/* An explicit stream: None (*given = 0), an int >= 0, or an object with an int .cuda_stream. */
static int parse_stream(PyObject* stream, unsigned long long* out, int* given) {
  *out = 0;
  *given = stream && stream != Py_None;
  if (!*given) return 0;
  PyObject* handle;
  if (PyLong_Check(stream)) {
    handle = Py_NewRef(stream);
  } else {
    handle = PyObject_GetAttrString(stream, "cuda_stream");
    if (!handle) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "stream must be None, an int cudaStream_t or an object with "
                   ".cuda_stream (torch.cuda.Stream, cupy.cuda.Stream), not %T", stream);
      return -1;
    }
  }
  *out = PyLong_AsUnsignedLongLong(handle);
  Py_DECREF(handle);
  if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "stream handle must be a non-negative int, not %R", stream);
    return -1;
  }
  return 0;
}

/* The default stream: torch.cuda.current_stream(device) when torch is already imported, else
 * 0, the legacy default stream. PyImport_GetModule only looks in sys.modules: it never imports
 * (the extension imports no Python module; tests/python/test_layers.py checks). */
static int default_stream(int device, unsigned long long* out) {
  *out = 0;
  PyObject* name = PyUnicode_FromString("torch");
  if (!name) return -1;
  PyObject* torch = PyImport_GetModule(name); /* new reference, or NULL when not imported */
  Py_DECREF(name);
  if (!torch) return PyErr_Occurred() ? -1 : 0;
  PyObject* cuda = PyObject_GetAttrString(torch, "cuda");
  Py_DECREF(torch);
  if (!cuda) return -1;
  PyObject* s = PyObject_CallMethod(cuda, "current_stream", "i", device);
  Py_DECREF(cuda);
  if (!s) return -1;
  int given;
  int rc = parse_stream(s, out, &given);
  Py_DECREF(s);
  return rc;
}

/* Counts a collective in; ClosedError when closed. Returns the communicator or NULL. */
static tl_nccl_comm_t* enter(NcclCommObject* self) {
  PyMutex_Lock(&self->lock);
  tl_nccl_comm_t* c = self->comm;
  if (c) self->users++;
  PyMutex_Unlock(&self->lock);
  if (!c) {
    PyObject* module = tl_py_module_of((PyObject*)self);
    if (module) tl_py_raise(get_state(module), TL_ECLOSED, "this NcclComm was closed");
  }
  return c;
}

static void leave(NcclCommObject* self) {
  PyMutex_Lock(&self->lock);
  self->users--;
  PyMutex_Unlock(&self->lock);
}

static int same_dtype(tl_dtype_t a, tl_dtype_t b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

/* One collective: checks in the order arguments -> DLPack devices -> the exported tensors
 * (shape, dtype agreement, read-only) -> closed, then calls C (dtype, op and sizes are checked
 * there).
 * `x` is the input (and the result for allreduce/broadcast), `out` the result of allgather and
 * reduce-scatter. Returns a new reference to the result tensor. */
static PyObject* collective(NcclCommObject* self, int kind, PyObject* x, PyObject* out,
                            PyObject* opname, int root, PyObject* stream) {
  const char* what = coll_names[kind];
  PyObject* module = tl_py_module_of((PyObject*)self);
  if (!module) return NULL;
  tl_nccl_op_t op = TL_NCCL_SUM;
  if ((kind == COLL_ALLREDUCE || kind == COLL_REDUCE_SCATTER) && parse_op(opname, &op) < 0)
    return NULL;
  if (kind == COLL_BROADCAST && (root < 0 || root >= self->nranks)) {
    PyErr_Format(PyExc_ValueError, "%s: src must be a rank in 0..%d, not %d", what,
                 self->nranks - 1, root);
    return NULL;
  }
  int two = kind == COLL_ALLGATHER || kind == COLL_REDUCE_SCATTER;
  if (two && (!out || out == Py_None)) {
    PyErr_Format(PyExc_TypeError, "%s on CUDA tensors needs out=, a tensor of %s elements on "
                 "cuda:%d (NcclComm allocates no device memory), e.g. x.new_empty(...)", what,
                 kind == COLL_ALLGATHER ? "world_size * x.numel()" : "x.numel() // world_size",
                 self->device);
    return NULL;
  }
  unsigned long long s;
  int given;
  if (parse_stream(stream, &s, &given) < 0) return NULL;
  if (tl_py_dlpack_cuda_device(module, x, what, self->device) < 0) return NULL;
  if (two && tl_py_dlpack_cuda_device(module, out, what, self->device) < 0) return NULL;
  tl_py_cuda_tensor_t tx = {0}, tout = {0};
  tl_nccl_comm_t* c = NULL;
  PyObject* result = NULL;
  if (!given && default_stream(self->device, &s) < 0) goto done;
  if (tl_py_dlpack_cuda_borrow(module, x, s, self->device, what, &tx) < 0) goto done;
  if (two && tl_py_dlpack_cuda_borrow(module, out, s, self->device, what, &tout) < 0) goto done;
  tl_py_cuda_tensor_t* res = two ? &tout : &tx;
  if (res->readonly) {
    PyErr_Format(PyExc_BufferError, "%s: the result tensor is read-only (its producer set "
                 "DLPACK_FLAG_BITMASK_READ_ONLY)", what);
    goto done;
  }
  if (two) {
    if (!same_dtype(tx.dtype, tout.dtype)) {
      PyErr_Format(PyExc_TypeError, "%s: x and out have different dtypes", what);
      goto done;
    }
    int64_t big = kind == COLL_ALLGATHER ? tout.count : tx.count;
    int64_t small = kind == COLL_ALLGATHER ? tx.count : tout.count;
    if (small > INT64_MAX / self->nranks || big != small * self->nranks) {
      PyErr_Format(PyExc_ValueError, "%s: %s has %lld elements and %s %lld; with %d ranks the "
                   "larger must be world_size times the smaller", what,
                   kind == COLL_ALLGATHER ? "out" : "x", (long long)big,
                   kind == COLL_ALLGATHER ? "x" : "out", (long long)small, self->nranks);
      goto done;
    }
  }
  c = enter(self);
  if (!c) goto done;
  int err;
  void* sp = (void*)(uintptr_t)s;
  Py_BEGIN_ALLOW_THREADS
  switch (kind) {
    case COLL_ALLREDUCE:
      err = tl_nccl_allreduce(c, tx.data, tx.data, (size_t)tx.count, tx.dtype, op, sp);
      break;
    case COLL_BROADCAST:
      err = tl_nccl_broadcast(c, tx.data, tx.data, (size_t)tx.count, tx.dtype, root, sp);
      break;
    case COLL_ALLGATHER:
      err = tl_nccl_allgather(c, tx.data, tout.data, (size_t)tx.count, tx.dtype, sp);
      break;
    default:
      err = tl_nccl_reduce_scatter(c, tx.data, tout.data, (size_t)tout.count, tx.dtype, op, sp);
      break;
  }
  Py_END_ALLOW_THREADS
  if (err) {
    tl_py_fail_obj((PyObject*)self, err);
    goto done;
  }
  result = Py_NewRef(two ? out : x);
done:
  tl_py_dlpack_cuda_release(&tx);
  tl_py_dlpack_cuda_release(&tout);
  if (c) leave(self);
  return result;
}

static PyObject* ncclcomm_allreduce(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"x", "op", "stream", NULL};
  PyObject *x, *name = NULL, *stream = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O$O:allreduce", kwlist, &x, &name, &stream))
    return NULL;
  PyObject* sum = NULL;
  if (!name) name = sum = PyUnicode_FromString("sum");
  PyObject* r = name ? collective((NcclCommObject*)op, COLL_ALLREDUCE, x, NULL, name, 0, stream)
                     : NULL;
  Py_XDECREF(sum);
  return r;
}

static PyObject* ncclcomm_broadcast(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"x", "src", "stream", NULL};
  PyObject *x, *stream = Py_None;
  int src = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i$O:broadcast", kwlist, &x, &src, &stream))
    return NULL;
  return collective((NcclCommObject*)op, COLL_BROADCAST, x, NULL, NULL, src, stream);
}

static PyObject* ncclcomm_allgather(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"x", "out", "stream", NULL};
  PyObject *x, *out = Py_None, *stream = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O$O:allgather", kwlist, &x, &out, &stream))
    return NULL;
  return collective((NcclCommObject*)op, COLL_ALLGATHER, x, out, NULL, 0, stream);
}

static PyObject* ncclcomm_reduce_scatter(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"x", "op", "out", "stream", NULL};
  PyObject *x, *name = NULL, *out = Py_None, *stream = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|OO$O:reduce_scatter", kwlist, &x, &name,
                                   &out, &stream))
    return NULL;
  PyObject* sum = NULL;
  if (!name) name = sum = PyUnicode_FromString("sum");
  PyObject* r = name ? collective((NcclCommObject*)op, COLL_REDUCE_SCATTER, x, out, name, 0,
                                  stream)
                     : NULL;
  Py_XDECREF(sum);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Attributes and the type
// ---------------------------------------------------------------------------------------------

static PyObject* ncclcomm_get_aborted(PyObject* op, void* closure) {
  (void)closure;
  NcclCommObject* self = (NcclCommObject*)op;
  PyMutex_Lock(&self->lock);
  int aborted = self->comm ? tl_nccl_comm_aborted(self->comm) : 0;
  PyMutex_Unlock(&self->lock);
  return PyBool_FromLong(aborted);
}

static PyObject* ncclcomm_get_closed(PyObject* op, void* closure) {
  (void)closure;
  NcclCommObject* self = (NcclCommObject*)op;
  PyMutex_Lock(&self->lock);
  int closed = self->comm == NULL;
  PyMutex_Unlock(&self->lock);
  return PyBool_FromLong(closed);
}

static PyObject* ncclcomm_repr(PyObject* op) {
  NcclCommObject* self = (NcclCommObject*)op;
  return PyUnicode_FromFormat("<NcclComm rank %d of %d on cuda:%d>", self->rank, self->nranks,
                              self->device);
}

static PyMemberDef ncclcomm_members[] = {
    {"rank", Py_T_INT, offsetof(NcclCommObject, rank), Py_READONLY, "This communicator's rank."},
    {"nranks", Py_T_INT, offsetof(NcclCommObject, nranks), Py_READONLY, "The world's size."},
    {"world_size", Py_T_INT, offsetof(NcclCommObject, nranks), Py_READONLY,
     "The world's size (CpuComm's name for it)."},
    {"device", Py_T_INT, offsetof(NcclCommObject, device), Py_READONLY, "Its CUDA device."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef ncclcomm_getset[] = {
    {"aborted", ncclcomm_get_aborted, NULL,
     "True once the communicator was aborted (abort(), an asynchronous NCCL error, a timeout) "
     "and before close().", NULL},
    {"closed", ncclcomm_get_closed, NULL, "True after close().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define STREAM_DOC                                                                           \
  " stream: an int cudaStream_t or an object with .cuda_stream (torch.cuda.Stream); default: " \
  "torch's current stream of the device when torch is imported, else the legacy default "     \
  "stream. Returns once enqueued (the result is ready in stream order). Raises "             \
  "InvalidArgumentError for host tensors (use CpuComm) or a tensor on another device, "      \
  "ClosedError, CanceledError (aborted), TimedOutError, NcclError."

static PyMethodDef ncclcomm_methods[] = {
    {"allreduce", (PyCFunction)(void (*)(void))ncclcomm_allreduce, METH_VARARGS | METH_KEYWORDS,
     "allreduce(x, op='sum', *, stream=None) -> x: reduces the CUDA tensor x across ranks in "
     "place (sum, prod, max, min, avg; avg on float dtypes only)." STREAM_DOC},
    {"broadcast", (PyCFunction)(void (*)(void))ncclcomm_broadcast, METH_VARARGS | METH_KEYWORDS,
     "broadcast(x, src=0, *, stream=None) -> x: overwrites x with rank src's x." STREAM_DOC},
    {"allgather", (PyCFunction)(void (*)(void))ncclcomm_allgather, METH_VARARGS | METH_KEYWORDS,
     "allgather(x, out, *, stream=None) -> out: every rank's x in rank order into out "
     "(world_size * x.numel() elements, same dtype and device)." STREAM_DOC},
    {"reduce_scatter", (PyCFunction)(void (*)(void))ncclcomm_reduce_scatter,
     METH_VARARGS | METH_KEYWORDS,
     "reduce_scatter(x, op='sum', out, *, stream=None) -> out: chunk `rank` of the reduction of "
     "x (world_size * out.numel() elements) into out." STREAM_DOC},
    {"check", ncclcomm_check, METH_NOARGS,
     "check(): raises NcclError (and aborts the communicator) when NCCL reports an asynchronous "
     "error (ncclCommGetAsyncError), CanceledError once aborted; for watchdogs."},
    {"abort", ncclcomm_abort, METH_NOARGS,
     "abort(): ncclCommAbort, from any thread; collectives running or queued on it fail with "
     "CanceledError. Idempotent."},
    {"close", ncclcomm_close, METH_NOARGS,
     "close(): ncclCommDestroy (nothing more after abort()). Idempotent. BusyError while "
     "another thread is in a collective on it."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot ncclcomm_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)ncclcomm_new},
    {Py_tp_dealloc, (void*)(uintptr_t)ncclcomm_dealloc},
    {Py_tp_repr, (void*)(uintptr_t)ncclcomm_repr},
    {Py_tp_methods, ncclcomm_methods},
    {Py_tp_members, ncclcomm_members},
    {Py_tp_getset, ncclcomm_getset},
    {Py_tp_doc, "NcclComm(unique_id, nranks, rank, device, timeout=None): one NCCL communicator "
                "rank, made on the calling thread's `device` (non-blocking "
                "ncclCommInitRankConfig, polled until every rank joined; after `timeout` "
                "seconds it is aborted and TimedOutError raised; the same bound applies to each "
                "later wait on NCCL). Raises LibraryNotFoundError without libnccl.so.2, "
                "NoDriverError/NoDeviceError without a GPU, NcclError when NCCL fails."},
    {0, NULL},
};

PyType_Spec tl_py_ncclcomm_spec = {
    .name = "threadloom._core.NcclComm",
    .basicsize = sizeof(NcclCommObject),
    /* a base type: threadloom.comm.NcclComm adds allreduce_buckets, which is Python */
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_BASETYPE,
    .slots = ncclcomm_slots,
};
