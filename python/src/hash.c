/* python/src/hash.c: xxh3_64 checksums for the checkpoint writer, over libxxhash.
 *
 * _core.xxh3_64(buffer, seed=0) hashes any C-contiguous bytes-like object in one call;
 * _core.Hasher(seed=0) is the streaming form (update() any number of times, then digest()), so a
 * tensor streamed through staging buffers in chunks gets the same checksum as one call over all
 * of its bytes. Both detach from the interpreter while hashing, so I/O threads hash in parallel
 * with the training thread.
 *
 * Free-threading: a Hasher's XXH3 state is guarded by its own PyMutex, held across the detached
 * hash; two threads updating one Hasher therefore serialise (the result is then the hash of the
 * concatenation in whichever order they ran). The bytes being hashed are held by a buffer export
 * for the duration of the call; a concurrent writer to the same memory races with the hash, the
 * way it would with any reader. */
#include <xxhash.h>

#include "core.h"

/* Below this many bytes the hash takes less time than detaching and re-attaching. */
#define TL_HASH_DETACH_MIN (64 * 1024)

typedef struct {
  PyObject_HEAD
  PyMutex lock;          /* guards state */
  XXH3_state_t* state;   /* owned; XXH3_freeState in dealloc */
  unsigned long long seed; /* the seed given to the constructor (reset() goes back to it) */
} HasherObject;

static int parse_seed(PyObject* obj, unsigned long long* out) {
  if (!obj) {
    *out = 0;
    return 0;
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(obj);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
  *out = v;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// xxh3_64(buffer, seed=0)
// ---------------------------------------------------------------------------------------------

PyObject* tl_py_xxh3_64(PyObject* module, PyObject* args, PyObject* kwargs) {
  (void)module;
  static char* kwlist[] = {"data", "seed", NULL};
  Py_buffer view;
  PyObject* seed_obj = NULL;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|O:xxh3_64", kwlist, &view, &seed_obj))
    return NULL;
  unsigned long long seed;
  if (parse_seed(seed_obj, &seed) < 0) {
    PyBuffer_Release(&view);
    return NULL;
  }
  XXH64_hash_t h;
  if (view.len >= TL_HASH_DETACH_MIN) {
    Py_BEGIN_ALLOW_THREADS
    h = XXH3_64bits_withSeed(view.buf, (size_t)view.len, seed);
    Py_END_ALLOW_THREADS
  } else {
    h = XXH3_64bits_withSeed(view.buf, (size_t)view.len, seed);
  }
  PyBuffer_Release(&view);
  return PyLong_FromUnsignedLongLong(h);
}

// ---------------------------------------------------------------------------------------------
// Hasher
// ---------------------------------------------------------------------------------------------

static PyObject* hasher_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"seed", NULL};
  PyObject* seed_obj = NULL;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:Hasher", kwlist, &seed_obj)) return NULL;
  unsigned long long seed;
  if (parse_seed(seed_obj, &seed) < 0) return NULL;
  HasherObject* self = (HasherObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->seed = seed;
  self->state = XXH3_createState();
  if (!self->state || XXH3_64bits_reset_withSeed(self->state, seed) != XXH_OK) {
    Py_DECREF(self);
    return PyErr_NoMemory();
  }
  return (PyObject*)self;
}

static void hasher_dealloc(PyObject* op) {
  HasherObject* self = (HasherObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  if (self->state) XXH3_freeState(self->state);
  tp->tp_free(op);
  Py_DECREF(tp); /* heap type: each instance holds a reference to its type */
}

static PyObject* hasher_update(PyObject* op, PyObject* arg) {
  HasherObject* self = (HasherObject*)op;
  Py_buffer view;
  if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
  XXH_errorcode rc;
  PyMutex_Lock(&self->lock);
  if (view.len >= TL_HASH_DETACH_MIN) {
    Py_BEGIN_ALLOW_THREADS
    rc = XXH3_64bits_update(self->state, view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
  } else {
    rc = XXH3_64bits_update(self->state, view.buf, (size_t)view.len);
  }
  PyMutex_Unlock(&self->lock);
  PyBuffer_Release(&view);
  if (rc != XXH_OK) return PyErr_Format(PyExc_SystemError, "XXH3_64bits_update failed");
  Py_RETURN_NONE;
}

static PyObject* hasher_digest(PyObject* op, PyObject* unused) {
  (void)unused;
  HasherObject* self = (HasherObject*)op;
  PyMutex_Lock(&self->lock);
  XXH64_hash_t h = XXH3_64bits_digest(self->state);
  PyMutex_Unlock(&self->lock);
  return PyLong_FromUnsignedLongLong(h);
}

static PyObject* hasher_hexdigest(PyObject* op, PyObject* unused) {
  (void)unused;
  HasherObject* self = (HasherObject*)op;
  PyMutex_Lock(&self->lock);
  XXH64_hash_t h = XXH3_64bits_digest(self->state);
  PyMutex_Unlock(&self->lock);
  char text[17];
  snprintf(text, sizeof text, "%016llx", (unsigned long long)h);
  return PyUnicode_FromString(text);
}

static PyObject* hasher_reset(PyObject* op, PyObject* unused) {
  (void)unused;
  HasherObject* self = (HasherObject*)op;
  PyMutex_Lock(&self->lock);
  XXH_errorcode rc = XXH3_64bits_reset_withSeed(self->state, self->seed);
  PyMutex_Unlock(&self->lock);
  if (rc != XXH_OK) return PyErr_Format(PyExc_SystemError, "XXH3_64bits_reset failed");
  Py_RETURN_NONE;
}

static PyMethodDef hasher_methods[] = {
    {"update", hasher_update, METH_O,
     "update(data): adds the bytes of a C-contiguous bytes-like object."},
    {"digest", hasher_digest, METH_NOARGS,
     "The xxh3_64 of everything added so far, as an int (the Hasher stays usable)."},
    {"hexdigest", hasher_hexdigest, METH_NOARGS, "digest() as 16 lowercase hex digits."},
    {"reset", hasher_reset, METH_NOARGS, "Forgets everything added; back to the seed."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot hasher_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)hasher_new},
    {Py_tp_dealloc, (void*)(uintptr_t)hasher_dealloc},
    {Py_tp_methods, hasher_methods},
    {Py_tp_doc, "Hasher(seed=0): streaming xxh3_64 (libxxhash). update() detaches from the "
                "interpreter for large inputs; one Hasher may be shared, updates serialise."},
    {0, NULL},
};

PyType_Spec tl_py_hasher_spec = {
    .name = "threadloom._core.Hasher",
    .basicsize = sizeof(HasherObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = hasher_slots,
};
