/* python/src/device.c: threadloom._core's devices: Device, Stream, Event, DeviceBuffer,
 * StagingPool and StagingSlot over threadloom/device.h (the same code for cuda and sim).
 *
 * Free-threading: every type may be used from many threads at once. Submissions take no lock
 * shared between threads: a Stream object is one per thread and use in the common case (the
 * per-thread stream pools below it), its only Python-side state (host buffers of copies in
 * flight) is under the object's critical section, and launch() touches none. Calls that can
 * block (synchronize, waits, allocation, staging acquire, copies: CUDA may stage pageable
 * memory synchronously) detach from the interpreter around the C call.
 *
 * Lifetimes: a Device lives for the process. Streams go back to the calling thread's pool when
 * their object dies (with host buffers of unfinished copies it first waits for them). A host
 * buffer given to a copy is held (its Py_buffer, so an arena Buffer or a staging slot cannot be
 * freed or handed back meanwhile) until an event recorded after the copy completed. A
 * DeviceBuffer returns its block to the caching allocator when it dies, from any thread; every
 * operation that uses it on a stream other than its allocation stream declares that use first
 * (tl_dbuf_record_stream), so that free never lets another stream reuse memory still in use. A
 * StagingSlot is handed back by copy_to_device() or release(), refused while memoryviews of it
 * are alive, so a producer cannot write a slot whose copy may still read it. */
#include "device.h"
#include "dlpack.h"

/* The module state for an object of one of this file's types or a Python subclass of them
 * (PyType_GetModule would fail on a subclass). */
core_state* tl_pydev_state(PyObject* self) {
  PyObject* m = PyType_GetModuleByDef(Py_TYPE(self), &tl_py_core_def);
  return m ? get_state(m) : NULL;
}

PyObject* tl_pydev_fail(PyObject* self, int err) {
  TL_DETAIL_COPY(detail);
  core_state* st = tl_pydev_state(self);
  return st ? tl_py_raise(st, err, detail) : NULL;
}

PyObject* tl_pydev_fail_detail(PyObject* self, int err, const char* detail) {
  core_state* st = tl_pydev_state(self);
  return st ? tl_py_raise(st, err, detail) : NULL;
}

/* A timeout argument: None -> -1, a number of seconds >= 0 -> ms. -2 with an exception. */
int tl_pydev_timeout_ms(PyObject* t) {
  if (!t || t == Py_None) return -1;
  double s = PyFloat_AsDouble(t);
  if (s == -1.0 && PyErr_Occurred()) return -2;
  if (!(s >= 0)) {
    PyErr_Format(PyExc_ValueError, "timeout must be None or >= 0 seconds, not %R", t);
    return -2;
  }
  return s > 2e6 ? 2000000000 : (int)(s * 1000 + 0.5);
}

int tl_pydev_timeout_arg(PyObject* args, PyObject* kwargs, const char* fmt, int* ms) {
  static char* kwlist[] = {"timeout", NULL};
  PyObject* t = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kwlist, &t)) return -1;
  *ms = tl_pydev_timeout_ms(t);
  return *ms == -2 ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------
// Device
// ---------------------------------------------------------------------------------------------

PyObject* tl_pydev_device_wrap(core_state* st, tl_device_t* d) {
  DeviceObject* o = PyObject_New(DeviceObject, (PyTypeObject*)st->device_type);
  if (!o) return NULL;
  o->dev = d;
  tl_device_props(d, &o->props);
  return (PyObject*)o;
}

/* The tl_device_t of a Device, or NULL with TypeError. */
tl_device_t* tl_pydev_device_of(core_state* st, PyObject* o) {
  if (!PyObject_TypeCheck(o, (PyTypeObject*)st->device_type)) {
    PyErr_Format(PyExc_TypeError, "expected a threadloom Device (threadloom.devices()[i]), not "
                 "%T", o);
    return NULL;
  }
  return ((DeviceObject*)o)->dev;
}

static void device_dealloc(PyObject* op) {
  PyTypeObject* tp = Py_TYPE(op);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static const tl_device_props_t* props(PyObject* op) { return &((DeviceObject*)op)->props; }

static PyObject* device_get_kind(PyObject* op, void* c) {
  (void)c;
  return PyUnicode_FromString(props(op)->kind == TL_DEVICE_CUDA ? "cuda" : "sim");
}
static PyObject* device_get_index(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromLong(props(op)->index);
}
static PyObject* device_get_name(PyObject* op, void* c) {
  (void)c;
  return PyUnicode_FromString(props(op)->name);
}
static PyObject* device_get_memory(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromSize_t(props(op)->total_mem);
}
static PyObject* device_get_numa_node(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromLong(props(op)->numa_node);
}
static PyObject* device_get_local_cpus(PyObject* op, void* c) {
  (void)c;
  return PyUnicode_FromString(props(op)->local_cpus);
}
/* The CPU numbers of the local node: "0-3,8" -> [0, 1, 2, 3, 8]. */
static PyObject* device_get_local_cpu_numbers(PyObject* op, void* c) {
  (void)c;
  PyObject* out = PyList_New(0);
  const char* p = props(op)->local_cpus;
  while (out && *p) {
    char* end;
    long a = strtol(p, &end, 10), b = a;
    if (end == p) break;
    if (*end == '-') b = strtol(end + 1, &end, 10);
    for (long i = a; i <= b; i++) {
      PyObject* n = PyLong_FromLong(i);
      if (!n || PyList_Append(out, n) < 0) {
        Py_XDECREF(n);
        Py_CLEAR(out);
        break;
      }
      Py_DECREF(n);
    }
    p = *end == ',' ? end + 1 : end;
    if (*end != ',') break;
  }
  return out;
}

static PyObject* device_get_pci(PyObject* op, void* c) {
  (void)c;
  return PyUnicode_FromString(props(op)->pci_bus_id);
}
static PyObject* device_get_cc(PyObject* op, void* c) {
  (void)c;
  return Py_BuildValue("(ii)", props(op)->cc_major, props(op)->cc_minor);
}
static PyObject* device_get_prio(PyObject* op, void* c) {
  (void)c;
  return Py_BuildValue("(ii)", props(op)->priority_least, props(op)->priority_greatest);
}

static PyObject* device_repr(PyObject* op) {
  return PyUnicode_FromFormat("Device('%s', '%s')", tl_device_name(((DeviceObject*)op)->dev),
                              props(op)->name);
}

static PyObject* device_str(PyObject* op) {
  return PyUnicode_FromString(tl_device_name(((DeviceObject*)op)->dev));
}

static Py_hash_t device_hash(PyObject* op) {
  return (Py_hash_t)(((uintptr_t)((DeviceObject*)op)->dev) >> 4);
}

static PyObject* device_richcompare(PyObject* a, PyObject* b, int cmp) {
  if (Py_TYPE(a) != Py_TYPE(b) || (cmp != Py_EQ && cmp != Py_NE)) Py_RETURN_NOTIMPLEMENTED;
  int eq = ((DeviceObject*)a)->dev == ((DeviceObject*)b)->dev;
  return PyBool_FromLong(cmp == Py_EQ ? eq : !eq);
}

static PyObject* device_mem_info(PyObject* op, PyObject* unused) {
  (void)unused;
  size_t fr = 0, tot = 0;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_device_mem_info(((DeviceObject*)op)->dev, &fr, &tot);
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail(op, err);
  return Py_BuildValue("(nn)", (Py_ssize_t)fr, (Py_ssize_t)tot);
}

static PyObject* device_synchronize(PyObject* op, PyObject* unused) {
  (void)unused;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_device_sync(((DeviceObject*)op)->dev);
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* device_empty_cache(PyObject* op, PyObject* unused) {
  (void)unused;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_device_empty_cache(((DeviceObject*)op)->dev);
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* device_memory_stats(PyObject* op, PyObject* unused) {
  (void)unused;
  tl_dmem_stats_t s;
  int err = tl_device_mem_stats(((DeviceObject*)op)->dev, &s);
  if (err) return tl_pydev_fail(op, err);
  return Py_BuildValue("{s:n,s:n,s:n,s:n,s:n,s:K,s:K,s:K,s:K,s:K}", "bytes_in_use",
                       (Py_ssize_t)s.bytes_in_use, "blocks_in_use", (Py_ssize_t)s.blocks_in_use,
                       "bytes_cached", (Py_ssize_t)s.bytes_cached, "blocks_cached",
                       (Py_ssize_t)s.blocks_cached, "peak_bytes_in_use",
                       (Py_ssize_t)s.peak_bytes_in_use, "allocs", (unsigned long long)s.allocs,
                       "cache_hits", (unsigned long long)s.cache_hits, "device_allocs",
                       (unsigned long long)s.device_allocs, "device_frees",
                       (unsigned long long)s.device_frees, "oom_retries",
                       (unsigned long long)s.oom_retries);
}

static PyObject* device_engine_stats(PyObject* op, PyObject* unused) {
  (void)unused;
  static const char* const names[TL_ENGINE_COUNT] = {"compute", "h2d", "d2h"};
  PyObject* out = PyDict_New();
  if (!out) return NULL;
  for (int e = 0; e < TL_ENGINE_COUNT; e++) {
    tl_engine_stats_t s;
    int err = tl_sim_engine_stats(((DeviceObject*)op)->dev, (tl_engine_t)e, &s);
    if (err) {
      Py_DECREF(out);
      return tl_pydev_fail(op, err);
    }
    PyObject* d = Py_BuildValue("{s:d,s:K,s:K,s:d,s:d,s:d}", "busy_s", s.busy_ns / 1e9, "ops",
                                (unsigned long long)s.ops, "bytes", (unsigned long long)s.bytes,
                                "late_s", s.late_ns / 1e9, "late_max_s", s.late_max_ns / 1e9,
                                "wall_s", s.wall_ns / 1e9);
    if (!d || PyDict_SetItemString(out, names[e], d) < 0) {
      Py_XDECREF(d);
      Py_DECREF(out);
      return NULL;
    }
    Py_DECREF(d);
  }
  return out;
}

static PyObject* device_sim_set(PyObject* op, PyObject* arg) {
  const char* opts = PyUnicode_AsUTF8(arg);
  if (!opts) return NULL;
  int err = tl_sim_set(((DeviceObject*)op)->dev, opts);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* device_sim_inject(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"fault", "count", NULL};
  const char* what;
  int count = 1;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "s|i:sim_inject", kwlist, &what, &count))
    return NULL;
  tl_sim_fault_t f;
  if (strcmp(what, "oom") == 0) f = TL_SIM_FAULT_OOM;
  else if (strcmp(what, "copy") == 0) f = TL_SIM_FAULT_COPY;
  else if (strcmp(what, "lost") == 0) f = TL_SIM_FAULT_LOST;
  else
    return PyErr_Format(PyExc_ValueError, "fault must be 'oom', 'copy' or 'lost', not '%s'", what);
  int err = tl_sim_inject(((DeviceObject*)op)->dev, f, count);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* device_sim_recover(PyObject* op, PyObject* unused) {
  (void)unused;
  int err;
  Py_BEGIN_ALLOW_THREADS
  err = tl_sim_recover(((DeviceObject*)op)->dev);
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyMethodDef device_methods[] = {
    {"mem_info", device_mem_info, METH_NOARGS, "(free, total) bytes of device memory."},
    {"synchronize", device_synchronize, METH_NOARGS,
     "Waits for all work queued on the device's streams (torch.cuda.synchronize)."},
    {"empty_cache", device_empty_cache, METH_NOARGS,
     "Returns the caching allocator's cached blocks to the device (after a synchronize)."},
    {"memory_stats", device_memory_stats, METH_NOARGS,
     "The caching allocator's counters: bytes/blocks in use and cached, peak, allocs, "
     "cache_hits, device_allocs, device_frees, oom_retries."},
    {"engine_stats", device_engine_stats, METH_NOARGS,
     "sim devices: {'compute'|'h2d'|'d2h': {busy_s, ops, bytes, late_s, late_max_s, wall_s}}; "
     "busy_s / wall_s is the engine's utilization. InvalidArgumentError on cuda."},
    {"sim_set", device_sim_set, METH_O,
     "sim_set('h2d=100MB/s,d2h=...'): changes a sim device's bandwidths while it runs."},
    {"sim_inject", (PyCFunction)(void (*)(void))device_sim_inject, METH_VARARGS | METH_KEYWORDS,
     "sim_inject(fault, count=1): 'oom' (the next count allocations fail), 'copy' (the next "
     "count copies fail), 'lost' (the device is lost now)."},
    {"sim_recover", device_sim_recover, METH_NOARGS,
     "Makes a lost sim device usable again once its queued work drained (tests only: a real GPU "
     "never comes back)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef device_getset[] = {
    {"kind", device_get_kind, NULL, "'cuda' or 'sim'", NULL},
    {"type", device_get_kind, NULL, "the same as kind (torch.device.type)", NULL},
    {"index", device_get_index, NULL, "ordinal within its kind", NULL},
    {"name", device_get_name, NULL, "'NVIDIA H200', 'threadloom sim device 0'", NULL},
    {"memory", device_get_memory, NULL, "bytes of device memory", NULL},
    {"numa_node", device_get_numa_node, NULL, "host NUMA node local to the device, -1 unknown", NULL},
    {"local_cpu_list", device_get_local_cpus, NULL, "that node's CPUs, '0-15,32-47'", NULL},
    {"local_cpus", device_get_local_cpu_numbers, NULL, "that node's CPU numbers, [0, 1, ...]",
     NULL},
    {"pci_bus_id", device_get_pci, NULL, "'0000:3b:00.0' ('' for sim)", NULL},
    {"compute_capability", device_get_cc, NULL, "(major, minor)", NULL},
    {"priority_range", device_get_prio, NULL, "(least, greatest) stream priority, e.g. (0, -5)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot device_slots[] = {
    {Py_tp_doc, (void*)"A device (cuda or sim), from threadloom.devices(). Lives for the process; "
                       "compares equal to the same device."},
    {Py_tp_dealloc, (void*)(uintptr_t)device_dealloc},
    {Py_tp_repr, (void*)(uintptr_t)device_repr},
    {Py_tp_str, (void*)(uintptr_t)device_str},
    {Py_tp_hash, (void*)(uintptr_t)device_hash},
    {Py_tp_richcompare, (void*)(uintptr_t)device_richcompare},
    {Py_tp_methods, device_methods},
    {Py_tp_getset, device_getset},
    {0, NULL},
};

PyType_Spec tl_py_device_spec = {
    .name = "threadloom._core.Device",
    .basicsize = sizeof(DeviceObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = device_slots,
};

// ---------------------------------------------------------------------------------------------
// Module functions: selection and discovery
// ---------------------------------------------------------------------------------------------

PyObject* tl_py_devices_select(PyObject* module, PyObject* arg) {
  const char* spec = PyUnicode_AsUTF8(arg);
  if (!spec) return NULL;
  int err = tl_devices_select(spec);
  if (err) return tl_py_fail(module, err);
  Py_RETURN_NONE;
}

PyObject* tl_py_sim_configure(PyObject* module, PyObject* arg) {
  const char* spec = PyUnicode_AsUTF8(arg);
  if (!spec) return NULL;
  int err = tl_sim_configure(spec);
  if (err) return tl_py_fail(module, err);
  Py_RETURN_NONE;
}

PyObject* tl_py_devices_backend(PyObject* module, PyObject* unused) {
  (void)unused;
  tl_devices_info_t info;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS /* the default selection may initialise CUDA */
  err = tl_devices_backend(&info);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_py_raise(get_state(module), err, detail);
  return Py_BuildValue("{s:s,s:i,s:s}", "name", info.name, "count", info.count, "why", info.why);
}

static int parse_kind(PyObject* kind, tl_device_kind_t* out) {
  const char* k = kind == Py_None ? "default" : PyUnicode_AsUTF8(kind);
  if (!k) return -1;
  if (strcmp(k, "default") == 0) *out = TL_DEVICE_DEFAULT;
  else if (strcmp(k, "cuda") == 0) *out = TL_DEVICE_CUDA;
  else if (strcmp(k, "sim") == 0) *out = TL_DEVICE_SIM;
  else {
    PyErr_Format(PyExc_ValueError, "device kind must be None, 'cuda' or 'sim', not '%s'", k);
    return -1;
  }
  return 0;
}

PyObject* tl_py_device_count(PyObject* module, PyObject* args) {
  PyObject* kind = Py_None;
  if (!PyArg_ParseTuple(args, "|O:device_count", &kind)) return NULL;
  tl_device_kind_t k;
  if (parse_kind(kind, &k) < 0) return NULL;
  int n = 0, err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_device_count(k, &n);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_py_raise(get_state(module), err, detail);
  return PyLong_FromLong(n);
}

PyObject* tl_py_device_get(PyObject* module, PyObject* args) {
  PyObject* kind;
  int index;
  if (!PyArg_ParseTuple(args, "Oi:device", &kind, &index)) return NULL;
  tl_device_kind_t k;
  if (parse_kind(kind, &k) < 0) return NULL;
  tl_device_t* d = NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS /* opening a cuda device retains its context: 0.1 s or more */
  err = tl_device_get(k, index, &d);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_py_raise(get_state(module), err, detail);
  return tl_pydev_device_wrap(get_state(module), d);
}

// ---------------------------------------------------------------------------------------------
// Event
// ---------------------------------------------------------------------------------------------

static PyObject* event_make(core_state* st, PyTypeObject* type, PyObject* device, int timing) {
  tl_device_t* d = tl_pydev_device_of(st, device);
  if (!d) return NULL;
  tl_event_t* e;
  int err = tl_event_init(d, timing ? TL_EVENT_TIMING : 0, &e);
  if (err) {
    TL_DETAIL_COPY(detail);
    return tl_py_raise(st, err, detail);
  }
  EventObject* o = (EventObject*)type->tp_alloc(type, 0);
  if (!o) {
    tl_event_close(e);
    return NULL;
  }
  o->device = Py_NewRef(device);
  o->e = e;
  return (PyObject*)o;
}

static PyObject* event_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"device", "enable_timing", NULL};
  PyObject* device;
  int timing = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$p:Event", kwlist, &device, &timing))
    return NULL;
  PyObject* m = PyType_GetModuleByDef(type, &tl_py_core_def);
  return m ? event_make(get_state(m), type, device, timing) : NULL;
}

static void event_dealloc(PyObject* op) {
  EventObject* self = (EventObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  tl_event_close(self->e);
  Py_XDECREF(self->device);
  tp->tp_free(op);
  Py_DECREF(tp);
}

tl_stream_t* tl_pydev_stream_of(core_state* st, PyObject* o) {
  if (!PyObject_TypeCheck(o, (PyTypeObject*)st->stream_type)) {
    PyErr_Format(PyExc_TypeError, "expected a threadloom Stream, not %T", o);
    return NULL;
  }
  return ((StreamObject*)o)->s;
}

static PyObject* event_record(PyObject* op, PyObject* stream) {
  core_state* st = tl_pydev_state(op);
  tl_stream_t* s = st ? tl_pydev_stream_of(st, stream) : NULL;
  if (!s) return NULL;
  int err = tl_event_record(((EventObject*)op)->e, s);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* event_query(PyObject* op, PyObject* unused) {
  (void)unused;
  int err = tl_event_query(((EventObject*)op)->e);
  if (err == TL_EAGAIN) Py_RETURN_FALSE;
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_TRUE;
}

static PyObject* event_synchronize(PyObject* op, PyObject* args, PyObject* kwargs) {
  int ms;
  if (tl_pydev_timeout_arg(args, kwargs, "|O:synchronize", &ms) < 0) return NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_event_wait(((EventObject*)op)->e, ms);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) return tl_pydev_fail_detail(op, err, detail);
  Py_RETURN_NONE;
}

/* wait(stream): a threadloom Stream, or the int handle of another library's stream on the
 * event's device (torch.cuda.current_stream().cuda_stream), through tl_event_wait_on. */
static PyObject* event_wait(PyObject* op, PyObject* stream) {
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  EventObject* self = (EventObject*)op;
  int err;
  if (PyLong_Check(stream)) {
    void* handle = PyLong_AsVoidPtr(stream);
    if (!handle && PyErr_Occurred()) return NULL;
    tl_device_t* d = tl_pydev_device_of(st, self->device);
    if (!d) return NULL;
    err = tl_event_wait_on(self->e, d, handle);
  } else {
    tl_stream_t* s = tl_pydev_stream_of(st, stream);
    if (!s) return NULL;
    err = tl_stream_wait_event(s, self->e);
  }
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* event_elapsed_time(PyObject* op, PyObject* end) {
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  if (!PyObject_TypeCheck(end, (PyTypeObject*)st->event_type))
    return PyErr_Format(PyExc_TypeError, "elapsed_time takes an Event, not %T", end);
  double ms;
  int err = tl_event_elapsed(((EventObject*)op)->e, ((EventObject*)end)->e, &ms);
  if (err) return tl_pydev_fail(op, err);
  return PyFloat_FromDouble(ms);
}

static PyObject* event_get_device(PyObject* op, void* c) {
  (void)c;
  return Py_NewRef(((EventObject*)op)->device);
}

static PyMethodDef event_methods[] = {
    {"record", event_record, METH_O, "record(stream): completes when stream's earlier work has."},
    {"query", event_query, METH_NOARGS,
     "True once the last record completed (or never recorded); raises the error of failed work."},
    {"synchronize", (PyCFunction)(void (*)(void))event_synchronize, METH_VARARGS | METH_KEYWORDS,
     "synchronize(timeout=None): blocks (detached) until the last record completed; "
     "TimedOutError after timeout seconds."},
    {"wait", event_wait, METH_O,
     "wait(stream): the stream's later work waits for this event; the calling thread does not. "
     "stream: a threadloom Stream, or the int handle of another library's stream on the event's "
     "device (torch.cuda.current_stream().cuda_stream)."},
    {"elapsed_time", event_elapsed_time, METH_O,
     "elapsed_time(end) -> milliseconds between two completed records (enable_timing=True)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef event_getset[] = {
    {"device", event_get_device, NULL, "the Device", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot event_slots[] = {
    {Py_tp_doc, (void*)"Event(device, *, enable_timing=False), as torch.cuda.Event."},
    {Py_tp_new, (void*)(uintptr_t)event_new},
    {Py_tp_dealloc, (void*)(uintptr_t)event_dealloc},
    {Py_tp_methods, event_methods},
    {Py_tp_getset, event_getset},
    {0, NULL},
};

PyType_Spec tl_py_event_spec = {
    .name = "threadloom._core.Event",
    .basicsize = sizeof(EventObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = event_slots,
};

// ---------------------------------------------------------------------------------------------
// DeviceBuffer
// ---------------------------------------------------------------------------------------------

/* The block a buffer (or the buffer it views) owns, or NULL for imports (a capsule, or a base
 * that is no DeviceBuffer: import_sim's exporter). */
tl_dbuf_t* tl_pydev_dbuf_root(DeviceBufferObject* b) {
  while (b->base && !b->b && !b->capsule && Py_TYPE(b->base) == Py_TYPE(b))
    b = (DeviceBufferObject*)b->base;
  return b->b;
}

static void dbuf_release(DeviceBufferObject* self) {
  tl_dbuf_t* b = self->b;
  self->b = NULL;
  atomic_store(&self->ptr, NULL);
  if (b) tl_dbuf_free(b);
  Py_CLEAR(self->capsule);
}

static int dbuf_traverse(PyObject* op, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(op));
  Py_VISIT(((DeviceBufferObject*)op)->device);
  Py_VISIT(((DeviceBufferObject*)op)->base);
  return 0;
}

static void dbuf_dealloc(PyObject* op) {
  DeviceBufferObject* self = (DeviceBufferObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  PyObject_GC_UnTrack(op);
  /* a view counts as an export of its base; an import of a DeviceBuffer (its capsule) gives
   * its export back through the capsule's deleter instead */
  int view = self->base && !self->capsule && PyObject_TypeCheck(self->base, tp);
  dbuf_release(self);
  if (view) atomic_fetch_sub(&((DeviceBufferObject*)self->base)->exports, 1);
  Py_CLEAR(self->base);
  Py_CLEAR(self->device);
  tp->tp_free(op);
  Py_DECREF(tp);
}

DeviceBufferObject* tl_pydev_dbuf_new(core_state* st, PyObject* device) {
  DeviceBufferObject* o = PyObject_GC_New(DeviceBufferObject, (PyTypeObject*)st->dbuf_type);
  if (!o) return NULL;
  o->device = Py_NewRef(device);
  o->b = NULL;
  o->base = NULL;
  o->capsule = NULL;
  atomic_init(&o->ptr, NULL);
  o->nbytes = 0;
  atomic_init(&o->exports, 0);
  o->format[0] = 'B';
  o->format[1] = '\0';
  o->dt_code = kDLUInt;
  o->dt_bits = 8;
  return o;
}

static PyObject* dbuf_free(PyObject* op, PyObject* unused) {
  (void)unused;
  DeviceBufferObject* self = (DeviceBufferObject*)op;
  PyObject* ret = NULL;
  Py_BEGIN_CRITICAL_SECTION(op);
  if (atomic_load(&self->exports) > 0)
    PyErr_SetString(PyExc_BufferError, "cannot free a DeviceBuffer while views or DLPack "
                                       "exports of it are alive: drop them first");
  else {
    dbuf_release(self);
    ret = Py_NewRef(Py_None);
  }
  Py_END_CRITICAL_SECTION();
  return ret;
}

static PyObject* dbuf_view(PyObject* op, PyObject* args) {
  Py_ssize_t off, n;
  if (!PyArg_ParseTuple(args, "nn:view", &off, &n)) return NULL;
  DeviceBufferObject* self = (DeviceBufferObject*)op;
  if (off < 0 || n < 0 || off > self->nbytes || n > self->nbytes - off)
    return PyErr_Format(PyExc_ValueError, "view(%zd, %zd) of a %zd-byte DeviceBuffer", off, n,
                        self->nbytes);
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  DeviceBufferObject* v = tl_pydev_dbuf_new(st, self->device);
  if (!v) return NULL;
  PyObject* ret = NULL;
  Py_BEGIN_CRITICAL_SECTION(op);
  char* p = atomic_load(&self->ptr);
  if (!p) PyErr_SetString(PyExc_ValueError, "this DeviceBuffer was freed");
  else {
    atomic_fetch_add(&self->exports, 1);
    v->base = Py_NewRef(op);
    atomic_store(&v->ptr, p + off);
    v->nbytes = n;
    ret = (PyObject*)v;
  }
  Py_END_CRITICAL_SECTION();
  if (!ret) {
    Py_DECREF(v);
    return NULL;
  }
  PyObject_GC_Track((PyObject*)v);
  return ret;
}

static PyObject* dbuf_cast(PyObject* op, PyObject* arg) {
  const char* fmt = PyUnicode_AsUTF8(arg);
  if (!fmt) return NULL;
  int code, bits;
  if (tl_py_format_dtype(fmt, &code, &bits) < 0) return NULL;
  DeviceBufferObject* self = (DeviceBufferObject*)op;
  if (self->nbytes % (bits / 8))
    return PyErr_Format(PyExc_ValueError, "cast('%s'): a %zd-byte DeviceBuffer is not a whole "
                        "number of %d-byte elements", fmt, self->nbytes, bits / 8);
  PyObject* v = PyObject_CallMethod(op, "view", "nn", (Py_ssize_t)0, self->nbytes);
  if (!v) return NULL;
  DeviceBufferObject* b = (DeviceBufferObject*)v; /* new, not yet shared: no lock needed */
  b->format[0] = fmt[0];
  b->dt_code = (unsigned char)code;
  b->dt_bits = (unsigned char)bits;
  return v;
}

static void dbuf_dlpack_done(PyObject* op) {
  atomic_fetch_sub(&((DeviceBufferObject*)op)->exports, 1);
}

/* Makes the buffer's queued work visible to a consumer: an event is recorded on the stream the
 * block was allocated for (where its producer's work is, the feeder's included); on cuda the
 * consumer's stream (a DLPack stream int: None is the legacy default stream 1, -1 asks for no
 * synchronisation) waits for it, on sim (a host consumer) the calling thread does. 0 or -1. */
static int dbuf_ready(PyObject* op, tl_device_t* d, PyObject* stream, int cuda) {
  tl_dbuf_t* root = tl_pydev_dbuf_root((DeviceBufferObject*)op);
  if (!root) return 0; /* an import: its producer ordered its work when we took it */
  long long handle = 1;
  if (stream && stream != Py_None) {
    handle = PyLong_AsLongLong(stream);
    if (handle == -1 && PyErr_Occurred()) return -1;
  }
  if (handle == -1) return 0;
  tl_event_t* e = NULL;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_event_init(d, 0, &e);
  if (!err) err = tl_event_record(e, tl_dbuf_stream(root));
  if (!err) err = cuda ? tl_event_wait_on(e, d, (void*)(uintptr_t)handle) : tl_event_wait(e, -1);
  /* the consumer's stream uses the memory now: its free waits for that stream's work there
   * (torch frees the tensor when its Python object dies, not when its kernels are done) */
  if (!err && cuda) err = tl_dbuf_record_handle(root, (void*)(uintptr_t)handle);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  tl_event_close(e);
  Py_END_ALLOW_THREADS
  if (err) {
    tl_pydev_fail_detail(op, err, detail);
    return -1;
  }
  return 0;
}

static PyObject* dbuf_dlpack(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
  PyObject *stream = NULL, *max_version = NULL, *dl_device = NULL, *copy = NULL;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO:__dlpack__", kwlist, &stream,
                                   &max_version, &dl_device, &copy))
    return NULL;
  DeviceBufferObject* self = (DeviceBufferObject*)op;
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  tl_device_t* d = tl_pydev_device_of(st, self->device);
  if (!d) return NULL;
  const tl_device_props_t* pr = props(self->device);
  int cuda = pr->kind == TL_DEVICE_CUDA;
  int versioned = 0;
  if (cuda) {
    if (copy && copy != Py_None && PyObject_IsTrue(copy) == 1)
      return PyErr_Format(PyExc_BufferError, "copy=True: a DeviceBuffer is exported in place");
    if (max_version && max_version != Py_None) {
      PyObject* major = PySequence_GetItem(max_version, 0);
      if (!major) return NULL;
      versioned = PyLong_AsLong(major) >= DLPACK_MAJOR_VERSION;
      Py_DECREF(major);
    }
    if (dl_device && dl_device != Py_None) {
      long t, i;
      if (!PyArg_ParseTuple(dl_device, "ll", &t, &i)) return NULL;
      if (t != kDLCUDA || i != pr->index)
        return PyErr_Format(PyExc_BufferError, "this DeviceBuffer is on (kDLCUDA=2, %d), not on "
                            "dl_device=(%ld, %ld)", pr->index, t, i);
    }
  } else {
    /* sim memory is host memory: exported as kDLCPU, which takes no stream */
    if (stream && stream != Py_None && !(PyLong_Check(stream) && PyLong_AsLong(stream) == -1)) {
      return PyErr_Format(PyExc_BufferError, "a sim DeviceBuffer is host memory exported as "
                          "kDLCPU, which has no stream: pass stream=None (got %R)", stream);
    }
    if (tl_py_dlpack_check_args(NULL, max_version, dl_device, copy, &versioned) < 0) return NULL;
  }
  void* p;
  Py_BEGIN_CRITICAL_SECTION(op);
  p = atomic_load(&self->ptr);
  if (p) atomic_fetch_add(&self->exports, 1);
  Py_END_CRITICAL_SECTION();
  if (!p) return PyErr_Format(PyExc_ValueError, "this DeviceBuffer was freed");
  if (dbuf_ready(op, d, cuda ? stream : NULL, cuda) < 0) {
    dbuf_dlpack_done(op);
    return NULL;
  }
  return tl_py_dlpack_export_on(op, p, self->nbytes, versioned, 0, dbuf_dlpack_done,
                                cuda ? kDLCUDA : kDLCPU, cuda ? pr->index : 0, self->dt_code,
                                self->dt_bits);
}

static PyObject* dbuf_dlpack_device(PyObject* op, PyObject* unused) {
  (void)unused;
  const tl_device_props_t* pr = props(((DeviceBufferObject*)op)->device);
  if (pr->kind == TL_DEVICE_CUDA) return Py_BuildValue("(ii)", kDLCUDA, pr->index);
  return Py_BuildValue("(ii)", kDLCPU, 0);
}

static PyObject* dbuf_record_stream(PyObject* op, PyObject* stream) {
  core_state* st = tl_pydev_state(op);
  if (!st) return NULL;
  tl_dbuf_t* root = tl_pydev_dbuf_root((DeviceBufferObject*)op);
  int err;
  if (PyLong_Check(stream)) { /* another library's stream on the buffer's device */
    void* handle = PyLong_AsVoidPtr(stream);
    if (!handle && PyErr_Occurred()) return NULL;
    if (!root) Py_RETURN_NONE;
    err = tl_dbuf_record_handle(root, handle);
    if (err) return tl_pydev_fail(op, err);
    Py_RETURN_NONE;
  }
  tl_stream_t* s = tl_pydev_stream_of(st, stream);
  if (!s) return NULL;
  if (!root) Py_RETURN_NONE;
  err = tl_dbuf_record_stream(root, s);
  if (err) return tl_pydev_fail(op, err);
  Py_RETURN_NONE;
}

static PyObject* dbuf_enter(PyObject* op, PyObject* unused) {
  (void)unused;
  return Py_NewRef(op);
}

static PyObject* dbuf_exit(PyObject* op, PyObject* args) {
  (void)args;
  return dbuf_free(op, NULL);
}

static PyObject* dbuf_get_ptr(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromVoidPtr(atomic_load(&((DeviceBufferObject*)op)->ptr));
}
static PyObject* dbuf_get_nbytes(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromSsize_t(((DeviceBufferObject*)op)->nbytes);
}
static PyObject* dbuf_get_format(PyObject* op, void* c) {
  (void)c;
  return PyUnicode_FromString(((DeviceBufferObject*)op)->format);
}
static PyObject* dbuf_get_itemsize(PyObject* op, void* c) {
  (void)c;
  return PyLong_FromLong(((DeviceBufferObject*)op)->dt_bits / 8);
}
static PyObject* dbuf_get_device(PyObject* op, void* c) {
  (void)c;
  return Py_NewRef(((DeviceBufferObject*)op)->device);
}
static Py_ssize_t dbuf_len(PyObject* op) { return ((DeviceBufferObject*)op)->nbytes; }

static PyObject* dbuf_repr(PyObject* op) {
  DeviceBufferObject* self = (DeviceBufferObject*)op;
  if (self->format[0] != 'B')
    return PyUnicode_FromFormat("<DeviceBuffer %zd bytes of '%s' on %s at %p>", self->nbytes,
                                self->format, tl_device_name(((DeviceObject*)self->device)->dev),
                                atomic_load(&self->ptr));
  return PyUnicode_FromFormat("<DeviceBuffer %zd bytes on %s at %p>", self->nbytes,
                              tl_device_name(((DeviceObject*)self->device)->dev),
                              atomic_load(&self->ptr));
}

static PyMethodDef dbuf_methods[] = {
    {"free", dbuf_free, METH_NOARGS,
     "Returns the memory to the caching allocator now (stream-ordered; idempotent)."},
    {"view", dbuf_view, METH_VARARGS,
     "view(offset, nbytes) -> a DeviceBuffer of bytes over part of this one (keeps it alive)."},
    {"cast", dbuf_cast, METH_O,
     "cast(format) -> the same memory as elements of a struct-module format ('f' float32, 'd', "
     "'q', 'i', 'e', 'B', ...), as memoryview.cast: its DLPack export has that dtype, so "
     "communicators reduce it and torch/numpy read it typed."},
    {"record_stream", dbuf_record_stream, METH_O,
     "record_stream(stream): declares use on another stream, so the memory is reused only "
     "after that stream's work up to the free (torch's Tensor.record_stream). stream: a "
     "threadloom Stream, or the int handle of another library's stream on the buffer's device "
     "(a cuda __dlpack__(stream=) export declares its consumer's stream itself)."},
    {"__dlpack__", (PyCFunction)(void (*)(void))dbuf_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None): the buffer as a "
     "1-D tensor of its format (uint8 unless cast()), in place. cuda: kDLCUDA, and the consumer's stream (an int; None is "
     "the legacy default stream, -1 none) waits for the buffer's queued work. sim: host memory "
     "as kDLCPU (numpy and torch read it), after the calling thread waited for that work."},
    {"__dlpack_device__", dbuf_dlpack_device, METH_NOARGS,
     "(kDLCUDA=2, index) for cuda, (kDLCPU=1, 0) for sim."},
    {"__enter__", dbuf_enter, METH_NOARGS, NULL},
    {"__exit__", dbuf_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef dbuf_getset[] = {
    {"ptr", dbuf_get_ptr, NULL, "device address (0 once freed)", NULL},
    {"nbytes", dbuf_get_nbytes, NULL, "size in bytes", NULL},
    {"format", dbuf_get_format, NULL, "its elements' struct-module format ('B' unless cast())",
     NULL},
    {"itemsize", dbuf_get_itemsize, NULL, "bytes per element", NULL},
    {"device", dbuf_get_device, NULL, "the Device", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot dbuf_slots[] = {
    {Py_tp_doc, (void*)"Device memory from Stream.alloc(), or a view of it, or an imported CUDA "
                       "tensor. Freed (stream-ordered, into the caching allocator) by free(), a "
                       "with-block or when dropped, from any thread."},
    {Py_tp_dealloc, (void*)(uintptr_t)dbuf_dealloc},
    {Py_tp_traverse, (void*)(uintptr_t)dbuf_traverse},
    {Py_tp_repr, (void*)(uintptr_t)dbuf_repr},
    {Py_tp_methods, dbuf_methods},
    {Py_tp_getset, dbuf_getset},
    {Py_sq_length, (void*)(uintptr_t)dbuf_len},
    {0, NULL},
};

PyType_Spec tl_py_dbuf_spec = {
    .name = "threadloom._core.DeviceBuffer",
    .basicsize = sizeof(DeviceBufferObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = dbuf_slots,
};
