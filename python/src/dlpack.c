/* python/src/dlpack.c: DLPack for host memory (kDLCPU), both directions.
 *
 * Export (used by Buffer.__dlpack__ in arena.c): tl_py_dlpack_export_bytes wraps a block as a
 * 1-D uint8 tensor in a managed tensor that holds a strong reference to its owner. The capsule
 * ("dltensor" or "dltensor_versioned") calls the managed tensor's deleter from its destructor
 * only while it still carries that name, i.e. when no consumer took it; a consumer renames it
 * "used_*" and calls the deleter itself, from any thread, with or without a Python thread
 * state: the deleter attaches one (PyGILState_Ensure) to drop the reference.
 *
 * Import: from_dlpack(obj) asks obj for a capsule (max_version=(1, 0), falling back to the
 * unversioned call for older producers) or takes a capsule as is, checks the tensor (kDLCPU,
 * a dtype the struct module knows, lanes 1, compact row-major), and only then renames the
 * capsule "used_*" and moves the managed tensor into a DLPackTensor, whose dealloc calls the
 * deleter. The result is a memoryview over that object: its buffer has the tensor's format,
 * shape and strides, and is read-only when the producer set DLPACK_FLAG_BITMASK_READ_ONLY. A
 * tensor that fails a check is not consumed (its capsule still frees it).
 *
 * CUDA tensors (for NcclComm, nccl.c): tl_py_dlpack_cuda_device checks __dlpack_device__
 * without exporting anything, tl_py_dlpack_cuda_borrow asks for a capsule with the consumer's
 * stream (so the producer orders its pending work before ours) and keeps it, unconsumed, for the
 * length of one NCCL call. */
#include "core.h"
#include "dlpack.h"

// ---------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------

typedef struct {
  union {
    DLManagedTensorVersioned v;
    DLManagedTensor u;
  } m;
  int versioned;
  int64_t shape[1];
  int64_t strides[1];
  PyObject* owner;               /* strong */
  void (*done)(PyObject* owner); /* called (attached) before the reference is dropped */
} export_ctx;

static void export_release(export_ctx* ctx) {
  if (!Py_IsInitialized()) return; /* at exit: leak rather than touch a dead interpreter */
  PyGILState_STATE g = PyGILState_Ensure();
  if (ctx->done) ctx->done(ctx->owner);
  Py_DECREF(ctx->owner);
  PyGILState_Release(g);
  PyMem_RawFree(ctx);
}

static void export_deleter_versioned(DLManagedTensorVersioned* self) {
  export_release((export_ctx*)self->manager_ctx);
}

static void export_deleter_unversioned(DLManagedTensor* self) {
  export_release((export_ctx*)self->manager_ctx);
}

/* The capsule's destructor: frees the tensor only if no consumer renamed the capsule. */
static void export_capsule_destructor(PyObject* capsule) {
  PyObject* exc = PyErr_GetRaisedException(); /* keep a pending error; GetPointer may set one */
  if (PyCapsule_IsValid(capsule, DLPACK_VERSIONED_CAPSULE_NAME)) {
    DLManagedTensorVersioned* m = PyCapsule_GetPointer(capsule, DLPACK_VERSIONED_CAPSULE_NAME);
    if (m && m->deleter) m->deleter(m);
  } else if (PyCapsule_IsValid(capsule, DLPACK_CAPSULE_NAME)) {
    DLManagedTensor* m = PyCapsule_GetPointer(capsule, DLPACK_CAPSULE_NAME);
    if (m && m->deleter) m->deleter(m);
  }
  PyErr_SetRaisedException(exc);
}

PyObject* tl_py_dlpack_export_bytes(PyObject* owner, void* data, Py_ssize_t nbytes, int versioned,
                                    int readonly, void (*done)(PyObject* owner)) {
  return tl_py_dlpack_export_on(owner, data, nbytes, versioned, readonly, done, kDLCPU, 0,
                                kDLUInt, 8);
}

PyObject* tl_py_dlpack_export_on(PyObject* owner, void* data, Py_ssize_t nbytes, int versioned,
                                 int readonly, void (*done)(PyObject* owner), int device_type,
                                 int device_id, int dtype_code, int dtype_bits) {
  export_ctx* ctx = PyMem_RawCalloc(1, sizeof *ctx);
  if (!ctx) {
    if (done) done(owner);
    return PyErr_NoMemory();
  }
  ctx->versioned = versioned;
  ctx->shape[0] = nbytes / (dtype_bits / 8);
  ctx->strides[0] = 1;
  ctx->owner = Py_NewRef(owner);
  ctx->done = done;
  DLTensor t = {
      .data = data,
      .device = {.device_type = (DLDeviceType)device_type, .device_id = device_id},
      .ndim = 1,
      .dtype = {.code = (uint8_t)dtype_code, .bits = (uint8_t)dtype_bits, .lanes = 1},
      .shape = ctx->shape,
      .strides = ctx->strides,
      .byte_offset = 0,
  };
  void* managed;
  const char* name;
  if (versioned) {
    ctx->m.v.version.major = DLPACK_MAJOR_VERSION;
    ctx->m.v.version.minor = DLPACK_MINOR_VERSION;
    ctx->m.v.manager_ctx = ctx;
    ctx->m.v.deleter = export_deleter_versioned;
    ctx->m.v.flags = readonly ? DLPACK_FLAG_BITMASK_READ_ONLY : 0;
    ctx->m.v.dl_tensor = t;
    managed = &ctx->m.v;
    name = DLPACK_VERSIONED_CAPSULE_NAME;
  } else {
    ctx->m.u.manager_ctx = ctx;
    ctx->m.u.deleter = export_deleter_unversioned;
    ctx->m.u.dl_tensor = t;
    managed = &ctx->m.u;
    name = DLPACK_CAPSULE_NAME;
  }
  PyObject* capsule = PyCapsule_New(managed, name, export_capsule_destructor);
  if (!capsule) export_release(ctx);
  return capsule;
}

/* 1 if `o` is a 2-tuple of ints equal to (a, b), 0 if a 2-tuple of other ints, -1 (TypeError)
 * if not a 2-tuple of ints. Stores the values in *x, *y. */
static int int_pair(PyObject* o, const char* what, long* x, long* y) {
  if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 2) {
    PyErr_Format(PyExc_TypeError, "%s must be a tuple of two ints, not %R", what, o);
    return -1;
  }
  *x = PyLong_AsLong(PyTuple_GET_ITEM(o, 0));
  if (*x == -1 && PyErr_Occurred()) return -1;
  *y = PyLong_AsLong(PyTuple_GET_ITEM(o, 1));
  if (*y == -1 && PyErr_Occurred()) return -1;
  return 0;
}

int tl_py_dlpack_check_args(PyObject* stream, PyObject* max_version, PyObject* dl_device,
                            PyObject* copy, int* versioned) {
  if (stream && stream != Py_None) {
    PyErr_Format(PyExc_BufferError,
                 "stream must be None for a host (kDLCPU) Buffer: host memory has no stream to "
                 "synchronise with (got stream=%R)", stream);
    return -1;
  }
  if (dl_device && dl_device != Py_None) {
    long type, id;
    if (int_pair(dl_device, "dl_device", &type, &id) < 0) return -1;
    if (type != kDLCPU || id != 0) {
      PyErr_Format(PyExc_BufferError,
                   "a Buffer is host memory and is exported on (kDLCPU=1, 0) only, not on "
                   "dl_device=(%ld, %ld)", type, id);
      return -1;
    }
  }
  if (copy && copy != Py_None) {
    int c = PyObject_IsTrue(copy);
    if (c < 0) return -1;
    if (c) {
      PyErr_SetString(PyExc_BufferError,
                      "copy=True: a Buffer is exported in place and threadloom makes no copies; "
                      "pass copy=None or False, or copy the imported array yourself");
      return -1;
    }
  }
  *versioned = 0;
  if (max_version && max_version != Py_None) {
    long major, minor;
    if (int_pair(max_version, "max_version", &major, &minor) < 0) return -1;
    *versioned = major >= DLPACK_MAJOR_VERSION;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Import: DLPackTensor, the owner of a consumed managed tensor
// ---------------------------------------------------------------------------------------------

#define TL_DLPACK_MAX_NDIM 64

typedef struct {
  PyObject_HEAD
  void* managed;       /* DLManagedTensorVersioned* or DLManagedTensor*; deleter called once */
  int versioned;
  void* data;          /* data + byte_offset */
  int ndim;
  int readonly;
  Py_ssize_t itemsize;
  Py_ssize_t nbytes;
  const char* format;  /* static */
  Py_ssize_t shape[TL_DLPACK_MAX_NDIM];
  Py_ssize_t strides[TL_DLPACK_MAX_NDIM]; /* bytes, compact row-major */
} TensorObject;

static int tensor_getbuffer(PyObject* op, Py_buffer* view, int flags) {
  TensorObject* self = (TensorObject*)op;
  if ((flags & PyBUF_WRITABLE) && self->readonly) {
    PyErr_SetString(PyExc_BufferError, "this DLPack tensor is read-only (its producer set "
                                       "DLPACK_FLAG_BITMASK_READ_ONLY)");
    return -1;
  }
  if ((flags & PyBUF_F_CONTIGUOUS) == PyBUF_F_CONTIGUOUS) {
    int big = 0; /* row-major is also column-major when at most one dimension exceeds 1 */
    for (int i = 0; i < self->ndim; i++) big += self->shape[i] > 1;
    if (big > 1) {
      PyErr_SetString(PyExc_BufferError, "this DLPack tensor is row-major (C-contiguous), not "
                                         "Fortran-contiguous");
      return -1;
    }
  }
  view->buf = self->data;
  view->obj = Py_NewRef(op);
  view->len = self->nbytes;
  view->itemsize = self->itemsize;
  view->readonly = self->readonly;
  view->ndim = self->ndim;
  view->format = (flags & PyBUF_FORMAT) ? (char*)self->format : NULL;
  view->shape = (flags & PyBUF_ND) == PyBUF_ND ? self->shape : NULL;
  view->strides = (flags & PyBUF_STRIDES) == PyBUF_STRIDES ? self->strides : NULL;
  view->suboffsets = NULL;
  view->internal = NULL;
  if (!view->shape) view->ndim = 1; /* PyBUF_SIMPLE: a flat run of bytes */
  return 0;
}

static void tensor_dealloc(PyObject* op) {
  TensorObject* self = (TensorObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  void* m = self->managed;
  self->managed = NULL;
  if (m) {
    if (self->versioned) {
      DLManagedTensorVersioned* v = m;
      if (v->deleter) v->deleter(v);
    } else {
      DLManagedTensor* u = m;
      if (u->deleter) u->deleter(u);
    }
  }
  tp->tp_free(op);
  Py_DECREF(tp);
}

static PyObject* tensor_get_ptr(PyObject* op, void* closure) {
  (void)closure;
  return PyLong_FromVoidPtr(((TensorObject*)op)->data);
}

static PyGetSetDef tensor_getset[] = {
    {"ptr", tensor_get_ptr, NULL, "address of the first element", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot tensor_slots[] = {
    {Py_tp_doc, (void*)"A consumed host DLPack tensor (buffer protocol); its producer's deleter "
                       "runs when this object goes away. from_dlpack() returns a memoryview of "
                       "one."},
    {Py_tp_dealloc, (void*)(uintptr_t)tensor_dealloc},
    {Py_tp_getset, tensor_getset},
    {Py_bf_getbuffer, (void*)(uintptr_t)tensor_getbuffer},
    {0, NULL},
};

PyType_Spec tl_py_dlpack_tensor_spec = {
    .name = "threadloom._core.DLPackTensor",
    .basicsize = sizeof(TensorObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = tensor_slots,
};

// ---------------------------------------------------------------------------------------------
// Import: from_dlpack
// ---------------------------------------------------------------------------------------------

static int raise_device(PyObject* module, long type, long id) {
  char detail[300];
  snprintf(detail, sizeof detail, "DLPack tensor on device (%ld, %ld): from_dlpack makes host "
           "memoryviews and takes host (kDLCPU=1) tensors only; pass CUDA tensors to NcclComm's "
           "collectives, or copy the tensor to the host first (x.cpu())", type, id);
  tl_py_raise(get_state(module), TL_EINVAL, detail);
  return -1;
}

/* The struct-module format of a DLPack dtype, or NULL + BufferError. */
static const char* dtype_format(DLDataType dt) {
  if (dt.lanes != 1) {
    PyErr_Format(PyExc_BufferError, "DLPack dtype with %u lanes: only scalar (lanes=1) dtypes "
                 "are supported", (unsigned)dt.lanes);
    return NULL;
  }
  switch (dt.code) {
    case kDLInt:
      switch (dt.bits) {
        case 8: return "b";
        case 16: return "h";
        case 32: return "i";
        case 64: return "q";
      }
      break;
    case kDLUInt:
      switch (dt.bits) {
        case 8: return "B";
        case 16: return "H";
        case 32: return "I";
        case 64: return "Q";
      }
      break;
    case kDLFloat:
      switch (dt.bits) {
        case 16: return "e";
        case 32: return "f";
        case 64: return "d";
      }
      break;
    case kDLBool:
      if (dt.bits == 8) return "?";
      break;
  }
  static const char* const names[] = {"int", "uint", "float", "opaque handle", "bfloat",
                                      "complex", "bool"};
  const char* name = dt.code < sizeof names / sizeof names[0] ? names[dt.code] : "unknown";
  PyErr_Format(PyExc_BufferError,
               "DLPack dtype %s%u (code %u) has no buffer-protocol format: supported are "
               "int8/16/32/64, uint8/16/32/64, float16/32/64 and bool",
               name, (unsigned)dt.bits, (unsigned)dt.code);
  return NULL;
}

int tl_py_format_dtype(const char* fmt, int* code, int* bits) {
  static const struct {
    char f;
    unsigned char code, bits;
  } table[] = {{'b', kDLInt, 8},   {'h', kDLInt, 16},   {'i', kDLInt, 32},   {'q', kDLInt, 64},
               {'B', kDLUInt, 8},  {'H', kDLUInt, 16},  {'I', kDLUInt, 32},  {'Q', kDLUInt, 64},
               {'e', kDLFloat, 16}, {'f', kDLFloat, 32}, {'d', kDLFloat, 64}, {'?', kDLBool, 8}};
  if (fmt && fmt[0] && !fmt[1])
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
      if (table[i].f == fmt[0]) {
        *code = table[i].code;
        *bits = table[i].bits;
        return 0;
      }
  PyErr_Format(PyExc_ValueError, "format '%s' is not an element type DLPack can carry: use "
               "one of b h i q (int8..64), B H I Q (uint8..64), e f d (float16/32/64) or ?",
               fmt ? fmt : "");
  return -1;
}

/* BufferError unless `t` is compact row-major: each stride (in elements) is the product of the
 * later extents; a dimension of extent 1 may carry any stride. */
static int check_compact(const DLTensor* t, const char* who) {
  if (!t->strides) return 0;
  int64_t expect = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] != 1 && t->strides[i] != expect) {
      PyErr_Format(PyExc_BufferError,
                   "DLPack tensor is not compact row-major: dimension %d has stride %lld "
                   "elements where %lld is needed (%s takes C-contiguous tensors only; make it "
                   "contiguous first, e.g. .contiguous() or numpy.ascontiguousarray)",
                   i, (long long)t->strides[i], (long long)expect, who);
      return -1;
    }
    expect *= t->shape[i];
  }
  return 0;
}

/* Checks `t` and fills the buffer description of `out`; BufferError (or InvalidArgumentError
 * for a device tensor) and -1 if threadloom cannot expose it. Touches nothing of the capsule. */
static int describe(PyObject* module, const DLTensor* t, TensorObject* out) {
  if (t->device.device_type != kDLCPU)
    return raise_device(module, (long)t->device.device_type, (long)t->device.device_id);
  const char* fmt = dtype_format(t->dtype);
  if (!fmt) return -1;
  if (t->ndim < 0 || t->ndim > TL_DLPACK_MAX_NDIM) {
    PyErr_Format(PyExc_BufferError, "DLPack tensor with ndim=%d: 0 to %d dimensions are "
                 "supported", (int)t->ndim, TL_DLPACK_MAX_NDIM);
    return -1;
  }
  if (t->ndim > 0 && !t->shape) {
    PyErr_SetString(PyExc_BufferError, "DLPack tensor has ndim > 0 but no shape");
    return -1;
  }
  Py_ssize_t itemsize = t->dtype.bits / 8, n = 1;
  int empty = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0) {
      PyErr_Format(PyExc_BufferError, "DLPack tensor has a negative extent %lld in dimension %d",
                   (long long)t->shape[i], i);
      return -1;
    }
    if (t->shape[i] == 0) empty = 1;
  }
  for (int i = 0; i < t->ndim && !empty; i++) {
    if (t->shape[i] > PY_SSIZE_T_MAX / itemsize / n) {
      PyErr_SetString(PyExc_BufferError, "DLPack tensor is larger than the address space");
      return -1;
    }
    n *= (Py_ssize_t)t->shape[i];
  }
  if (empty) n = 0;
  if (!empty && check_compact(t, "from_dlpack") < 0) return -1;
  out->data = (char*)t->data + t->byte_offset;
  out->ndim = t->ndim;
  out->itemsize = itemsize;
  out->nbytes = n * itemsize;
  out->format = fmt;
  Py_ssize_t stride = itemsize;
  for (int i = t->ndim - 1; i >= 0; i--) {
    out->shape[i] = (Py_ssize_t)t->shape[i];
    out->strides[i] = stride;
    stride *= t->shape[i] ? (Py_ssize_t)t->shape[i] : 1;
  }
  return 0;
}

/* Calls obj.__dlpack__(stream=stream, max_version=(1, 0)) (stream left out when NULL), and
 * without max_version for producers that predate the keyword (they raise TypeError). Returns
 * the capsule (checked to be one) or NULL with the exception set. */
PyObject* tl_py_dlpack_call(PyObject* obj, PyObject* stream) {
  PyObject* meth = PyObject_GetAttrString(obj, "__dlpack__");
  if (!meth) return NULL;
  PyObject* args = PyTuple_New(0);
  PyObject* kwargs = Py_BuildValue("{s:(ii)}", "max_version", DLPACK_MAJOR_VERSION,
                                   DLPACK_MINOR_VERSION);
  if (kwargs && stream && PyDict_SetItemString(kwargs, "stream", stream) < 0) Py_CLEAR(kwargs);
  PyObject* cap = (args && kwargs) ? PyObject_Call(meth, args, kwargs) : NULL;
  if (!cap && args && kwargs && PyErr_ExceptionMatches(PyExc_TypeError)) {
    PyErr_Clear();
    Py_CLEAR(kwargs);
    kwargs = stream ? Py_BuildValue("{s:O}", "stream", stream) : NULL;
    if (!stream || kwargs) cap = PyObject_Call(meth, args, kwargs);
  }
  Py_XDECREF(kwargs);
  Py_XDECREF(args);
  Py_DECREF(meth);
  if (cap && !PyCapsule_CheckExact(cap)) {
    PyErr_Format(PyExc_TypeError, "__dlpack__() returned %T, not a PyCapsule", cap);
    Py_CLEAR(cap);
  }
  return cap;
}

/* Asks a host producer for a capsule. A device other than kDLCPU: InvalidArgumentError. */
static PyObject* ask_capsule(PyObject* module, PyObject* obj) {
  PyObject* dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
  if (!dev) return NULL;
  long type, id;
  int bad = int_pair(dev, "__dlpack_device__()", &type, &id);
  Py_DECREF(dev);
  if (bad < 0) return NULL;
  if (type != kDLCPU) {
    raise_device(module, type, id);
    return NULL;
  }
  return tl_py_dlpack_call(obj, NULL);
}

PyObject* tl_py_from_dlpack(PyObject* module, PyObject* obj) {
  core_state* st = get_state(module);
  PyObject* capsule;
  if (PyCapsule_CheckExact(obj)) {
    capsule = Py_NewRef(obj);
  } else {
    if (!PyObject_HasAttrStringWithError(obj, "__dlpack__")) {
      if (!PyErr_Occurred())
        PyErr_Format(PyExc_TypeError, "from_dlpack takes an object with __dlpack__ and "
                     "__dlpack_device__, or a DLPack capsule, not %T", obj);
      return NULL;
    }
    capsule = ask_capsule(module, obj);
    if (!capsule) return NULL;
  }
  TensorObject* t = PyObject_New(TensorObject, (PyTypeObject*)st->dlpack_tensor_type);
  if (!t) {
    Py_DECREF(capsule);
    return NULL;
  }
  t->managed = NULL;
  t->versioned = 0;
  /* Consuming must happen once even when threads race on one capsule: the critical section on
   * the capsule makes check-then-rename atomic. */
  int rc = 0;
  Py_BEGIN_CRITICAL_SECTION(capsule);
  if (PyCapsule_IsValid(capsule, DLPACK_VERSIONED_CAPSULE_NAME)) {
    DLManagedTensorVersioned* m = PyCapsule_GetPointer(capsule, DLPACK_VERSIONED_CAPSULE_NAME);
    if (!m) rc = -1;
    else if (m->version.major != DLPACK_MAJOR_VERSION) {
      PyErr_Format(PyExc_BufferError, "DLPack tensor of ABI version %u.%u: threadloom reads "
                   "major version %d", m->version.major, m->version.minor, DLPACK_MAJOR_VERSION);
      rc = -1;
    } else if (describe(module, &m->dl_tensor, t) < 0) {
      rc = -1;
    } else if (PyCapsule_SetName(capsule, DLPACK_VERSIONED_CAPSULE_USED_NAME) < 0) {
      rc = -1;
    } else {
      t->managed = m;
      t->versioned = 1;
      t->readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    }
  } else if (PyCapsule_IsValid(capsule, DLPACK_CAPSULE_NAME)) {
    DLManagedTensor* m = PyCapsule_GetPointer(capsule, DLPACK_CAPSULE_NAME);
    if (!m) rc = -1;
    else if (describe(module, &m->dl_tensor, t) < 0) rc = -1;
    else if (PyCapsule_SetName(capsule, DLPACK_CAPSULE_USED_NAME) < 0) rc = -1;
    else {
      t->managed = m;
      t->versioned = 0;
      t->readonly = 0;
    }
  } else {
    const char* name = PyCapsule_GetName(capsule);
    if (!name && PyErr_Occurred()) PyErr_Clear();
    if (name && (strcmp(name, DLPACK_CAPSULE_USED_NAME) == 0 ||
                 strcmp(name, DLPACK_VERSIONED_CAPSULE_USED_NAME) == 0))
      PyErr_Format(PyExc_BufferError, "this DLPack capsule was already consumed (its name is "
                   "'%s'): a capsule can be imported once", name);
    else
      PyErr_Format(PyExc_TypeError, "not a DLPack capsule (name %s%s%s, expected 'dltensor' or "
                   "'dltensor_versioned')", name ? "'" : "", name ? name : "NULL",
                   name ? "'" : "");
    rc = -1;
  }
  Py_END_CRITICAL_SECTION();
  Py_DECREF(capsule);
  if (rc < 0) {
    Py_DECREF(t); /* managed is NULL: nothing consumed, the capsule still owns the tensor */
    return NULL;
  }
  PyObject* view = PyMemoryView_FromObject((PyObject*)t);
  Py_DECREF(t);
  return view;
}

// ---------------------------------------------------------------------------------------------
// CUDA tensors for NcclComm: borrowed for one call, never consumed
// ---------------------------------------------------------------------------------------------

static const char* device_name(long type) {
  switch (type) {
    case kDLCPU: return "kDLCPU, host memory";
    case kDLCUDA: return "kDLCUDA";
    case kDLCUDAHost: return "kDLCUDAHost, pinned host memory";
    case kDLCUDAManaged: return "kDLCUDAManaged";
    case kDLROCM: return "kDLROCM";
    default: return "not CUDA";
  }
}

int tl_py_dlpack_cuda_device(PyObject* module, PyObject* obj, const char* what, int device) {
  int has = PyObject_HasAttrStringWithError(obj, "__dlpack_device__");
  if (has < 0) return -1;
  if (!has) {
    PyErr_Format(PyExc_TypeError, "%s takes a CUDA tensor (an object with __dlpack__ and "
                 "__dlpack_device__: torch, cupy, JAX), not %T; host values (numbers, lists, "
                 "buffers) go through CpuComm", what, obj);
    return -1;
  }
  PyObject* dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
  if (!dev) return -1;
  long type, id;
  int bad = int_pair(dev, "__dlpack_device__()", &type, &id);
  Py_DECREF(dev);
  if (bad < 0) return -1;
  char detail[400];
  if (type != kDLCUDA) {
    snprintf(detail, sizeof detail, "%s: the tensor is on DLPack device (%ld: %s, %ld); NCCL "
             "reduces CUDA device memory: move it to cuda:%d first (x.to('cuda:%d')), or use "
             "CpuComm (spmd's CPU world) for host tensors and threadloom Buffers",
             what, type, device_name(type), id, device, device);
    tl_py_raise(get_state(module), TL_EINVAL, detail);
    return -1;
  }
  if (id != device) {
    snprintf(detail, sizeof detail, "%s: the tensor is on cuda:%ld but this communicator drives "
             "cuda:%d; move it there first", what, id, device);
    tl_py_raise(get_state(module), TL_EINVAL, detail);
    return -1;
  }
  return 0;
}

int tl_py_dlpack_cuda_borrow(PyObject* module, PyObject* obj, unsigned long long stream,
                             int device, const char* what, tl_py_cuda_tensor_t* out) {
  memset(out, 0, sizeof *out);
  /* DLPack's stream for CUDA: 1 is the legacy default stream (0 is disallowed as ambiguous). */
  PyObject* s = PyLong_FromUnsignedLongLong(stream ? stream : 1);
  if (!s) return -1;
  PyObject* capsule = tl_py_dlpack_call(obj, s);
  Py_DECREF(s);
  if (!capsule) return -1;
  const DLTensor* t = NULL;
  int readonly = 0;
  if (PyCapsule_IsValid(capsule, DLPACK_VERSIONED_CAPSULE_NAME)) {
    DLManagedTensorVersioned* m = PyCapsule_GetPointer(capsule, DLPACK_VERSIONED_CAPSULE_NAME);
    if (m && m->version.major != DLPACK_MAJOR_VERSION) {
      PyErr_Format(PyExc_BufferError, "%s: DLPack tensor of ABI version %u.%u: threadloom reads "
                   "major version %d", what, m->version.major, m->version.minor,
                   DLPACK_MAJOR_VERSION);
      m = NULL;
    }
    if (m) {
      t = &m->dl_tensor;
      readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    }
  } else if (PyCapsule_IsValid(capsule, DLPACK_CAPSULE_NAME)) {
    DLManagedTensor* m = PyCapsule_GetPointer(capsule, DLPACK_CAPSULE_NAME);
    if (m) t = &m->dl_tensor;
  } else {
    PyErr_Format(PyExc_TypeError, "%s: __dlpack__() returned a capsule that is not an unused "
                 "DLPack tensor", what);
  }
  if (!t) goto fail;
  if (t->device.device_type != kDLCUDA || t->device.device_id != device) {
    char detail[200];
    snprintf(detail, sizeof detail, "%s: __dlpack__ exported a tensor on (%d, %d), not on "
             "cuda:%d as __dlpack_device__ said", what, (int)t->device.device_type,
             (int)t->device.device_id, device);
    tl_py_raise(get_state(module), TL_EINVAL, detail);
    goto fail;
  }
  if (t->ndim < 0 || (t->ndim > 0 && !t->shape)) {
    PyErr_Format(PyExc_BufferError, "%s: DLPack tensor with ndim=%d and no shape", what,
                 (int)t->ndim);
    goto fail;
  }
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0 || (t->shape[i] > 0 && n > INT64_MAX / t->shape[i])) {
      PyErr_Format(PyExc_BufferError, "%s: DLPack tensor has a bad extent %lld in dimension %d",
                   what, (long long)t->shape[i], i);
      goto fail;
    }
    n *= t->shape[i];
  }
  if (n > 0 && check_compact(t, what) < 0) goto fail;
  out->capsule = capsule;
  out->data = (char*)t->data + t->byte_offset;
  out->dtype.code = t->dtype.code;
  out->dtype.bits = t->dtype.bits;
  out->dtype.lanes = t->dtype.lanes;
  out->count = n;
  out->readonly = readonly;
  return 0;
fail:
  Py_DECREF(capsule); /* unconsumed: its destructor frees the tensor */
  return -1;
}

void tl_py_dlpack_cuda_release(tl_py_cuda_tensor_t* t) {
  Py_CLEAR(t->capsule);
}
