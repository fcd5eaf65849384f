/* python/src/pool.c: threadloom._core.Pool, the C scheduler's pool running Python callables.
 *
 * Each worker thread attaches to the interpreter once (PyGILState_Ensure in on_start, which
 * creates its PyThreadState), detaches, and then for every task re-attaches with that same
 * thread state, calls the callable, and detaches again: no thread state is created per task.
 * On free-threaded builds attached workers run Python in parallel.
 *
 * Every task is a heap `tl_py_task_t` owning strong references to its callable and its optional
 * cancel callable; the scheduler calls exactly one of task_run or task_cancel for each accepted
 * task, and either one frees it. Calls that may block (a full injection queue, joining the
 * workers at close) detach from the interpreter first, so a blocked submitter never stops other
 * threads or the garbage collector.
 *
 * Thread-safety: submit/try_submit/stats/size may be called from any thread at once; close is
 * idempotent, serialised by close_mu (a second caller waits until the workers are joined).
 * Close protocol (the C pool's memory is freed by tl_pool_close, so no submit may be inside it
 * then): a submit counts itself in `users` before it reads `closing`; close sets `closing`,
 * makes the C pool refuse other threads (tl_pool_stop_accepting, which also wakes submits
 * blocked on a full queue), waits until `users` drains, and only then calls tl_pool_close. The
 * pool's own workers may keep submitting while it drains (their tasks' follow-up work), safe
 * because tl_pool_close frees the pool only after joining them. `pool` is set to NULL under
 * close_mu once closed. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "core.h"

typedef struct {
  PyObject_HEAD
  tl_pool_t* pool;           /* owned; NULL once closed */
  PyObject* on_start;        /* callable(worker_index) run on each worker at start, or NULL */
  PyObject* plan;            /* the Plan the workers were pinned by (kept alive), or NULL */
  PyInterpreterState* interp; /* the interpreter the workers attach to */
  _Atomic int closing;       /* set by the first close; submits from non-workers then fail */
  _Atomic long users;        /* submit calls between their check of `closing` and their return:
                                close waits for them before tl_pool_close frees the pool */
  pthread_mutex_t close_mu;  /* held (detached) across tl_pool_close: a second close waits for
                                the first to finish joining, then returns */
} PoolObject;

typedef struct {
  PyObject* fn;     /* strong: called on a worker */
  PyObject* cancel; /* strong or NULL: called instead when the task is canceled */
} tl_py_task_t;

/* The thread state of the calling pool worker (set in on_start, cleared in on_stop). A
 * thread-local, so it is per worker thread and never shared. */
static _Thread_local PyThreadState* tl_py_worker_ts;
static _Thread_local PyGILState_STATE tl_py_worker_gil;

// ---------------------------------------------------------------------------------------------
// Worker hooks and task trampolines (run on pool threads, detached on entry and exit)
// ---------------------------------------------------------------------------------------------

static void pool_on_start(void* ud, int worker) {
  PoolObject* self = ud;
  tl_py_worker_gil = PyGILState_Ensure();
  if (self->on_start) {
    PyObject* r = PyObject_CallFunction(self->on_start, "i", worker);
    if (!r) PyErr_WriteUnraisable(self->on_start);
    Py_XDECREF(r);
  }
  tl_py_worker_ts = PyEval_SaveThread();
}

/* Ends the worker's thread state as CPython ends a threading.Thread's: cleared while its
 * PyGILState counter is still 1, then deleted. PyGILState_Release would drop the counter to 0
 * first and clear afterwards, and objects freed by the clear (the thread's threading.local
 * values: a loader worker's dataset replica) may run code that takes the GIL through
 * PyGILState_Ensure/Release (pybind11's gil_scoped_acquire in torch's tensor dealloc): that
 * inner Release would see 0 again and delete the thread state under the outer one, which then
 * deletes it a second time (a segfault in _PyThreadState_DeleteCurrent: 3.11 + torch 2.12). */
static void pool_on_stop(void* ud, int worker) {
  (void)ud;
  (void)worker;
  PyEval_RestoreThread(tl_py_worker_ts);
  tl_py_worker_ts = NULL;
  if (tl_py_worker_gil != PyGILState_UNLOCKED) {
    /* on_start found a thread state already there (never, on a thread the pool created): not
     * ours to delete */
    PyGILState_Release(tl_py_worker_gil);
    return;
  }
  PyThreadState_Clear(PyThreadState_Get());
  PyThreadState_DeleteCurrent();
}

static void task_free(tl_py_task_t* t) {
  Py_DECREF(t->fn);
  Py_XDECREF(t->cancel);
  PyMem_RawFree(t);
}

/* Attaches the calling thread: a worker re-attaches its own thread state; any other thread (the
 * one closing the pool may cancel queued tasks itself) goes through PyGILState. */
static PyGILState_STATE attach(void) {
  if (tl_py_worker_ts) {
    PyEval_RestoreThread(tl_py_worker_ts);
    return PyGILState_UNLOCKED; /* unused for workers */
  }
  return PyGILState_Ensure();
}

static void detach(PyGILState_STATE g) {
  if (tl_py_worker_ts) PyEval_SaveThread();
  else PyGILState_Release(g);
}

static void task_run(void* arg) {
  tl_py_task_t* t = arg;
  PyGILState_STATE g = attach();
  PyObject* r = PyObject_CallNoArgs(t->fn);
  /* The Python layer catches everything a user callable raises; what reaches here is a bug
   * (or KeyboardInterrupt/SystemExit raised inside a worker), reported, never silently lost. */
  if (!r) PyErr_WriteUnraisable(t->fn);
  Py_XDECREF(r);
  task_free(t);
  detach(g);
}

static void task_cancel(void* arg) {
  tl_py_task_t* t = arg;
  PyGILState_STATE g = attach();
  if (t->cancel) {
    PyObject* r = PyObject_CallNoArgs(t->cancel);
    if (!r) PyErr_WriteUnraisable(t->cancel);
    Py_XDECREF(r);
  }
  task_free(t);
  detach(g);
}

// ---------------------------------------------------------------------------------------------
// Pool type
// ---------------------------------------------------------------------------------------------

static PyObject* pool_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"workers", "plan", "role", "gpu", "capacity", "name", "on_start", NULL};
  int workers = 0;
  PyObject *plan = Py_None, *role = NULL, *gpu = Py_None, *on_start = Py_None;
  Py_ssize_t capacity = 1024;
  const char* name = "threadloom";
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|i$OOOnsO:Pool", kwlist, &workers, &plan, &role,
                                   &gpu, &capacity, &name, &on_start))
    return NULL;
  if (workers < 0) return PyErr_Format(PyExc_ValueError, "workers must be >= 0 (0: one per core), not %d", workers);
  if (capacity < 1) return PyErr_Format(PyExc_ValueError, "capacity must be >= 1, not %zd", capacity);
  if (on_start != Py_None && !PyCallable_Check(on_start))
    return PyErr_Format(PyExc_TypeError, "on_start must be callable, not %T", on_start);
  tl_pool_options_t o;
  tl_pool_options_default(&o);
  o.workers = workers;
  o.inject_capacity = (size_t)capacity;
  o.name = name;
  o.on_start = pool_on_start;
  o.on_stop = pool_on_stop;
  if (plan != Py_None) {
    if (!(o.plan = tl_py_plan_get(plan))) return NULL;
    o.role = TL_ROLE_LOADER;
    if (role && tl_py_parse_role(role, &o.role) < 0) return NULL;
    o.gpu = -1;
    if (gpu != Py_None) {
      long g = PyLong_AsLong(gpu);
      if (g == -1 && PyErr_Occurred()) return NULL;
      o.gpu = (int)g;
    }
  }
  PoolObject* self = (PoolObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->on_start = on_start != Py_None ? Py_NewRef(on_start) : NULL;
  self->plan = plan != Py_None ? Py_NewRef(plan) : NULL;
  self->interp = PyInterpreterState_Get();
  atomic_init(&self->closing, 0);
  atomic_init(&self->users, 0);
  pthread_mutex_init(&self->close_mu, NULL);
  o.ud = self;
  int err;
  char detail[512] = "";
  Py_BEGIN_ALLOW_THREADS
  err = tl_pool_init(&self->pool, &o);
  if (err) snprintf(detail, sizeof detail, "%s", tl_err_detail());
  Py_END_ALLOW_THREADS
  if (err) {
    self->pool = NULL;
    atomic_store(&self->closing, 1);
    Py_DECREF(self);
    PyObject* module = PyType_GetModule(type);
    return module ? tl_py_raise(get_state(module), err, detail) : NULL;
  }
  return (PyObject*)self;
}

/* Closes the pool (joins its workers) with the interpreter detached. Returns 0 or a TL_E*
 * (TL_EBUSY from one of the pool's own workers, which cannot join itself). */
static int pool_close_impl(PoolObject* self, int cancel) {
  tl_pool_t* pool = self->pool;
  if (pool && tl_pool_worker_index(pool) >= 0) return TL_EBUSY;
  int err = 0;
  Py_BEGIN_ALLOW_THREADS
  pthread_mutex_lock(&self->close_mu);
  atomic_store(&self->closing, 1);
  if (self->pool) {
    tl_pool_stop_accepting(self->pool);
    while (atomic_load(&self->users) > 0) sched_yield(); /* they return promptly: refused */
    err = tl_pool_close(self->pool, cancel);
    if (!err) self->pool = NULL;
  }
  pthread_mutex_unlock(&self->close_mu);
  Py_END_ALLOW_THREADS
  return err;
}

static int pool_traverse(PyObject* op, visitproc visit, void* arg) {
  PoolObject* self = (PoolObject*)op;
  Py_VISIT(Py_TYPE(op));
  Py_VISIT(self->on_start);
  Py_VISIT(self->plan);
  return 0;
}

static void pool_dealloc(PyObject* op) {
  PoolObject* self = (PoolObject*)op;
  PyTypeObject* tp = Py_TYPE(op);
  PyObject_GC_UnTrack(op);
  /* Normally closed by its owner (Executor.shutdown, the atexit hook). A pool dropped while
   * open is closed here, canceling what is queued; from one of its own workers that cannot
   * join, so the pool is leaked with a warning rather than deadlocking. */
  if (self->pool) {
    if (pool_close_impl(self, 1) == TL_EBUSY)
      PyErr_WarnEx(PyExc_ResourceWarning, "threadloom Pool dropped by one of its own workers: "
                   "its threads are left running; shut pools down explicitly", 1);
  }
  Py_CLEAR(self->on_start);
  Py_CLEAR(self->plan);
  if (!self->pool) pthread_mutex_destroy(&self->close_mu);
  tp->tp_free(op);
  Py_DECREF(tp);
}

static int make_task(PyObject* fn, PyObject* cancel, tl_py_task_t** out) {
  if (!PyCallable_Check(fn)) {
    PyErr_Format(PyExc_TypeError, "the task must be callable, not %T", fn);
    return -1;
  }
  if (cancel != Py_None && !PyCallable_Check(cancel)) {
    PyErr_Format(PyExc_TypeError, "cancel must be callable or None, not %T", cancel);
    return -1;
  }
  tl_py_task_t* t = PyMem_RawMalloc(sizeof *t);
  if (!t) {
    PyErr_NoMemory();
    return -1;
  }
  t->fn = Py_NewRef(fn);
  t->cancel = cancel != Py_None ? Py_NewRef(cancel) : NULL;
  *out = t;
  return 0;
}

static PyObject* pool_submit_impl(PyObject* op, PyObject* args, PyObject* kwargs, int try_only) {
  static char* kwlist[] = {"fn", "cancel", NULL};
  PyObject *fn, *cancel = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:submit", kwlist, &fn, &cancel)) return NULL;
  PoolObject* self = (PoolObject*)op;
  tl_py_task_t* t;
  if (make_task(fn, cancel, &t) < 0) return NULL;
  atomic_fetch_add(&self->users, 1);
  tl_pool_t* pool = self->pool; /* valid while we are counted in users, or are its worker */
  int err;
  if (!pool || (atomic_load(&self->closing) && tl_pool_worker_index(pool) < 0)) {
    err = TL_ECLOSED;
  } else if (try_only || tl_pool_worker_index(pool) >= 0) {
    /* never blocks: from a worker the task goes to the worker's own deque */
    err = try_only ? tl_pool_try_submit(pool, NULL, task_run, task_cancel, t)
                   : tl_pool_submit(pool, NULL, task_run, task_cancel, t);
  } else {
    Py_BEGIN_ALLOW_THREADS
    err = tl_pool_submit(pool, NULL, task_run, task_cancel, t);
    Py_END_ALLOW_THREADS
  }
  atomic_fetch_sub(&self->users, 1);
  if (err) {
    task_free(t); /* not accepted: neither callback will run */
    if (try_only && err == TL_EAGAIN) Py_RETURN_FALSE;
    return tl_py_fail_obj(op, err);
  }
  Py_RETURN_TRUE;
}

static PyObject* pool_submit(PyObject* op, PyObject* args, PyObject* kwargs) {
  return pool_submit_impl(op, args, kwargs, 0);
}

static PyObject* pool_try_submit(PyObject* op, PyObject* args, PyObject* kwargs) {
  return pool_submit_impl(op, args, kwargs, 1);
}

static PyObject* pool_close(PyObject* op, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"cancel", NULL};
  int cancel = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|p:close", kwlist, &cancel)) return NULL;
  int err = pool_close_impl((PoolObject*)op, cancel);
  if (err) return tl_py_fail_obj(op, err);
  Py_RETURN_NONE;
}

static PyObject* pool_stats(PyObject* op, PyObject* unused) {
  (void)unused;
  PoolObject* self = (PoolObject*)op;
  if (!self->pool) return tl_py_fail_obj(op, TL_ECLOSED);
  tl_pool_stats_t s;
  int err = tl_pool_stats(self->pool, &s);
  if (err) return tl_py_fail_obj(op, err);
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:i,s:s}", "executed", (unsigned long long)s.executed,
                       "canceled", (unsigned long long)s.canceled, "stolen",
                       (unsigned long long)s.stolen, "parked", (unsigned long long)s.parked,
                       "injected", (unsigned long long)s.injected, "pinned_workers",
                       s.pinned_workers, "pin_refused", s.pin_refused);
}

static PyObject* pool_worker_index(PyObject* op, PyObject* unused) {
  (void)unused;
  PoolObject* self = (PoolObject*)op;
  return PyLong_FromLong(self->pool ? tl_pool_worker_index(self->pool) : -1);
}

static PyObject* pool_get_size(PyObject* op, void* closure) {
  (void)closure;
  PoolObject* self = (PoolObject*)op;
  return PyLong_FromLong(self->pool ? tl_pool_size(self->pool) : 0);
}

static PyObject* pool_get_closed(PyObject* op, void* closure) {
  (void)closure;
  return PyBool_FromLong(atomic_load(&((PoolObject*)op)->closing));
}

static PyMethodDef pool_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))pool_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(fn, cancel=None) -> True: runs fn() on a worker, or cancel() instead if the task is "
     "canceled at close. Blocks (detached) while the injection queue is full. Raises ClosedError "
     "after close()."},
    {"try_submit", (PyCFunction)(void (*)(void))pool_try_submit, METH_VARARGS | METH_KEYWORDS,
     "try_submit(fn, cancel=None) -> bool: like submit, but False instead of waiting when full."},
    {"close", (PyCFunction)(void (*)(void))pool_close, METH_VARARGS | METH_KEYWORDS,
     "close(cancel=False): stop accepting, run (or cancel) what is queued, join every worker. "
     "Idempotent. Raises BusyError from one of the pool's own workers."},
    {"stats", pool_stats, METH_NOARGS, "Counters: executed, canceled, stolen, parked, injected, pinned_workers, pin_refused."},
    {"worker_index", pool_worker_index, METH_NOARGS, "Index of the calling worker, -1 if not one of this pool's."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"size", pool_get_size, NULL, "number of worker threads", NULL},
    {"closed", pool_get_closed, NULL, "True once close() has begun", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot pool_type_slots[] = {
    {Py_tp_doc, (void*)"Pool(workers=0, *, plan=None, role='loader', gpu=None, capacity=1024, "
                       "name='threadloom', on_start=None): worker threads of the C scheduler, "
                       "pinned to the plan's slots of (role, gpu) when a plan is given."},
    {Py_tp_new, (void*)(uintptr_t)pool_new},
    {Py_tp_dealloc, (void*)(uintptr_t)pool_dealloc},
    {Py_tp_traverse, (void*)(uintptr_t)pool_traverse},
    {Py_tp_methods, pool_methods},
    {Py_tp_getset, pool_getset},
    {0, NULL},
};

PyType_Spec tl_py_pool_spec = {
    .name = "threadloom._core.Pool",
    .basicsize = sizeof(PoolObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = pool_type_slots,
};
