/* python/src/plan.c: threadloom._core.Plan (placement plans) and the calling thread's affinity.
 *
 * A Plan wraps a tl_plan_t, immutable after construction except its claim counters, which are
 * atomics in C: every method is safe from any thread without a lock. Pinning detaches from the
 * interpreter around the system calls. */
#include "core.h"

// ---------------------------------------------------------------------------------------------
// Plan: a placement plan (immutable but for its claim counters, which are atomic in C)
// ---------------------------------------------------------------------------------------------

typedef struct {
  PyObject_HEAD
  tl_plan_t* plan; /* owned; never NULL after construction */
} PlanObject;

int tl_py_parse_role(PyObject* role, tl_role_t* out) {
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
                           "main_thread", "cpus", "gpu_bus_ids", "device_nodes", NULL};
  PyObject *xml = Py_None, *synthetic = Py_None, *cpus = Py_None, *bus_ids = Py_None,
           *nodes_obj = Py_None;
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOiiipOOO:Plan", kwlist, &xml, &synthetic,
                                   &spec.gpus, &spec.loaders_per_gpu, &spec.io_threads,
                                   &spec.main_thread, &cpus, &bus_ids, &nodes_obj))
    return NULL;
  PyObject* module = PyType_GetModule(type);
  if (!module) return NULL;
  if (cpus != Py_None && !(spec.cpus = PyUnicode_AsUTF8(cpus))) return NULL;
  int* nodes = NULL; /* device_nodes, owned here */
  if (nodes_obj != Py_None) {
    PyObject* t = PySequence_Tuple(nodes_obj);
    if (!t) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    nodes = PyMem_Calloc((size_t)(n ? n : 1), sizeof *nodes);
    if (!nodes) {
      Py_DECREF(t);
      return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
      long v = PyLong_AsLong(PyTuple_GET_ITEM(t, i));
      if ((v == -1 && PyErr_Occurred()) || v < -1 || v > 1 << 20) {
        if (!PyErr_Occurred())
          PyErr_Format(PyExc_ValueError, "device_nodes[%zd] = %ld: a NUMA node >= 0, or -1", i, v);
        PyMem_Free(nodes);
        Py_DECREF(t);
        return NULL;
      }
      nodes[i] = (int)v;
    }
    Py_DECREF(t);
    spec.device_nodes = nodes;
    spec.ndevice_nodes = (int)n;
  }
  PyObject* ids = NULL;
  const char** cids = NULL;
  if (bus_ids != Py_None) {
    ids = PySequence_Tuple(bus_ids);
    if (!ids) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(ids);
    cids = PyMem_Calloc((size_t)(n ? n : 1), sizeof *cids);
    if (!cids) {
      Py_DECREF(ids);
      PyMem_Free(nodes);
      return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++)
      if (!(cids[i] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(ids, i)))) {
        PyMem_Free(cids);
        Py_DECREF(ids);
        PyMem_Free(nodes);
        return NULL;
      }
    spec.gpu_bus_ids = cids;
    spec.ngpu_bus_ids = (int)n;
  }
  PyObject* result = NULL;
  tl_topo_t* t = tl_py_load_topology(module, xml, synthetic);
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
      tl_py_raise(get_state(module), err, detail);
    } else {
      PlanObject* self = (PlanObject*)type->tp_alloc(type, 0);
      if (self) self->plan = plan;
      else tl_plan_close(plan);
      result = (PyObject*)self;
    }
  }
  PyMem_Free(cids);
  PyMem_Free(nodes);
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

static PyObject* plan_find(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"role", "gpu", "rank", NULL};
  PyObject *role, *gpu = Py_None;
  int rank = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Oi:find", kwlist, &role, &gpu, &rank)) return NULL;
  tl_role_t r;
  int g, id;
  if (tl_py_parse_role(role, &r) < 0 || parse_gpu(gpu, &g) < 0) return NULL;
  int err = tl_plan_find(((PlanObject*)op)->plan, r, g, rank, &id);
  return err ? tl_py_fail_obj(op, err) : PyLong_FromLong(id);
}

static PyObject* plan_claim(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"role", "gpu", NULL};
  PyObject *role, *gpu = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:claim", kwlist, &role, &gpu)) return NULL;
  tl_role_t r;
  int g, id, wrapped;
  if (tl_py_parse_role(role, &r) < 0 || parse_gpu(gpu, &g) < 0) return NULL;
  int err = tl_plan_claim(((PlanObject*)op)->plan, r, g, &id, &wrapped);
  return err ? tl_py_fail_obj(op, err) : Py_BuildValue("(iO)", id, wrapped ? Py_True : Py_False);
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
    return module ? tl_py_raise(get_state(module), err, detail) : NULL;
  }
  PyObject* refused = r.refused[0] ? PyUnicode_FromString(r.refused) : Py_NewRef(Py_None);
  if (!refused) return NULL;
  return Py_BuildValue("{s:s,s:i,s:N}", "cpus", r.cpus, "numa_node", r.numa_node, "refused", refused);
}

static PyObject* plan_str(PyObject* op) {
  tl_plan_t* plan = ((PlanObject*)op)->plan;
  int need = tl_plan_format(plan, NULL, 0);
  if (need < 0) return tl_py_fail_obj(op, need);
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
                       "io_threads=1, main_thread=True, cpus=None, gpu_bus_ids=None, "
                       "device_nodes=None): which core each thread runs on, and why (device_nodes: "
                       "plan for devices the topology does not show, such as sim devices, given "
                       "the NUMA node of each). str(plan) explains it."},
    {Py_tp_new, (void*)(uintptr_t)plan_new},
    {Py_tp_dealloc, (void*)(uintptr_t)plan_dealloc},
    {Py_tp_str, (void*)(uintptr_t)plan_str},
    {Py_tp_methods, plan_methods},
    {Py_tp_getset, plan_getset},
    {Py_sq_length, (void*)(uintptr_t)plan_len},
    {Py_mp_length, (void*)(uintptr_t)plan_len},
    {0, NULL},
};

PyType_Spec tl_py_plan_spec = {
    .name = "threadloom._core.Plan",
    .basicsize = sizeof(PlanObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = plan_type_slots,
};

// ---------------------------------------------------------------------------------------------
// Affinity of the calling thread
// ---------------------------------------------------------------------------------------------

PyObject* tl_py_pin_current(PyObject* module, PyObject* unused) {
  (void)unused;
  char buf[1024];
  int err = tl_pin_current(buf, sizeof buf);
  return err ? tl_py_fail(module, err) : PyUnicode_FromString(buf);
}

PyObject* tl_py_pin_set(PyObject* module, PyObject* args) {
  const char* cpus;
  int node = -1;
  if (!PyArg_ParseTuple(args, "s|i:pin_set", &cpus, &node)) return NULL;
  int err = tl_pin_set(cpus, node);
  if (err) return tl_py_fail(module, err);
  Py_RETURN_NONE;
}

tl_plan_t* tl_py_plan_get(PyObject* op) {
  PyObject* module = PyType_GetModule(Py_TYPE(op));
  if (!module) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "expected a threadloom Plan, not %T", op);
    return NULL;
  }
  if (!PyObject_TypeCheck(op, (PyTypeObject*)get_state(module)->plan_type)) {
    PyErr_Format(PyExc_TypeError, "expected a threadloom Plan, not %T", op);
    return NULL;
  }
  return ((PlanObject*)op)->plan;
}
