/* python/src/_core.c: threadloom._core, the CPython extension over libthreadloom.
 *
 * Thin by design: each function calls one tl_* function and converts its result; failures
 * become threadloom.Error subclasses (one per TL_E* row of the error table) carrying the code,
 * its name, the per-thread detail and a sentence saying what to do.
 *
 * Free-threading: the module declares Py_mod_gil = Py_MOD_GIL_NOT_USED. It keeps no process
 * globals; its state (the exception classes) is per module object, written once in exec and
 * read-only afterwards, so no locking is needed. Calls that may block (loading the topology,
 * the first CUDA call, dlopen of NCCL) detach from the interpreter around the C call. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "threadloom/threadloom.h"

// ---------------------------------------------------------------------------------------------
// Module state and the exception classes
// ---------------------------------------------------------------------------------------------

/* The Python class name of each TL_E* code. A row added to TL_ERRNO_MAP without a name here
 * fails to compile. */
#define TL_PY_NAME_EINVAL "InvalidArgumentError"
#define TL_PY_NAME_ENOMEM "OutOfMemoryError"
#define TL_PY_NAME_EBUSY "BusyError"
#define TL_PY_NAME_ETIMEDOUT "TimedOutError"
#define TL_PY_NAME_ECANCELED "CanceledError"
#define TL_PY_NAME_ECLOSED "ClosedError"
#define TL_PY_NAME_ENOSYS "NotBuiltError"
#define TL_PY_NAME_ENODRIVER "NoDriverError"
#define TL_PY_NAME_ENODEV "NoDeviceError"
#define TL_PY_NAME_ECUDA "CudaError"
#define TL_PY_NAME_ENCCL "NcclError"
#define TL_PY_NAME_ETOPOLOGY "TopologyError"
#define TL_PY_NAME_ENOENT "NotFoundError"
#define TL_PY_NAME_EACCES "AccessDeniedError"
#define TL_PY_NAME_ENOSPC "NoSpaceError"
#define TL_PY_NAME_EROFS "ReadOnlyFilesystemError"
#define TL_PY_NAME_EIO "InputOutputError"
#define TL_PY_NAME_EPERM "NotPermittedError"
#define TL_PY_NAME_EAGAIN "TryAgainError"
#define TL_PY_NAME_ERANGE "OutOfRangeError"
#define TL_PY_NAME_ENOLIB "LibraryNotFoundError"
#define TL_PY_NAME_EUNKNOWN "UnknownError"

#define TL_NCODES (-TL_ERRNO_MAX)

typedef struct {
  PyObject* plan_type;           /* threadloom._core.Plan */
  PyObject* error;               /* threadloom.Error: the base of every class below */
  PyObject* by_code[TL_NCODES];  /* by_code[-code]: the class for that TL_E* code */
} core_state;

static inline core_state* get_state(PyObject* module) {
  return (core_state*)PyModule_GetState(module);
}

/* The builtin exception a class also derives from, so `except ValueError` still works. Returns
 * a borrowed reference to a static type, or NULL for none. */
static PyObject* builtin_base(int code) {
  switch (code) {
    case TL_EINVAL: return PyExc_ValueError;
    case TL_ENOMEM: return PyExc_MemoryError;
    case TL_ETIMEDOUT: return PyExc_TimeoutError;
    case TL_ENOSYS: return PyExc_NotImplementedError;
    case TL_ENOENT: return PyExc_FileNotFoundError;
    case TL_EACCES:
    case TL_EPERM: return PyExc_PermissionError;
    case TL_ENOSPC:
    case TL_EROFS:
    case TL_EIO: return PyExc_OSError;
    case TL_ERANGE: return PyExc_OverflowError;
    default: return NULL;
  }
}

/* Sets a Python exception for a failed tl_* call and returns NULL. `detail` is the copy of
 * tl_err_detail() taken right after the call, on the same thread. */
static PyObject* raise_tl(core_state* st, int err, const char* detail) {
  int idx = (err < 0 && err > TL_ERRNO_MAX) ? -err : -TL_EUNKNOWN;
  PyObject* type = st->by_code[idx];
  PyObject* msg;
  if (detail && detail[0])
    msg = PyUnicode_FromFormat("%s: %s (%s). What to do: %s.", tl_err_name(err), tl_strerror(err),
                               detail, tl_err_hint(err));
  else
    msg = PyUnicode_FromFormat("%s: %s. What to do: %s.", tl_err_name(err), tl_strerror(err),
                               tl_err_hint(err));
  if (!msg) return NULL;
  PyObject* exc = PyObject_CallOneArg(type, msg);
  Py_DECREF(msg);
  if (!exc) return NULL;
  PyObject* code = PyLong_FromLong(err);
  int bad = !code || PyObject_SetAttrString(exc, "code", code) < 0;
  Py_XDECREF(code);
  PyObject* s;
  if (!bad) {
    s = PyUnicode_FromString(tl_err_name(err));
    bad = !s || PyObject_SetAttrString(exc, "name", s) < 0;
    Py_XDECREF(s);
  }
  if (!bad) {
    s = PyUnicode_FromString(tl_err_hint(err));
    bad = !s || PyObject_SetAttrString(exc, "hint", s) < 0;
    Py_XDECREF(s);
  }
  if (!bad) {
    s = PyUnicode_FromString(detail ? detail : "");
    bad = !s || PyObject_SetAttrString(exc, "detail", s) < 0;
    Py_XDECREF(s);
  }
  if (!bad) PyErr_SetObject(type, exc);
  Py_DECREF(exc);
  return NULL;
}

/* Detail text is per thread and overwritten by the next call: copy it at once. */
#define TL_DETAIL_COPY(buf) char buf[512]; snprintf(buf, sizeof buf, "%s", tl_err_detail())

static PyObject* fail(PyObject* module, int err) {
  TL_DETAIL_COPY(detail);
  return raise_tl(get_state(module), err, detail);
}

// ---------------------------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------------------------

static PyObject* core_version(PyObject* module, PyObject* unused) {
  (void)module;
  (void)unused;
  return PyUnicode_FromString(tl_version_string());
}

static PyObject* core_hwloc_version(PyObject* module, PyObject* unused) {
  (void)module;
  (void)unused;
  unsigned v = tl_hwloc_version();
  return PyUnicode_FromFormat("%s (API %u.%u)", tl_hwloc_build_version(), v >> 16, (v >> 8) & 0xff);
}

static PyObject* core_mimalloc_version(PyObject* module, PyObject* unused) {
  (void)module;
  (void)unused;
  int v = tl_mimalloc_version();
  return PyUnicode_FromFormat("%d.%d.%d", v / 100, (v / 10) % 10, v % 10);
}

static PyObject* core_numa_available(PyObject* module, PyObject* unused) {
  (void)module;
  (void)unused;
  return PyBool_FromLong(tl_numa_available());
}

static PyObject* core_cuda_built(PyObject* module, PyObject* unused) {
  (void)module;
  (void)unused;
  return PyBool_FromLong(tl_cuda_built());
}

static PyObject* cuda_version_str(int v) {
  return PyUnicode_FromFormat("%d.%d", v / 1000, (v % 1000) / 10);
}

static PyObject* core_cuda_runtime_version(PyObject* module, PyObject* unused) {
  (void)unused;
  int v, err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_cuda_runtime_version(&v);
  Py_END_ALLOW_THREADS
  return err ? fail(module, err) : cuda_version_str(v);
}

static PyObject* core_cuda_driver_version(PyObject* module, PyObject* unused) {
  (void)unused;
  int v, err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_cuda_driver_version(&v);
  Py_END_ALLOW_THREADS
  return err ? fail(module, err) : cuda_version_str(v);
}

static PyObject* core_nccl_version(PyObject* module, PyObject* unused) {
  (void)unused;
  int v, err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_nccl_version(&v);
  Py_END_ALLOW_THREADS
  if (err) return fail(module, err);
  /* NCCL_VERSION_CODE: major*10000+minor*100+patch since 2.9, major*1000+minor*100+patch before */
  if (v >= 20900) return PyUnicode_FromFormat("%d.%d.%d", v / 10000, (v % 10000) / 100, v % 100);
  return PyUnicode_FromFormat("%d.%d.%d", v / 1000, (v % 1000) / 100, v % 100);
}

// ---------------------------------------------------------------------------------------------
// Devices and topology
// ---------------------------------------------------------------------------------------------

static PyObject* core_cuda_device_count(PyObject* module, PyObject* unused) {
  (void)unused;
  int n, err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_cuda_device_count(&n);
  Py_END_ALLOW_THREADS
  return err ? fail(module, err) : PyLong_FromLong(n);
}

static PyObject* core_cuda_device_info(PyObject* module, PyObject* arg) {
  long ldev = PyLong_AsLong(arg);
  if (ldev == -1 && PyErr_Occurred()) return NULL;
  int dev = ldev < -1 ? -1 : ldev > 1 << 20 ? 1 << 20 : (int)ldev; /* out of range: ENODEV */
  tl_gpu_info_t g;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_cuda_device_info(dev, &g);
  Py_END_ALLOW_THREADS
  if (err) return fail(module, err);
  return Py_BuildValue("{s:i,s:s,s:s,s:n,s:(ii),s:i}", "index", g.index, "name", g.name,
                       "pci_bus_id", g.pci_bus_id, "total_memory", (Py_ssize_t)g.total_mem,
                       "compute_capability", g.cc_major, g.cc_minor, "sm_count", g.sm_count);
}

static PyObject* topo_to_dict(tl_topo_t* t) {
  tl_topo_summary_t s;
  if (tl_topo_summary(t, &s) != 0) return PyErr_Format(PyExc_SystemError, "tl_topo_summary failed");
  PyObject* gpus = PyList_New(0);
  if (!gpus) return NULL;
  for (int i = 0; i < s.gpus; i++) {
    tl_topo_gpu_t g;
    if (tl_topo_gpu(t, i, &g) != 0) {
      Py_DECREF(gpus);
      return PyErr_Format(PyExc_SystemError, "tl_topo_gpu(%d) failed", i);
    }
    PyObject* d = Py_BuildValue("{s:i,s:i,s:s,s:s,s:i,s:i,s:s}", "index", g.index, "cuda_index",
                                g.cuda_index, "pci_bus_id", g.pci_bus_id, "name", g.name,
                                "numa_node", g.numa_node, "local_pus", g.local_pus,
                                "local_cpus", g.local_cpus);
    if (!d || PyList_Append(gpus, d) < 0) {
      Py_XDECREF(d);
      Py_DECREF(gpus);
      return NULL;
    }
    Py_DECREF(d);
  }
  PyObject* cores = PyList_New(0);
  if (!cores) {
    Py_DECREF(gpus);
    return NULL;
  }
  for (int i = 0; i < s.cores; i++) {
    tl_topo_core_t c;
    PyObject* d = NULL;
    if (tl_topo_core(t, i, &c) == 0)
      d = Py_BuildValue("{s:i,s:i,s:i,s:i,s:s}", "index", c.index, "numa_node", c.numa_node,
                        "package", c.package, "allowed_pus", c.allowed_pus, "pus", c.pus);
    else
      PyErr_Format(PyExc_SystemError, "tl_topo_core(%d) failed", i);
    if (!d || PyList_Append(cores, d) < 0) {
      Py_XDECREF(d);
      Py_DECREF(gpus);
      Py_DECREF(cores);
      return NULL;
    }
    Py_DECREF(d);
  }
  /* "N" steals the references to gpus and cores. */
  return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:O,s:N,s:N}", "packages", s.packages,
                       "numa_nodes", s.numa_nodes, "cores", s.cores, "pus", s.pus,
                       "allowed_cores", s.allowed_cores, "allowed_pus", s.allowed_pus,
                       "is_this_system", s.is_this_system ? Py_True : Py_False, "gpus", gpus,
                       "core_list", cores);
}

/* Loads a topology from this machine, an XML file or a synthetic description; on failure sets
 * the exception and returns NULL. The caller closes the result. */
static tl_topo_t* load_topology(PyObject* module, PyObject* xml, PyObject* synthetic) {
  if (xml != Py_None && synthetic != Py_None) {
    PyErr_SetString(PyExc_ValueError, "give xml or synthetic, not both");
    return NULL;
  }
  PyObject* path = NULL;
  const char* desc = NULL;
  if (xml != Py_None && !PyUnicode_FSConverter(xml, &path)) return NULL;
  if (synthetic != Py_None && !(desc = PyUnicode_AsUTF8(synthetic))) return NULL;
  tl_topo_t* t = NULL;
  int err;
  char detail[512] = "";
  const char* cpath = path ? PyBytes_AS_STRING(path) : NULL;
  Py_BEGIN_ALLOW_THREADS
  err = desc ? tl_topo_init_synthetic(&t, desc) : tl_topo_init(&t, cpath);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  Py_XDECREF(path);
  if (err) {
    raise_tl(get_state(module), err, detail);
    return NULL;
  }
  return t;
}

static PyObject* core_topology(PyObject* module, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"xml", "synthetic", NULL};
  PyObject* xml = Py_None;
  PyObject* synthetic = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:topology", kwlist, &xml, &synthetic))
    return NULL;
  tl_topo_t* t = load_topology(module, xml, synthetic);
  if (!t) return NULL;
  PyObject* d = topo_to_dict(t);
  tl_topo_close(t);
  return d;
}

// ---------------------------------------------------------------------------------------------
// Plan: a placement plan (immutable but for its claim counters, which are atomic in C)
// ---------------------------------------------------------------------------------------------

typedef struct {
  PyObject_HEAD
  tl_plan_t* plan; /* owned; never NULL after construction */
} PlanObject;

static int parse_role(PyObject* role, tl_role_t* out) {
  const char* name = PyUnicode_AsUTF8(role);
  if (!name) return -1;
  if (tl_role_parse(name, out) != 0) {
    PyErr_Format(PyExc_ValueError, "unknown role %R: use 'main', 'launch', 'loader' (or 'feeder') or 'io'", role);
    return -1;
  }
  return 0;
}

/* gpu=None means -1 (no GPU). */
static int parse_gpu(PyObject* gpu, int* out) {
  if (gpu == Py_None) {
    *out = -1;
    return 0;
  }
  long v = PyLong_AsLong(gpu);
  if (v == -1 && PyErr_Occurred()) return -1;
  if (v < 0 || v > 1 << 20) {
    PyErr_Format(PyExc_ValueError, "gpu must be None or a GPU index >= 0, not %ld", v);
    return -1;
  }
  *out = (int)v;
  return 0;
}

static PyObject* plan_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"xml", "synthetic", "gpus", "loaders_per_gpu", "io_threads",
                           "main_thread", "cpus", "gpu_bus_ids", NULL};
  PyObject *xml = Py_None, *synthetic = Py_None, *cpus = Py_None, *bus_ids = Py_None;
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOiiipOO:Plan", kwlist, &xml, &synthetic,
                                   &spec.gpus, &spec.loaders_per_gpu, &spec.io_threads,
                                   &spec.main_thread, &cpus, &bus_ids))
    return NULL;
  PyObject* module = PyType_GetModule(type);
  if (!module) return NULL;
  if (cpus != Py_None && !(spec.cpus = PyUnicode_AsUTF8(cpus))) return NULL;
  PyObject* ids = NULL;
  const char** cids = NULL;
  if (bus_ids != Py_None) {
    ids = PySequence_Tuple(bus_ids);
    if (!ids) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(ids);
    cids = PyMem_Calloc((size_t)(n ? n : 1), sizeof *cids);
    if (!cids) {
      Py_DECREF(ids);
      return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++)
      if (!(cids[i] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(ids, i)))) {
        PyMem_Free(cids);
        Py_DECREF(ids);
        return NULL;
      }
    spec.gpu_bus_ids = cids;
    spec.ngpu_bus_ids = (int)n;
  }
  PyObject* result = NULL;
  tl_topo_t* t = load_topology(module, xml, synthetic);
  if (t) {
    tl_plan_t* plan = NULL;
    int err;
    char detail[512] = "";
    Py_BEGIN_ALLOW_THREADS
    err = tl_plan_init(&plan, t, &spec);
    if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
    tl_topo_close(t);
    Py_END_ALLOW_THREADS
    if (err) {
      raise_tl(get_state(module), err, detail);
    } else {
      PlanObject* self = (PlanObject*)type->tp_alloc(type, 0);
      if (self) self->plan = plan;
      else tl_plan_close(plan);
      result = (PyObject*)self;
    }
  }
  PyMem_Free(cids);
  Py_XDECREF(ids);
  return result;
}

static void plan_dealloc(PyObject* op) {
  PlanObject* self = (PlanObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  tl_plan_close(self->plan);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static PyObject* slot_to_dict(const tl_plan_slot_t* s) {
  PyObject* gpu = s->gpu >= 0 ? PyLong_FromLong(s->gpu) : Py_NewRef(Py_None);
  if (!gpu) return NULL;
  return Py_BuildValue("{s:i,s:s,s:N,s:i,s:i,s:i,s:s,s:i,s:i,s:O,s:s}", "id", s->id, "role",
                       tl_role_name(s->role), "gpu", gpu, "rank", s->rank, "core", s->core,
                       "numa_node", s->numa_node, "cpus", s->cpus, "hot_on_core", s->hot_on_core,
                       "threads_on_core", s->threads_on_core, "local",
                       s->local ? Py_True : Py_False, "why", s->why);
}

static PyObject* plan_slots(PyObject* op, PyObject* unused) {
  (void)unused;
  PlanObject* self = (PlanObject*)op;
  int n = tl_plan_size(self->plan);
  PyObject* out = PyList_New(n);
  if (!out) return NULL;
  for (int i = 0; i < n; i++) {
    tl_plan_slot_t s;
    tl_plan_slot(self->plan, i, &s);
    PyObject* d = slot_to_dict(&s);
    if (!d) {
      Py_DECREF(out);
      return NULL;
    }
    PyList_SET_ITEM(out, i, d);
  }
  return out;
}

static PyObject* plan_fail(PyObject* op, int err) {
  PyObject* module = PyType_GetModule(Py_TYPE(op));
  return module ? fail(module, err) : NULL;
}

static PyObject* plan_find(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"role", "gpu", "rank", NULL};
  PyObject *role, *gpu = Py_None;
  int rank = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Oi:find", kwlist, &role, &gpu, &rank)) return NULL;
  tl_role_t r;
  int g, id;
  if (parse_role(role, &r) < 0 || parse_gpu(gpu, &g) < 0) return NULL;
  int err = tl_plan_find(((PlanObject*)op)->plan, r, g, rank, &id);
  return err ? plan_fail(op, err) : PyLong_FromLong(id);
}

static PyObject* plan_claim(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"role", "gpu", NULL};
  PyObject *role, *gpu = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:claim", kwlist, &role, &gpu)) return NULL;
  tl_role_t r;
  int g, id, wrapped;
  if (parse_role(role, &r) < 0 || parse_gpu(gpu, &g) < 0) return NULL;
  int err = tl_plan_claim(((PlanObject*)op)->plan, r, g, &id, &wrapped);
  return err ? plan_fail(op, err) : Py_BuildValue("(iO)", id, wrapped ? Py_True : Py_False);
}

static PyObject* plan_pin(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"slot", "tid", NULL};
  long id;
  int tid = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "l|i:pin", kwlist, &id, &tid)) return NULL;
  if (id < 0 || id > 1 << 24) id = -1;
  tl_pin_result_t r;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tid ? tl_pin_tid(((PlanObject*)op)->plan, (int)id, tid, &r)
            : tl_pin_self(((PlanObject*)op)->plan, (int)id, &r);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) {
    PyObject* module = PyType_GetModule(Py_TYPE(op));
    return module ? raise_tl(get_state(module), err, detail) : NULL;
  }
  PyObject* refused = r.refused[0] ? PyUnicode_FromString(r.refused) : Py_NewRef(Py_None);
  if (!refused) return NULL;
  return Py_BuildValue("{s:s,s:i,s:N}", "cpus", r.cpus, "numa_node", r.numa_node, "refused", refused);
}

static PyObject* plan_str(PyObject* op) {
  tl_plan_t* plan = ((PlanObject*)op)->plan;
  int need = tl_plan_format(plan, NULL, 0);
  if (need < 0) return plan_fail(op, need);
  char* buf = PyMem_Malloc((size_t)need + 1);
  if (!buf) return PyErr_NoMemory();
  tl_plan_format(plan, buf, (size_t)need + 1);
  PyObject* s = PyUnicode_FromStringAndSize(buf, need);
  PyMem_Free(buf);
  return s;
}

static Py_ssize_t plan_len(PyObject* op) { return tl_plan_size(((PlanObject*)op)->plan); }

static PyObject* plan_get_gpus(PyObject* op, void* closure) {
  (void)closure;
  return PyLong_FromLong(tl_plan_gpus(((PlanObject*)op)->plan));
}

static PyMethodDef plan_methods[] = {
    {"slots", plan_slots, METH_NOARGS,
     "slots() -> list of dicts: id, role, gpu, rank, core, numa_node, cpus, hot_on_core, "
     "threads_on_core, local, why."},
    {"find", (PyCFunction)(void (*)(void))plan_find, METH_VARARGS | METH_KEYWORDS,
     "find(role, gpu=None, rank=0) -> slot id."},
    {"claim", (PyCFunction)(void (*)(void))plan_claim, METH_VARARGS | METH_KEYWORDS,
     "claim(role, gpu=None) -> (slot id, wrapped): the next slot of that role and GPU, in turn; "
     "wrapped is True once every slot has been handed out (the caller then shares a core). "
     "Safe from any thread."},
    {"pin", (PyCFunction)(void (*)(void))plan_pin, METH_VARARGS | METH_KEYWORDS,
     "pin(slot, tid=0) -> dict(cpus, numa_node, refused): pins the calling thread (or the "
     "thread with kernel id tid: CPU affinity only) to the slot."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef plan_getset[] = {
    {"gpus", plan_get_gpus, NULL, "number of GPUs planned for", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot plan_type_slots[] = {
    {Py_tp_doc, (void*)"Plan(*, xml=None, synthetic=None, gpus=-1, loaders_per_gpu=-1, "
                       "io_threads=1, main_thread=True, cpus=None, gpu_bus_ids=None): which core "
                       "each thread runs on, and why. str(plan) explains it."},
    {Py_tp_new, (void*)(uintptr_t)plan_new},
    {Py_tp_dealloc, (void*)(uintptr_t)plan_dealloc},
    {Py_tp_str, (void*)(uintptr_t)plan_str},
    {Py_tp_methods, plan_methods},
    {Py_tp_getset, plan_getset},
    {Py_sq_length, (void*)(uintptr_t)plan_len},
    {Py_mp_length, (void*)(uintptr_t)plan_len},
    {0, NULL},
};

static PyType_Spec plan_type_spec = {
    .name = "threadloom._core.Plan",
    .basicsize = sizeof(PlanObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = plan_type_slots,
};

// ---------------------------------------------------------------------------------------------
// Affinity of the calling thread
// ---------------------------------------------------------------------------------------------

static PyObject* core_pin_current(PyObject* module, PyObject* unused) {
  (void)unused;
  char buf[1024];
  int err = tl_pin_current(buf, sizeof buf);
  return err ? fail(module, err) : PyUnicode_FromString(buf);
}

static PyObject* core_pin_set(PyObject* module, PyObject* args) {
  const char* cpus;
  int node = -1;
  if (!PyArg_ParseTuple(args, "s|i:pin_set", &cpus, &node)) return NULL;
  int err = tl_pin_set(cpus, node);
  if (err) return fail(module, err);
  Py_RETURN_NONE;
}

static PyObject* core_error_table(PyObject* module, PyObject* unused) {
  (void)unused;
  core_state* st = get_state(module);
  static const int codes[] = {
#define XX(name, value, msg, hint) TL_##name,
      TL_ERRNO_MAP(XX)
#undef XX
  };
  size_t n = sizeof codes / sizeof codes[0];
  PyObject* out = PyTuple_New((Py_ssize_t)n);
  if (!out) return NULL;
  for (size_t i = 0; i < n; i++) {
    int c = codes[i];
    PyObject* row = Py_BuildValue("(issO)", c, tl_err_name(c), tl_strerror(c), st->by_code[-c]);
    if (!row) {
      Py_DECREF(out);
      return NULL;
    }
    PyTuple_SET_ITEM(out, (Py_ssize_t)i, row);
  }
  return out;
}

static PyObject* core_raise_error(PyObject* module, PyObject* args) {
  int code;
  const char* detail = "";
  if (!PyArg_ParseTuple(args, "i|s:_raise_error", &code, &detail)) return NULL;
  return raise_tl(get_state(module), code, detail);
}

// ---------------------------------------------------------------------------------------------
// Module definition
// ---------------------------------------------------------------------------------------------

static PyMethodDef core_methods[] = {
    {"version", core_version, METH_NOARGS, "The version of the loaded libthreadloom."},
    {"hwloc_version", core_hwloc_version, METH_NOARGS, "hwloc's release built against and its loaded API version, '2.9.0 (API 2.8)'."},
    {"mimalloc_version", core_mimalloc_version, METH_NOARGS, "mimalloc's version, '2.0.9'."},
    {"numa_available", core_numa_available, METH_NOARGS, "True when the kernel supports NUMA."},
    {"cuda_built", core_cuda_built, METH_NOARGS, "True when built with the CUDA runtime."},
    {"cuda_runtime_version", core_cuda_runtime_version, METH_NOARGS,
     "The CUDA runtime's version, '13.0'. Raises NotBuiltError without CUDA."},
    {"cuda_driver_version", core_cuda_driver_version, METH_NOARGS,
     "The highest CUDA version the driver supports. Raises NoDriverError without a driver."},
    {"cuda_device_count", core_cuda_device_count, METH_NOARGS,
     "Number of visible GPUs. Raises NoDriverError or NoDeviceError saying why there are none."},
    {"cuda_device_info", core_cuda_device_info, METH_O,
     "cuda_device_info(index) -> dict of name, pci_bus_id, total_memory, compute_capability, "
     "sm_count."},
    {"nccl_version", core_nccl_version, METH_NOARGS,
     "NCCL's version, '2.28.3'. Raises LibraryNotFoundError when libnccl.so.2 is not loadable."},
    {"topology", (PyCFunction)(void (*)(void))core_topology, METH_VARARGS | METH_KEYWORDS,
     "topology(xml=None, synthetic=None) -> dict: packages, numa_nodes, cores, pus, "
     "allowed_cores, allowed_pus, is_this_system, gpus and core_list (lists of dicts). xml: an "
     "hwloc XML file instead of this machine; synthetic: an hwloc synthetic description."},
    {"pin_current", core_pin_current, METH_NOARGS,
     "The calling thread's CPU affinity as a list string, '0-3,8'."},
    {"pin_set", core_pin_set, METH_VARARGS,
     "pin_set(cpus, numa_node=-1): sets the calling thread's CPU affinity ('0-3,8') and its "
     "preferred memory node (-1: local allocation). Used to undo a pin."},
    {"error_table", core_error_table, METH_NOARGS,
     "The error table: tuple of (code, name, message, exception class)."},
    {"_raise_error", core_raise_error, METH_VARARGS,
     "_raise_error(code, detail='') raises the exception for a TL_E* code (for tests)."},
    {NULL, NULL, 0, NULL},
};

static int add_error_classes(PyObject* module, core_state* st) {
  st->error = PyErr_NewExceptionWithDoc(
      "threadloom.Error",
      "Base class of threadloom's errors. Attributes: code (the negative TL_E* value), name "
      "('TL_ENODRIVER'), hint (what to do) and detail (what failed, e.g. the CUDA error).",
      NULL, NULL);
  if (!st->error || PyModule_AddObjectRef(module, "Error", st->error) < 0) return -1;
  static const int codes[] = {
#define XX(name, value, msg, hint) TL_##name,
      TL_ERRNO_MAP(XX)
#undef XX
  };
  static const char* const names[] = {
#define XX(name, value, msg, hint) "threadloom." TL_PY_NAME_##name,
      TL_ERRNO_MAP(XX)
#undef XX
  };
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    PyObject* extra = builtin_base(codes[i]);
    PyObject* bases = extra ? PyTuple_Pack(2, st->error, extra) : PyTuple_Pack(1, st->error);
    if (!bases) return -1;
    char doc[512];
    snprintf(doc, sizeof doc, "%s: %s. What to do: %s.", tl_err_name(codes[i]),
             tl_strerror(codes[i]), tl_err_hint(codes[i]));
    PyObject* cls = PyErr_NewExceptionWithDoc(names[i], doc, bases, NULL);
    Py_DECREF(bases);
    if (!cls) return -1;
    st->by_code[-codes[i]] = cls; /* the state owns this reference */
    if (PyModule_AddObjectRef(module, names[i] + sizeof "threadloom." - 1, cls) < 0) return -1;
  }
  return 0;
}

static int core_exec(PyObject* module) {
  core_state* st = get_state(module);
  if (add_error_classes(module, st) < 0) return -1;
  st->plan_type = PyType_FromModuleAndSpec(module, &plan_type_spec, NULL);
  if (!st->plan_type || PyModule_AddObjectRef(module, "Plan", st->plan_type) < 0) return -1;
  if (PyModule_AddStringConstant(module, "__version__", tl_version_string()) < 0) return -1;
  return 0;
}

static int core_traverse(PyObject* module, visitproc visit, void* arg) {
  core_state* st = get_state(module);
  Py_VISIT(st->plan_type);
  Py_VISIT(st->error);
  for (int i = 0; i < TL_NCODES; i++) Py_VISIT(st->by_code[i]);
  return 0;
}

static int core_clear(PyObject* module) {
  core_state* st = get_state(module);
  Py_CLEAR(st->plan_type);
  Py_CLEAR(st->error);
  for (int i = 0; i < TL_NCODES; i++) Py_CLEAR(st->by_code[i]);
  return 0;
}

static void core_free(void* module) { core_clear((PyObject*)module); }

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, (void*)(uintptr_t)core_exec}, /* the slot table stores functions as void* */
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "threadloom._core",
    .m_doc = "threadloom's C runtime: topology, CUDA discovery, the error table.",
    .m_size = sizeof(core_state),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
