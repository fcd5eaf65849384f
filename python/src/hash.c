/* python/src/hash.c: xxh3_64 checksums for the checkpoint writer, over libxxhash.
 *
 * _core.xxh3_64(buffer, seed=0) hashes any C-contiguous bytes-like object in one call;
 * _core.Hasher(seed=0) is the streaming form (update() any number of times, then digest()), so a
 * tensor streamed through staging buffers in chunks gets the same checksum as one call over all
 * of its bytes. Both detach from the interpreter while hashing, so I/O threads hash in parallel
 * with the training thread. Where the CPU has AVX2 both use XXH3 compiled for it (hash_avx2.c:
 * 26 vs 19 GB/s from DRAM, 50 vs 19 from cache on the 2-core VM, the writers' hash being most of
 * their CPU); the digests are libxxhash's, and xxh3_64(..., impl=) picks one for the tests.
 *
 * Free-threading: a Hasher's XXH3 state is guarded by its own PyMutex, held across the detached
 * hash; two threads updating one Hasher therefore serialise (the result is then the hash of the
 * concatenation in whichever order they ran). The bytes being hashed are held by a buffer export
 * for the duration of the call; a concurrent writer to the same memory races with the hash, the
 * way it would with any reader. */
#include <xxhash.h>

#include "core.h"
#ifdef TL_HAVE_XXH3_AVX2
#include "hash_avx2.h"
#endif

// ---------------------------------------------------------------------------------------------
// The two implementations: libxxhash, and XXH3 compiled for AVX2 where the CPU has it
// ---------------------------------------------------------------------------------------------

/* 1 when the AVX2 build may run here. __builtin_cpu_supports reads what libgcc's constructor
 * recorded at load time: no state of ours, any thread may ask. */
static int avx2_usable(void) {
#ifdef TL_HAVE_XXH3_AVX2
  return __builtin_cpu_supports("avx2");
#else
  return 0;
#endif
}

static XXH_errorcode xxh3_update(XXH3_state_t* state, const void* data, size_t len) {
#ifdef TL_HAVE_XXH3_AVX2
  if (avx2_usable()) return tl__xxh3_avx2_update(state, data, len) == 0 ? XXH_OK : XXH_ERROR;
#endif
  return XXH3_64bits_update(state, data, len);
}

/* impl: NULL (the fastest here), "libxxhash" or "avx2" (tests compare the two). Returns 0 with
 * *use_avx2 set, or -1 with ValueError. */
static int pick_impl(PyObject* impl, int* use_avx2) {
  *use_avx2 = avx2_usable();
  if (!impl || impl == Py_None) return 0;
  if (PyUnicode_Check(impl) && PyUnicode_CompareWithASCIIString(impl, "libxxhash") == 0) {
    *use_avx2 = 0;
    return 0;
  }
  if (PyUnicode_Check(impl) && PyUnicode_CompareWithASCIIString(impl, "avx2") == 0) {
    if (avx2_usable()) return 0;
    PyErr_SetString(PyExc_ValueError, "xxh3_64(impl='avx2'): this CPU or build has no AVX2 "
                    "XXH3; use impl=None (the fastest available)");
    return -1;
  }
  PyErr_Format(PyExc_ValueError, "xxh3_64: impl must be None, 'libxxhash' or 'avx2', not %R",
               impl);
  return -1;
}

static XXH64_hash_t xxh3_with(int use_avx2, const void* data, size_t len, XXH64_hash_t seed) {
#ifdef TL_HAVE_XXH3_AVX2
  if (use_avx2) return tl__xxh3_avx2(data, len, seed);
#else
  (void)use_avx2;
#endif
  return XXH3_64bits_withSeed(data, len, seed);
}

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
  static char* kwlist[] = {"data", "seed", "impl", NULL};
  Py_buffer view;
  PyObject* seed_obj = NULL;
  PyObject* impl = NULL;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|O$O:xxh3_64", kwlist, &view, &seed_obj,
                                   &impl))
    return NULL;
  unsigned long long seed;
  int use_avx2;
  if (parse_seed(seed_obj, &seed) < 0 || pick_impl(impl, &use_avx2) < 0) {
    PyBuffer_Release(&view);
    return NULL;
  }
  XXH64_hash_t h;
  if (view.len >= TL_HASH_DETACH_MIN) {
    Py_BEGIN_ALLOW_THREADS
    h = xxh3_with(use_avx2, view.buf, (size_t)view.len, seed);
    Py_END_ALLOW_THREADS
  } else {
    h = xxh3_with(use_avx2, view.buf, (size_t)view.len, seed);
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
    rc = xxh3_update(self->state, view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
  } else {
    rc = xxh3_update(self->state, view.buf, (size_t)view.len);
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
