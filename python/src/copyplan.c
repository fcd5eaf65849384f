/* python/src/copyplan.c: threadloom._core.CopyPlan, the Checkpointer's staging copy split
 * into pieces that several threads copy at once.
 *
 * Why C: on a free-threaded interpreter a memoryview is not safe to share between threads.
 * Slicing one (mbuf_add_view) and dropping a slice change its managed buffer's export count
 * with a plain ++/-- (CPython 3.13 Objects/memoryobject.c), so slices of one tensor or one
 * staging slot made or freed on two threads at once can lose an update: the buffer is then
 * released under live views ("operation forbidden on released memoryview object", seen in the
 * kill -9 test) or never. A plan takes the buffers once, on the thread that plans (add), keeps
 * raw pointers, and gives them back on that thread (close); work() touches no Python object.
 *
 * Use (the owner is the thread that creates the plan):
 *   plan = CopyPlan(piece_bytes)
 *   plan.add(dst, dst_offset, src, src_offset, n)   # owner, before any work(): plans
 *   executor.submit(plan.work)                      # helpers, any thread
 *   plan.work()                                     # the owner copies too
 *   plan.close()                                    # owner: waits, releases the buffers
 *
 * Invariants. Pieces are [piece_end[i-1], piece_end[i]) of `ops`, fixed once work() has
 * started (add raises after it). `next` hands out piece indices: each piece goes to exactly one
 * work() call (atomic fetch-add), and `done` counts the pieces copied (release after the copy,
 * acquire by close). close() sets `next` past every piece, so no piece is handed out after it,
 * then waits until done equals the pieces handed out before, so when it returns no thread is
 * copying, and only then releases the buffers. A work() that starts after close() copies
 * nothing. The buffers are released on the owner's thread (close, or dealloc when close was
 * never called: then no thread holds a reference, so none is in work()). */
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "core.h"

typedef struct {
  char* dst;
  const char* src;
  Py_ssize_t n;
} copy_op_t;

typedef struct {
  PyObject_HEAD
  Py_ssize_t piece_bytes;    /* a piece ends once it holds this many bytes */
  Py_buffer* bufs;           /* the buffers held (owner only) */
  Py_ssize_t nbufs, capbufs;
  copy_op_t* ops;
  Py_ssize_t nops, capops;
  Py_ssize_t* piece_end;     /* piece i = ops [i ? piece_end[i-1] : 0, piece_end[i]) */
  Py_ssize_t npieces, cappieces;
  Py_ssize_t open_bytes;     /* bytes in the last piece */
  Py_ssize_t nbytes;         /* every op's bytes */
  _Atomic Py_ssize_t next;   /* the next piece to hand out */
  _Atomic Py_ssize_t done;   /* pieces copied */
  _Atomic int started;       /* work() has been called: add() refuses */
  int closed;                /* owner only */
} CopyPlanObject;

/* Past every piece: what close() stores into `next`. */
#define TL_CP_CLOSED (PY_SSIZE_T_MAX / 2)

static int grow(void** arr, Py_ssize_t* cap, Py_ssize_t need, size_t elem) {
  if (need <= *cap) return 0;
  Py_ssize_t c = *cap ? *cap * 2 : 16;
  while (c < need) c *= 2;
  void* p = PyMem_Realloc(*arr, (size_t)c * elem);
  if (!p) {
    PyErr_NoMemory();
    return -1;
  }
  *arr = p;
  *cap = c;
  return 0;
}

static void release_all(CopyPlanObject* self) {
  for (Py_ssize_t i = 0; i < self->nbufs; i++) PyBuffer_Release(&self->bufs[i]);
  self->nbufs = 0;
}

static PyObject* copyplan_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"piece_bytes", NULL};
  Py_ssize_t piece = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n:CopyPlan", kwlist, &piece)) return NULL;
  if (piece <= 0) {
    PyErr_SetString(PyExc_ValueError, "CopyPlan: piece_bytes must be > 0");
    return NULL;
  }
  CopyPlanObject* self = (CopyPlanObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->piece_bytes = piece;
  atomic_init(&self->next, 0);
  atomic_init(&self->done, 0);
  atomic_init(&self->started, 0);
  return (PyObject*)self;
}

static void copyplan_dealloc(PyObject* op) {
  CopyPlanObject* self = (CopyPlanObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  release_all(self);
  PyMem_Free(self->bufs);
  PyMem_Free(self->ops);
  PyMem_Free(self->piece_end);
  tp->tp_free(op);
  Py_DECREF(tp);
}

/* The held buffer of `obj` (the newest one taken with the same writability), or a new one. */
/* The index in self->bufs of obj's buffer (taken now, or one of the last four taken), or -1.
 * An index, not a pointer: taking the next buffer may move the array (realloc). */
static Py_ssize_t buffer_of(CopyPlanObject* self, PyObject* obj, int writable) {
  for (Py_ssize_t i = self->nbufs - 1; i >= 0 && i >= self->nbufs - 4; i--)
    if (self->bufs[i].obj == obj && (!writable || !self->bufs[i].readonly)) return i;
  if (grow((void**)&self->bufs, &self->capbufs, self->nbufs + 1, sizeof(Py_buffer)) < 0)
    return -1;
  Py_buffer* b = &self->bufs[self->nbufs];
  if (PyObject_GetBuffer(obj, b, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return -1;
  return self->nbufs++;
}

static PyObject* copyplan_add(PyObject* op, PyObject* args) {
  CopyPlanObject* self = (CopyPlanObject*)op;
  PyObject *dst, *src;
  Py_ssize_t doff, soff, n;
  if (!PyArg_ParseTuple(args, "OnOnn:add", &dst, &doff, &src, &soff, &n)) return NULL;
  if (self->closed || atomic_load_explicit(&self->started, memory_order_relaxed)) {
    PyErr_SetString(PyExc_RuntimeError,
                    "CopyPlan.add: the plan is already being copied (or closed): add every copy "
                    "before the first work()");
    return NULL;
  }
  if (doff < 0 || soff < 0 || n < 0) {
    PyErr_SetString(PyExc_ValueError, "CopyPlan.add: offsets and length must be >= 0");
    return NULL;
  }
  Py_ssize_t di = buffer_of(self, dst, 1);
  if (di < 0) return NULL;
  Py_ssize_t si = buffer_of(self, src, 0);
  if (si < 0) return NULL;
  Py_buffer* d = &self->bufs[di]; /* after both: the second may have moved the array */
  Py_buffer* s = &self->bufs[si];
  if (doff > d->len || n > d->len - doff || soff > s->len || n > s->len - soff) {
    PyErr_Format(PyExc_ValueError,
                 "CopyPlan.add: %zd bytes at %zd of a %zd-byte destination, from %zd of a "
                 "%zd-byte source: out of range", n, doff, d->len, soff, s->len);
    return NULL;
  }
  char* dp = (char*)d->buf + doff;
  const char* sp = (const char*)s->buf + soff;
  Py_ssize_t pos = 0;
  while (pos < n) {
    if (self->npieces == 0 || self->open_bytes >= self->piece_bytes) {
      if (grow((void**)&self->piece_end, &self->cappieces, self->npieces + 1,
               sizeof(Py_ssize_t)) < 0)
        return NULL;
      self->piece_end[self->npieces++] = self->nops;
      self->open_bytes = 0;
    }
    Py_ssize_t k = n - pos;
    if (k > self->piece_bytes - self->open_bytes) k = self->piece_bytes - self->open_bytes;
    if (grow((void**)&self->ops, &self->capops, self->nops + 1, sizeof(copy_op_t)) < 0)
      return NULL;
    self->ops[self->nops++] = (copy_op_t){dp + pos, sp + pos, k};
    self->piece_end[self->npieces - 1] = self->nops;
    self->open_bytes += k;
    pos += k;
  }
  self->nbytes += n;
  Py_RETURN_NONE;
}

static PyObject* copyplan_work(PyObject* op, PyObject* unused) {
  (void)unused;
  CopyPlanObject* self = (CopyPlanObject*)op;
  atomic_store_explicit(&self->started, 1, memory_order_relaxed);
  Py_ssize_t copied = 0, npieces = self->npieces;
  Py_BEGIN_ALLOW_THREADS
  for (;;) {
    Py_ssize_t i = atomic_fetch_add_explicit(&self->next, 1, memory_order_relaxed);
    if (i >= npieces) break;
    for (Py_ssize_t j = i ? self->piece_end[i - 1] : 0; j < self->piece_end[i]; j++)
      memcpy(self->ops[j].dst, self->ops[j].src, (size_t)self->ops[j].n);
    atomic_fetch_add_explicit(&self->done, 1, memory_order_release);
    copied++;
  }
  Py_END_ALLOW_THREADS
  return PyLong_FromSsize_t(copied);
}

static PyObject* copyplan_close(PyObject* op, PyObject* unused) {
  (void)unused;
  CopyPlanObject* self = (CopyPlanObject*)op;
  if (self->closed) Py_RETURN_NONE;
  atomic_store_explicit(&self->started, 1, memory_order_relaxed);
  Py_ssize_t handed = atomic_exchange_explicit(&self->next, TL_CP_CLOSED, memory_order_relaxed);
  if (handed > self->npieces) handed = self->npieces;
  Py_BEGIN_ALLOW_THREADS
  /* The pieces handed out are being copied by running work() calls: a memcpy of at most
   * piece_bytes each, so yield first, then sleep in short steps (a preempted helper). */
  for (int spin = 0; atomic_load_explicit(&self->done, memory_order_acquire) < handed; spin++) {
    if (spin < 64) {
      sched_yield();
    } else {
      struct timespec ts = {0, 50 * 1000};
      nanosleep(&ts, NULL);
    }
  }
  Py_END_ALLOW_THREADS
  self->closed = 1;
  release_all(self);
  Py_RETURN_NONE;
}

static PyObject* copyplan_get(PyObject* op, void* which) {
  CopyPlanObject* self = (CopyPlanObject*)op;
  switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromSsize_t(self->npieces);
    case 1: return PyLong_FromSsize_t(self->nbytes);
    case 2: {
      Py_ssize_t n = atomic_load_explicit(&self->next, memory_order_relaxed);
      return PyLong_FromSsize_t(n < self->npieces ? n : self->npieces);
    }
    default: return PyLong_FromSsize_t(atomic_load_explicit(&self->done, memory_order_acquire));
  }
}

static PyMethodDef copyplan_methods[] = {
    {"add", copyplan_add, METH_VARARGS,
     "add(dst, dst_offset, src, src_offset, n): plans copying n bytes (the owner, before any "
     "work()); dst must be a writable buffer. Takes the buffers until close()."},
    {"work", copyplan_work, METH_NOARGS,
     "Copies pieces nobody has taken until none is left (any thread, detached from the "
     "interpreter); returns how many this call copied."},
    {"close", copyplan_close, METH_NOARGS,
     "Hands out no more pieces, waits for the ones being copied, releases the buffers (the "
     "owner). Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef copyplan_getset[] = {
    {"pieces", copyplan_get, NULL, "pieces planned", (void*)0},
    {"nbytes", copyplan_get, NULL, "bytes planned", (void*)1},
    {"claimed", copyplan_get, NULL, "pieces handed out to work() calls", (void*)2},
    {"done", copyplan_get, NULL, "pieces copied", (void*)3},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot copyplan_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)copyplan_new},
    {Py_tp_dealloc, (void*)(uintptr_t)copyplan_dealloc},
    {Py_tp_methods, copyplan_methods},
    {Py_tp_getset, copyplan_getset},
    {Py_tp_doc, "CopyPlan(piece_bytes): memory copies planned by one thread, cut into pieces of "
                "about piece_bytes, copied by any threads calling work(); see "
                "python/src/copyplan.c."},
    {0, NULL},
};

PyType_Spec tl_py_copyplan_spec = {
    .name = "threadloom._core.CopyPlan",
    .basicsize = sizeof(CopyPlanObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = copyplan_slots,
};
