/* python/src/nccl.c: NCCL unique ids and communicators for threadloom.cluster.
 *
 * _core.nccl_unique_id() -> 128 bytes (ncclGetUniqueId; no GPU needed), and
 * _core.NcclComm(unique_id, nranks, rank, device): one ncclComm_t, made by the GPU thread that
 * will drive it (ncclCommInitRank blocks until every rank of the world has joined, detached from
 * the interpreter). abort() may come from any thread (the cluster watchdog) while another thread
 * uses the communicator; close() destroys it.
 *
 * Free-threading: `lock` serialises abort() and close() (the C layer allows abort concurrently
 * with NCCL calls and with itself, not with close, which frees the communicator). Waiting for
 * the lock and the NCCL calls themselves detach from the interpreter, so an abort that takes a
 * while never stalls other Python threads. */
#include "core.h"

typedef struct {
  PyObject_HEAD
  PyMutex lock;          /* guards comm against close() racing abort() */
  tl_nccl_comm_t* comm;  /* owned; NULL after close() */
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

static PyObject* ncclcomm_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"unique_id", "nranks", "rank", "device", NULL};
  Py_buffer uid;
  int nranks, rank, device;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iii:NcclComm", kwlist, &uid, &nranks, &rank,
                                   &device))
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
  NcclCommObject* self = (NcclCommObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->nranks = nranks;
  self->rank = rank;
  self->device = device;
  tl_nccl_comm_t* c = NULL;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_nccl_comm_init(&c, &id, nranks, rank, device, -1); /* no timeout */
  Py_END_ALLOW_THREADS
  if (err) {
    tl_py_fail_obj((PyObject*)self, err); /* same OS thread: the detail is still there */
    Py_DECREF(self);
    return NULL;
  }
  self->comm = c;
  return (PyObject*)self;
}

static void ncclcomm_dealloc(PyObject* op) {
  NcclCommObject* self = (NcclCommObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  if (self->comm) {
    /* Dropped without close(): destroy it (ncclCommDestroy waits for pending work). */
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
    {"device", Py_T_INT, offsetof(NcclCommObject, device), Py_READONLY, "Its CUDA device."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef ncclcomm_getset[] = {
    {"aborted", ncclcomm_get_aborted, NULL, "True once abort() ran (and before close()).", NULL},
    {"closed", ncclcomm_get_closed, NULL, "True after close().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef ncclcomm_methods[] = {
    {"abort", ncclcomm_abort, METH_NOARGS,
     "abort(): ncclCommAbort, from any thread; NCCL calls blocked on it return. Idempotent."},
    {"close", ncclcomm_close, METH_NOARGS,
     "close(): ncclCommDestroy (nothing more after abort()). Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot ncclcomm_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)ncclcomm_new},
    {Py_tp_dealloc, (void*)(uintptr_t)ncclcomm_dealloc},
    {Py_tp_repr, (void*)(uintptr_t)ncclcomm_repr},
    {Py_tp_methods, ncclcomm_methods},
    {Py_tp_members, ncclcomm_members},
    {Py_tp_getset, ncclcomm_getset},
    {Py_tp_doc, "NcclComm(unique_id, nranks, rank, device): one NCCL communicator rank, made on "
                "the calling thread's `device` (ncclCommInitRank; blocks until every rank joined). "
                "Raises LibraryNotFoundError without libnccl.so.2, NoDriverError/NoDeviceError "
                "without a GPU, NcclError when NCCL fails."},
    {0, NULL},
};

PyType_Spec tl_py_ncclcomm_spec = {
    .name = "threadloom._core.NcclComm",
    .basicsize = sizeof(NcclCommObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = ncclcomm_slots,
};
