/* python/src/wfile.c: threadloom._core.WFile, a checkpoint data file written through tl_wfile
 * (buffered, O_DIRECT or io_uring; see include/threadloom/ckptio.h).
 *
 * WFile(path, mode="direct") creates the file; write(data, offset) detaches from the interpreter
 * for the system calls, so I/O threads write in parallel with the training thread. Failures
 * raise OSError with the errno (ENOSPC, EACCES, ...) and the path, the way os.pwrite does, so
 * the Checkpointer's error handling treats both paths alike.
 *
 * Free-threading: `lock` is a reader-writer lock over `file`: write, sync and stats hold it
 * shared (any number of threads write disjoint ranges at once, as tl_wfile allows), close holds
 * it exclusive, so close waits for writes in progress and a write after close raises
 * ValueError instead of touching freed memory. Both are taken detached from the interpreter. */
#include <errno.h>
#include <pthread.h>

#include "core.h"

typedef struct {
  PyObject_HEAD
  pthread_rwlock_t lock; /* shared: write/sync/stats; exclusive: close */
  tl_wfile_t* file;      /* owned; NULL once closed (under lock, exclusive) */
  PyObject* path;        /* strong: the path as given (str), for errors and repr */
} WFileObject;

static const char* const mode_names[] = {"buffered", "direct", "uring"};

/* The errno a TL_E* code of a failed system call came from (tl_translate_sys_error's inverse for
 * the codes tl_wfile returns). */
static int errno_of(int err) {
  switch (err) {
    case TL_ENOSPC: return ENOSPC;
    case TL_EACCES: return EACCES;
    case TL_EPERM: return EPERM;
    case TL_EROFS: return EROFS;
    case TL_ENOENT: return ENOENT;
    case TL_EINVAL: return EINVAL;
    case TL_ENOMEM: return ENOMEM;
    default: return EIO;
  }
}

static PyObject* raise_os(WFileObject* self, int err, const char* detail) {
  int e = errno_of(err);
  /* OSError(errno, strerror, path) picks the subclass (FileNotFoundError, ...), as os does. */
  PyObject* exc = PyObject_CallFunction(PyExc_OSError, "isO", e, strerror(e), self->path);
  if (!exc) return NULL;
  /* The detail (the call and offset) as a note, so the message stays the os module's. */
  PyObject* r = PyObject_CallMethod(exc, "add_note", "s", detail);
  if (!r) {
    Py_DECREF(exc);
    return NULL;
  }
  Py_DECREF(r);
  PyErr_SetObject((PyObject*)Py_TYPE(exc), exc);
  Py_DECREF(exc);
  return NULL;
}

static PyObject* wfile_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"path", "mode", NULL};
  PyObject* path_obj;
  const char* mode = "direct";
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&|s:WFile", kwlist, PyUnicode_FSDecoder,
                                   &path_obj, &mode))
    return NULL;
  int want = -1;
  for (int i = 0; i < 3; i++)
    if (strcmp(mode, mode_names[i]) == 0) want = i;
  if (want < 0) {
    Py_DECREF(path_obj);
    return PyErr_Format(PyExc_ValueError, "WFile mode must be 'buffered', 'direct' or 'uring', "
                                          "not %R", PyTuple_GET_ITEM(args, 1));
  }
  PyObject* encoded = PyUnicode_EncodeFSDefault(path_obj);
  if (!encoded) {
    Py_DECREF(path_obj);
    return NULL;
  }
  WFileObject* self = (WFileObject*)type->tp_alloc(type, 0);
  if (!self) {
    Py_DECREF(encoded);
    Py_DECREF(path_obj);
    return NULL;
  }
  pthread_rwlock_init(&self->lock, NULL);
  self->path = path_obj;
  int rc;
  char detail[512];
  Py_BEGIN_ALLOW_THREADS
  rc = tl_wfile_open(&self->file, PyBytes_AS_STRING(encoded), (tl_wfile_mode_t)want);
  if (rc) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  Py_DECREF(encoded);
  if (rc) {
    raise_os(self, rc, detail);
    Py_DECREF(self);
    return NULL;
  }
  return (PyObject*)self;
}

static void wfile_dealloc(PyObject* op) {
  WFileObject* self = (WFileObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  if (self->file) tl_wfile_close(self->file); /* no other reference: nobody writes */
  pthread_rwlock_destroy(&self->lock);
  Py_XDECREF(self->path);
  tp->tp_free(op);
  Py_DECREF(tp);
}

/* Takes the lock shared, detached; returns the file or NULL (ValueError set, lock not held). */
static tl_wfile_t* enter(WFileObject* self) {
  Py_BEGIN_ALLOW_THREADS
  pthread_rwlock_rdlock(&self->lock);
  Py_END_ALLOW_THREADS
  if (!self->file) {
    pthread_rwlock_unlock(&self->lock);
    PyErr_Format(PyExc_ValueError, "WFile %R is closed", self->path);
    return NULL;
  }
  return self->file;
}

static PyObject* wfile_write(PyObject* op, PyObject* args) {
  WFileObject* self = (WFileObject*)op;
  Py_buffer view;
  unsigned long long offset;
  if (!PyArg_ParseTuple(args, "y*K:write", &view, &offset)) return NULL;
  tl_wfile_t* f = enter(self);
  if (!f) {
    PyBuffer_Release(&view);
    return NULL;
  }
  int rc;
  char detail[512];
  Py_BEGIN_ALLOW_THREADS
  rc = tl_wfile_write(f, view.buf, (size_t)view.len, offset);
  if (rc) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  pthread_rwlock_unlock(&self->lock);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&view);
  if (rc) return raise_os(self, rc, detail);
  Py_RETURN_NONE;
}

static PyObject* wfile_sync(PyObject* op, PyObject* unused) {
  (void)unused;
  WFileObject* self = (WFileObject*)op;
  tl_wfile_t* f = enter(self);
  if (!f) return NULL;
  int rc;
  char detail[512];
  Py_BEGIN_ALLOW_THREADS
  rc = tl_wfile_sync(f);
  if (rc) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  pthread_rwlock_unlock(&self->lock);
  Py_END_ALLOW_THREADS
  if (rc) return raise_os(self, rc, detail);
  Py_RETURN_NONE;
}

static PyObject* wfile_stats(PyObject* op, PyObject* unused) {
  (void)unused;
  WFileObject* self = (WFileObject*)op;
  tl_wfile_t* f = enter(self);
  if (!f) return NULL;
  tl_wfile_stats_t st;
  tl_wfile_stats(f, &st);
  pthread_rwlock_unlock(&self->lock);
  return Py_BuildValue("{sssssKsK}", "mode", mode_names[st.mode], "why", st.why, "direct_bytes",
                       (unsigned long long)st.direct_bytes, "buffered_bytes",
                       (unsigned long long)st.buffered_bytes);
}

static PyObject* wfile_close(PyObject* op, PyObject* unused) {
  (void)unused;
  WFileObject* self = (WFileObject*)op;
  int rc = 0;
  char detail[512];
  Py_BEGIN_ALLOW_THREADS
  pthread_rwlock_wrlock(&self->lock);
  tl_wfile_t* f = self->file;
  self->file = NULL;
  pthread_rwlock_unlock(&self->lock);
  if (f) {
    rc = tl_wfile_close(f);
    if (rc) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  }
  Py_END_ALLOW_THREADS
  if (rc) return raise_os(self, rc, detail);
  Py_RETURN_NONE;
}

static PyObject* wfile_repr(PyObject* op) {
  WFileObject* self = (WFileObject*)op;
  return PyUnicode_FromFormat("<threadloom._core.WFile %R>", self->path);
}

static PyMethodDef wfile_methods[] = {
    {"write", wfile_write, METH_VARARGS,
     "write(data, offset): writes all of a C-contiguous bytes-like object at offset (any "
     "thread; disjoint ranges in parallel). The aligned part goes O_DIRECT in direct/uring "
     "mode. Raises OSError (ENOSPC, EIO, ...) like os.pwrite."},
    {"sync", wfile_sync, METH_NOARGS, "fsync: everything written is durable when it returns."},
    {"stats", wfile_stats, METH_NOARGS,
     "{'mode': 'direct', 'why': '', 'direct_bytes': n, 'buffered_bytes': n}: the mode in use "
     "(lower than asked when the file system or kernel refused; 'why' says why)."},
    {"close", wfile_close, METH_NOARGS,
     "Closes the file (waits for writes in progress); later calls raise ValueError. Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot wfile_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)wfile_new},
    {Py_tp_dealloc, (void*)(uintptr_t)wfile_dealloc},
    {Py_tp_repr, (void*)(uintptr_t)wfile_repr},
    {Py_tp_methods, wfile_methods},
    {Py_tp_doc, "WFile(path, mode='direct'): creates `path` (never overwrites) for checkpoint "
                "writes: 'buffered' (page cache), 'direct' (O_DIRECT for aligned ranges: "
                "offsets, lengths and addresses multiples of WFILE_ALIGN; the rest buffered) or "
                "'uring' (O_DIRECT through io_uring). Falls back when refused; stats() says."},
    {0, NULL},
};

PyType_Spec tl_py_wfile_spec = {
    .name = "threadloom._core.WFile",
    .basicsize = sizeof(WFileObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = wfile_slots,
};
