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
#include "core.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

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
#define TL_PY_NAME_EDEVLOST "DeviceLostError"


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

/* The class of a TL_E* code (borrowed); unknown codes get TL_EUNKNOWN's. */
static PyObject* class_of(core_state* st, int err) {
  return st->by_code[(err < 0 && err > TL_ERRNO_MAX) ? -err : -TL_EUNKNOWN];
}

/* Sets one str attribute; -1 on failure. */
static int set_str(PyObject* obj, const char* name, const char* value) {
  PyObject* s = PyUnicode_FromString(value);
  int rc = s ? PyObject_SetAttrString(obj, name, s) : -1;
  Py_XDECREF(s);
  return rc;
}

/* The one place a threadloom exception is made, for C and Python callers alike: an instance of
 * `cls` (NULL: the class of `err`) whose message is
 *   "<TL_ENAME>: <what> (<detail>). What to do: <hint>."
 * (without " (<detail>)" when detail is empty), `what` and `hint` defaulting to the error
 * table's text for `err`, with the attributes code, name, hint and detail. Returns a new
 * reference, or NULL with an exception set. */
static PyObject* tl_py_error_new(core_state* st, PyObject* cls, int err, const char* detail,
                                 const char* what, const char* hint) {
  if (!cls) cls = class_of(st, err);
  if (!what) what = tl_strerror(err);
  if (!hint) hint = tl_err_hint(err);
  if (!detail) detail = "";
  /* The detail quotes what failed (a path, a host list, a library's message), which need not be
   * valid UTF-8: undecodable bytes become \xNN escapes instead of a UnicodeDecodeError. */
  PyObject* det = PyUnicode_DecodeUTF8(detail, (Py_ssize_t)strlen(detail), "backslashreplace");
  if (!det) return NULL;
  PyObject* msg = PyUnicode_GET_LENGTH(det) > 0
      ? PyUnicode_FromFormat("%s: %s (%U). What to do: %s.", tl_err_name(err), what, det, hint)
      : PyUnicode_FromFormat("%s: %s. What to do: %s.", tl_err_name(err), what, hint);
  PyObject* exc = msg ? PyObject_CallOneArg(cls, msg) : NULL;
  Py_XDECREF(msg);
  if (!exc) {
    Py_DECREF(det);
    return NULL;
  }
  PyObject* code = PyLong_FromLong(err);
  int bad = !code || PyObject_SetAttrString(exc, "code", code) < 0;
  Py_XDECREF(code);
  if (!bad) bad = set_str(exc, "name", tl_err_name(err)) < 0 || set_str(exc, "hint", hint) < 0 ||
                  PyObject_SetAttrString(exc, "detail", det) < 0;
  Py_DECREF(det);
  if (bad) {
    Py_DECREF(exc);
    return NULL;
  }
  return exc;
}

PyObject* tl_py_raise(core_state* st, int err, const char* detail) {
  PyObject* exc = tl_py_error_new(st, NULL, err, detail, NULL, NULL);
  if (!exc) return NULL;
  PyErr_SetObject((PyObject*)Py_TYPE(exc), exc);
  Py_DECREF(exc);
  return NULL;
}

/* Detail text is per thread and overwritten by the next call: copy it at once. */
#define TL_DETAIL_COPY(buf) char buf[512]; snprintf(buf, sizeof buf, "%s", tl_err_detail())

PyObject* tl_py_fail(PyObject* module, int err) {
  TL_DETAIL_COPY(detail);
  return tl_py_raise(get_state(module), err, detail);
}

PyObject* tl_py_module_of(PyObject* self) {
  return PyType_GetModuleByDef(Py_TYPE(self), &tl_py_core_def);
}

PyObject* tl_py_fail_obj(PyObject* self, int err) {
  TL_DETAIL_COPY(detail); /* before anything else can overwrite it */
  PyObject* module = tl_py_module_of(self);
  return module ? tl_py_raise(get_state(module), err, detail) : NULL;
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

/* malloc_thresholds(mmap_threshold, trim_threshold): glibc's mallopt(M_MMAP_THRESHOLD) and
 * mallopt(M_TRIM_THRESHOLD), for threadloom.memory.tune_malloc (which decides whether to call
 * it). True when glibc took both; False on another C library. Setting either also stops glibc
 * adjusting them itself. */
static PyObject* core_malloc_thresholds(PyObject* module, PyObject* args) {
  (void)module;
  int mmap_threshold, trim_threshold;
  if (!PyArg_ParseTuple(args, "ii", &mmap_threshold, &trim_threshold)) return NULL;
#ifdef __GLIBC__
  int ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1;
  ok = ok && mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1;
  return PyBool_FromLong(ok);
#else
  (void)mmap_threshold;
  (void)trim_threshold;
  Py_RETURN_FALSE;
#endif
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
  return err ? tl_py_fail(module, err) : cuda_version_str(v);
}

static PyObject* core_cuda_driver_version(PyObject* module, PyObject* unused) {
  (void)unused;
  int v, err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_cuda_driver_version(&v);
  Py_END_ALLOW_THREADS
  return err ? tl_py_fail(module, err) : cuda_version_str(v);
}

static PyObject* core_nccl_version(PyObject* module, PyObject* unused) {
  (void)unused;
  int v, err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_nccl_version(&v);
  Py_END_ALLOW_THREADS
  if (err) return tl_py_fail(module, err);
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
  return err ? tl_py_fail(module, err) : PyLong_FromLong(n);
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
  if (err) return tl_py_fail(module, err);
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

tl_topo_t* tl_py_load_topology(PyObject* module, PyObject* xml, PyObject* synthetic) {
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
    tl_py_raise(get_state(module), err, detail);
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
  tl_topo_t* t = tl_py_load_topology(module, xml, synthetic);
  if (!t) return NULL;
  PyObject* d = topo_to_dict(t);
  tl_topo_close(t);
  return d;
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

static PyObject* core_make_error(PyObject* module, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"code", "detail", "what", "hint", "cls", NULL};
  int code;
  const char *detail = "", *what = NULL, *hint = NULL;
  PyObject* cls = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|s$zzO:make_error", kwlist, &code, &detail,
                                   &what, &hint, &cls))
    return NULL;
  core_state* st = get_state(module);
  if (cls == Py_None) {
    cls = NULL;
  } else if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject*)cls,
                                                     (PyTypeObject*)class_of(st, code))) {
    return PyErr_Format(PyExc_TypeError, "make_error: cls must be %s or a subclass of it, not %R",
                        ((PyTypeObject*)class_of(st, code))->tp_name, cls);
  }
  return tl_py_error_new(st, cls, code, detail, what, hint);
}

static PyObject* core_raise_error(PyObject* module, PyObject* args) {
  int code;
  const char* detail = "";
  if (!PyArg_ParseTuple(args, "i|s:_raise_error", &code, &detail)) return NULL;
  return tl_py_raise(get_state(module), code, detail);
}

static PyObject* core_errno_code(PyObject* module, PyObject* arg) {
  (void)module;
  long e = PyLong_AsLong(arg);
  if (e == -1 && PyErr_Occurred()) return NULL;
  return PyLong_FromLong(e < 0 || e > INT32_MAX ? TL_EIO : tl_translate_sys_error((int)e));
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
    {"malloc_thresholds", core_malloc_thresholds, METH_VARARGS,
     "malloc_thresholds(mmap, trim): glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; False when "
     "the C library is not glibc or refused."},
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
    {"nccl_unique_id", tl_py_nccl_unique_id, METH_NOARGS,
     "A new ncclUniqueId as 128 bytes (ncclGetUniqueId; no GPU needed). Raises "
     "LibraryNotFoundError when libnccl.so.2 is not loadable, NcclError when NCCL fails."},
    {"_nccl_comm_closed", tl_py_nccl_comm_closed, METH_VARARGS,
     "_nccl_comm_closed(nranks, rank, device, type=NcclComm): an NcclComm (or an instance of "
     "its subclass `type`) that is already closed, so tests can reach the collectives' argument "
     "checks without a GPU."},
    {"topology", (PyCFunction)(void (*)(void))core_topology, METH_VARARGS | METH_KEYWORDS,
     "topology(xml=None, synthetic=None) -> dict: packages, numa_nodes, cores, pus, "
     "allowed_cores, allowed_pus, is_this_system, gpus and core_list (lists of dicts). xml: an "
     "hwloc XML file instead of this machine; synthetic: an hwloc synthetic description."},
    {"pin_current", tl_py_pin_current, METH_NOARGS,
     "The calling thread's CPU affinity as a list string, '0-3,8'."},
    {"pin_set", tl_py_pin_set, METH_VARARGS,
     "pin_set(cpus, numa_node=-1): sets the calling thread's CPU affinity ('0-3,8') and its "
     "preferred memory node (-1: local allocation). Used to undo a pin."},
    {"xxh3_64", (PyCFunction)(void (*)(void))tl_py_xxh3_64, METH_VARARGS | METH_KEYWORDS,
     "xxh3_64(data, seed=0, *, impl=None) -> int: the XXH3 64-bit hash of a C-contiguous "
     "bytes-like object; detaches from the interpreter while hashing large inputs. impl: None "
     "(XXH3 compiled for AVX2 where the CPU has it, else libxxhash), 'libxxhash' or 'avx2': "
     "the digests are the same."},
    {"from_dlpack", tl_py_from_dlpack, METH_O,
     "from_dlpack(obj) -> memoryview: imports a host (kDLCPU) DLPack tensor without a copy, from "
     "an object with __dlpack__/__dlpack_device__ or from a DLPack capsule, which is consumed "
     "(renamed 'used_*'); the producer's deleter runs when the memoryview (and every view of it) "
     "is gone. Format, shape and strides follow the tensor's dtype (int/uint 8-64, float16/32/64, "
     "bool); compact row-major tensors only (BufferError otherwise). Device tensors raise "
     "NotBuiltError (device DLPack is the cudactx part)."},
    {"hostlist_expand", tl_py_hostlist_expand, METH_O,
     "hostlist_expand(list) -> list of host names, as `scontrol show hostnames` prints them "
     "('linux[1-2],gpu-[01-02]' -> ['linux1', 'linux2', 'gpu-01', 'gpu-02']). Raises "
     "InvalidArgumentError naming the position of a malformed part, OutOfRangeError over 1<<20 "
     "names."},
    {"signal_ignore", tl_py_signal_ignore, METH_O,
     "signal_ignore(signum): sets the signal's disposition to SIG_IGN with sigaction(), from any "
     "thread (signal.signal() works on the main thread only; signal.getsignal() does not see "
     "the change). InvalidArgumentError for SIGKILL, SIGSTOP or a number out of range."},
    {"preempt_notice", tl_py_preempt_notice, METH_O,
     "preempt_notice(signum): installs a C handler (SA_RESTART) that writes one line to stderr, "
     "'threadloom: SIGUSR2 (the job's preemption warning) arrived, but the program did not call "
     "threadloom.cluster.on_preempt(): ignored; ...', and otherwise ignores the signal. The "
     "launchers install it under SLURM until on_preempt() replaces it. It survives interpreter "
     "finalization (Python resets only its own handlers)."},
    {"share_code", tl_py_share_code, METH_O,
     "share_code(code) -> int: makes the constants of a code object and of the code objects "
     "nested in it immortal; returns how many were made immortal."},
    {"share_layout", tl_py_share_layout, METH_NOARGS,
     "share_layout() -> (ok, text): whether share() works on this interpreter, and how or why "
     "not."},
    {"devices_select", tl_py_devices_select, METH_O,
     "devices_select(spec): selects the device backend before first use: 'cuda', 'none' or "
     "'sim:N[,option=value...]' (THREADLOOM_DEVICES does the same). BusyError once another "
     "backend is in use."},
    {"sim_configure", tl_py_sim_configure, METH_O,
     "sim_configure(spec): configures the sim devices ('sim:N[,option=value...]') without "
     "selecting sim as the backend, so they are usable by kind ('sim') next to another backend. "
     "Once per process (the same spec again is accepted)."},
    {"devices_backend", tl_py_devices_backend, METH_NOARGS,
     "devices_backend() -> {'name': 'cuda'|'sim'|'none', 'count': n, 'why': reason}: the "
     "selected backend (selecting the default now if none was)."},
    {"device_count", tl_py_device_count, METH_VARARGS,
     "device_count(kind=None) -> devices of kind 'cuda', 'sim' or None (the selected backend)."},
    {"device", tl_py_device_get, METH_VARARGS,
     "device(kind, index) -> Device (kind None: the selected backend's); opens it on first use."},
    {"import_dlpack", (PyCFunction)(void (*)(void))tl_py_device_import,
     METH_VARARGS | METH_KEYWORDS,
     "import_dlpack(obj, stream) -> DeviceBuffer over a CUDA tensor (torch, cupy) of the "
     "stream's device, in place: the producer orders its pending work before the stream's "
     "(DLPack stream=), and its object is kept alive by the buffer."},
    {"import_sim", tl_py_sim_import, METH_O,
     "import_sim(obj) -> DeviceBuffer over a bytes-like object whose memory is a live allocation "
     "of a sim device (a torch tensor over a sim DeviceBuffer, via threadloom.from_dlpack), "
     "keeping obj alive; None for other memory."},
    {"error_table", core_error_table, METH_NOARGS,
     "The error table: tuple of (code, name, message, exception class)."},
    {"make_error", (PyCFunction)(void (*)(void))core_make_error, METH_VARARGS | METH_KEYWORDS,
     "make_error(code, detail='', *, what=None, hint=None, cls=None) -> the exception for a "
     "TL_E* code, not raised: '<TL_ENAME>: <what> (<detail>). What to do: <hint>.' with the "
     "attributes code, name, hint and detail, as every error from the C layer. what and hint "
     "replace the error table's text; cls (the code's class or a subclass) the class. Python "
     "code makes its errors here (threadloom.errors), so they read like the C layer's."},
    {"errno_code", core_errno_code, METH_O,
     "errno_code(errno) -> the TL_E* code the C layer translates that errno value into "
     "(ENOSPC and EDQUOT -> TL_ENOSPC, ...; an errno without a row of its own -> TL_EIO)."},
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
  st->plan_type = PyType_FromModuleAndSpec(module, &tl_py_plan_spec, NULL);
  if (!st->plan_type || PyModule_AddObjectRef(module, "Plan", st->plan_type) < 0) return -1;
  st->pool_type = PyType_FromModuleAndSpec(module, &tl_py_pool_spec, NULL);
  if (!st->pool_type || PyModule_AddObjectRef(module, "Pool", st->pool_type) < 0) return -1;
  st->arena_type = PyType_FromModuleAndSpec(module, &tl_py_arena_spec, NULL);
  if (!st->arena_type || PyModule_AddObjectRef(module, "Arena", st->arena_type) < 0) return -1;
  st->buffer_type = PyType_FromModuleAndSpec(module, &tl_py_buffer_spec, NULL);
  if (!st->buffer_type || PyModule_AddObjectRef(module, "Buffer", st->buffer_type) < 0) return -1;
  st->hasher_type = PyType_FromModuleAndSpec(module, &tl_py_hasher_spec, NULL);
  if (!st->hasher_type || PyModule_AddObjectRef(module, "Hasher", st->hasher_type) < 0) return -1;
  st->wfile_type = PyType_FromModuleAndSpec(module, &tl_py_wfile_spec, NULL);
  if (!st->wfile_type || PyModule_AddObjectRef(module, "WFile", st->wfile_type) < 0) return -1;
  if (PyModule_AddIntConstant(module, "WFILE_ALIGN", (long)TL_WFILE_ALIGN) < 0) return -1;
  st->copyplan_type = PyType_FromModuleAndSpec(module, &tl_py_copyplan_spec, NULL);
  if (!st->copyplan_type || PyModule_AddObjectRef(module, "CopyPlan", st->copyplan_type) < 0)
    return -1;
  if (PyModule_AddObjectRef(module, "WFILE_URING_BUILT",
                            tl_wfile_uring_built() ? Py_True : Py_False) < 0)
    return -1;
  st->dlpack_tensor_type = PyType_FromModuleAndSpec(module, &tl_py_dlpack_tensor_spec, NULL);
  if (!st->dlpack_tensor_type ||
      PyModule_AddObjectRef(module, "DLPackTensor", st->dlpack_tensor_type) < 0)
    return -1;
  st->ncclcomm_type = PyType_FromModuleAndSpec(module, &tl_py_ncclcomm_spec, NULL);
  if (!st->ncclcomm_type || PyModule_AddObjectRef(module, "NcclComm", st->ncclcomm_type) < 0)
    return -1;
  st->refprobe_type = PyType_FromModuleAndSpec(module, &tl_py_refprobe_spec, NULL);
  if (!st->refprobe_type || PyModule_AddObjectRef(module, "RefProbe", st->refprobe_type) < 0)
    return -1;
  st->sharewalk_type = PyType_FromModuleAndSpec(module, &tl_py_sharewalk_spec, NULL);
  if (!st->sharewalk_type || PyModule_AddObjectRef(module, "ShareWalk", st->sharewalk_type) < 0)
    return -1;
  tl_py_share_init(st);
  st->device_type = PyType_FromModuleAndSpec(module, &tl_py_device_spec, NULL);
  if (!st->device_type || PyModule_AddObjectRef(module, "Device", st->device_type) < 0) return -1;
  st->stream_type = PyType_FromModuleAndSpec(module, &tl_py_stream_spec, NULL);
  if (!st->stream_type || PyModule_AddObjectRef(module, "Stream", st->stream_type) < 0) return -1;
  st->event_type = PyType_FromModuleAndSpec(module, &tl_py_event_spec, NULL);
  if (!st->event_type || PyModule_AddObjectRef(module, "Event", st->event_type) < 0) return -1;
  st->dbuf_type = PyType_FromModuleAndSpec(module, &tl_py_dbuf_spec, NULL);
  if (!st->dbuf_type || PyModule_AddObjectRef(module, "DeviceBuffer", st->dbuf_type) < 0)
    return -1;
  st->staging_type = PyType_FromModuleAndSpec(module, &tl_py_staging_spec, NULL);
  if (!st->staging_type || PyModule_AddObjectRef(module, "StagingPool", st->staging_type) < 0)
    return -1;
  st->slot_type = PyType_FromModuleAndSpec(module, &tl_py_slot_spec, NULL);
  if (!st->slot_type || PyModule_AddObjectRef(module, "StagingSlot", st->slot_type) < 0)
    return -1;
  if (PyModule_AddStringConstant(module, "__version__", tl_version_string()) < 0) return -1;
  return 0;
}

static int core_traverse(PyObject* module, visitproc visit, void* arg) {
  core_state* st = get_state(module);
  Py_VISIT(st->plan_type);
  Py_VISIT(st->pool_type);
  Py_VISIT(st->arena_type);
  Py_VISIT(st->buffer_type);
  Py_VISIT(st->hasher_type);
  Py_VISIT(st->wfile_type);
  Py_VISIT(st->copyplan_type);
  Py_VISIT(st->dlpack_tensor_type);
  Py_VISIT(st->ncclcomm_type);
  Py_VISIT(st->refprobe_type);
  Py_VISIT(st->sharewalk_type);
  Py_VISIT(st->device_type);
  Py_VISIT(st->stream_type);
  Py_VISIT(st->event_type);
  Py_VISIT(st->dbuf_type);
  Py_VISIT(st->staging_type);
  Py_VISIT(st->slot_type);
  Py_VISIT(st->error);
  for (int i = 0; i < TL_NCODES; i++) Py_VISIT(st->by_code[i]);
  return 0;
}

static int core_clear(PyObject* module) {
  core_state* st = get_state(module);
  Py_CLEAR(st->plan_type);
  Py_CLEAR(st->pool_type);
  Py_CLEAR(st->arena_type);
  Py_CLEAR(st->buffer_type);
  Py_CLEAR(st->hasher_type);
  Py_CLEAR(st->wfile_type);
  Py_CLEAR(st->copyplan_type);
  Py_CLEAR(st->dlpack_tensor_type);
  Py_CLEAR(st->ncclcomm_type);
  Py_CLEAR(st->refprobe_type);
  Py_CLEAR(st->sharewalk_type);
  Py_CLEAR(st->device_type);
  Py_CLEAR(st->stream_type);
  Py_CLEAR(st->event_type);
  Py_CLEAR(st->dbuf_type);
  Py_CLEAR(st->staging_type);
  Py_CLEAR(st->slot_type);
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

struct PyModuleDef tl_py_core_def = {
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

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&tl_py_core_def); }
