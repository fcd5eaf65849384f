/* python/src/core.h: what the extension's files share: the module state and the helpers that
 * turn TL_E* codes into Python exceptions. Not installed. */
#ifndef THREADLOOM_PY_CORE_H
#define THREADLOOM_PY_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "threadloom/threadloom.h"

#define TL_NCODES (-TL_ERRNO_MAX)

/* Critical sections exist from 3.13; on older interpreters (all with the GIL) the GIL already
 * serialises what they guard. */
#ifndef Py_BEGIN_CRITICAL_SECTION
#define Py_BEGIN_CRITICAL_SECTION(op) {
#define Py_END_CRITICAL_SECTION() }
#endif

/* Py_T_INT and Py_READONLY are the 3.12 names of structmember.h's T_INT and READONLY. */
#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_INT T_INT
#define Py_READONLY READONLY
#endif

/* PyMutex exists from 3.13. Before, a pthread mutex stands in (zero bytes are an unlocked
 * mutex on glibc, as for PyMutex); like PyMutex_Lock, waiting detaches from the interpreter,
 * so a thread that holds the lock while detached can always get the GIL back. */
#if PY_VERSION_HEX < 0x030D0000
#include <pthread.h>
typedef pthread_mutex_t PyMutex;
static inline void tl_py_mutex_lock(pthread_mutex_t* m) {
  if (pthread_mutex_trylock(m) == 0) return;
  Py_BEGIN_ALLOW_THREADS
  pthread_mutex_lock(m);
  Py_END_ALLOW_THREADS
}
#define PyMutex_Lock(m) tl_py_mutex_lock(m)
#define PyMutex_Unlock(m) pthread_mutex_unlock(m)

static inline int PyObject_HasAttrStringWithError(PyObject* o, const char* name) {
  PyObject* r = PyObject_GetAttrString(o, name);
  if (r) {
    Py_DECREF(r);
    return 1;
  }
  if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
  PyErr_Clear();
  return 0;
}
#endif

/* 3.12's single-object error API, for 3.11. */
#if PY_VERSION_HEX < 0x030C0000
static inline PyObject* PyErr_GetRaisedException(void) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (!type) return NULL;
  PyErr_NormalizeException(&type, &value, &tb);
  if (tb) PyException_SetTraceback(value, tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  return value;
}
static inline void PyErr_SetRaisedException(PyObject* exc) {
  if (!exc) {
    PyErr_Clear();
    return;
  }
  PyErr_Restore(Py_NewRef((PyObject*)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
}
#endif

typedef struct {
  PyObject* plan_type;           /* threadloom._core.Plan */
  PyObject* pool_type;           /* threadloom._core.Pool */
  PyObject* arena_type;          /* threadloom._core.Arena */
  PyObject* buffer_type;         /* threadloom._core.Buffer */
  PyObject* hasher_type;         /* threadloom._core.Hasher */
  PyObject* wfile_type;          /* threadloom._core.WFile */
  PyObject* copyplan_type;       /* threadloom._core.CopyPlan */
  PyObject* dlpack_tensor_type;  /* threadloom._core.DLPackTensor */
  PyObject* ncclcomm_type;       /* threadloom._core.NcclComm */
  PyObject* refprobe_type;       /* threadloom._core.RefProbe */
  PyObject* sharewalk_type;      /* threadloom._core.ShareWalk */
  const char* share_refusal;     /* why share() refuses on this interpreter; NULL: it works */
  destructor py_class_dealloc;   /* tp_dealloc of a class statement's class (subtype_dealloc) */
  PyObject* device_type;         /* threadloom._core.Device */
  PyObject* stream_type;         /* threadloom._core.Stream */
  PyObject* event_type;          /* threadloom._core.Event */
  PyObject* dbuf_type;           /* threadloom._core.DeviceBuffer */
  PyObject* staging_type;        /* threadloom._core.StagingPool */
  PyObject* slot_type;           /* threadloom._core.StagingSlot */
  PyObject* error;               /* threadloom.Error: the base of every class below */
  PyObject* by_code[TL_NCODES];  /* by_code[-code]: the class for that TL_E* code */
} core_state;

static inline core_state* get_state(PyObject* module) {
  return (core_state*)PyModule_GetState(module);
}

/* The module definition (_core.c), for PyType_GetModuleByDef. */
extern struct PyModuleDef tl_py_core_def;

/* Sets the Python exception for a failed tl_* call and returns NULL. `detail` is the copy of
 * tl_err_detail() taken right after the call, on the same thread. */
PyObject* tl_py_raise(core_state* st, int err, const char* detail);
/* tl_py_raise with the calling thread's current tl_err_detail(). */
PyObject* tl_py_fail(PyObject* module, int err);
/* tl_py_fail for a method of an object of one of this extension's heap types (or of a Python
 * subclass of one). */
PyObject* tl_py_fail_obj(PyObject* self, int err);
/* The _core module an object of one of this extension's types (or of a subclass) belongs to:
 * borrowed; NULL with TypeError for a foreign object. */
PyObject* tl_py_module_of(PyObject* self);
/* Loads a topology from this machine, an XML file or a synthetic description (None for the
 * ones not given); on failure sets the exception and returns NULL. Caller closes the result. */
tl_topo_t* tl_py_load_topology(PyObject* module, PyObject* xml, PyObject* synthetic);

/* plan.c */
extern PyType_Spec tl_py_plan_spec;
tl_plan_t* tl_py_plan_get(PyObject* plan); /* borrowed; NULL + TypeError if not a Plan */
/* "loader" -> TL_ROLE_LOADER; ValueError naming the roles otherwise. */
int tl_py_parse_role(PyObject* role, tl_role_t* out);
PyObject* tl_py_pin_current(PyObject* module, PyObject* unused);
PyObject* tl_py_pin_set(PyObject* module, PyObject* args);

/* pool.c */
extern PyType_Spec tl_py_pool_spec;

/* arena.c */
extern PyType_Spec tl_py_arena_spec;
extern PyType_Spec tl_py_buffer_spec;

/* dlpack.c */
extern PyType_Spec tl_py_dlpack_tensor_spec;
/* Wraps [data, data + nbytes) as a 1-D uint8 kDLCPU DLPack capsule ("dltensor_versioned" if
 * versioned, else "dltensor"). The managed tensor holds a strong reference to owner; its
 * deleter (from any thread) calls done(owner), attached, then drops it. On failure returns NULL
 * with the exception set, having called done(owner). */
PyObject* tl_py_dlpack_export_bytes(PyObject* owner, void* data, Py_ssize_t nbytes, int versioned,
                                    int readonly, void (*done)(PyObject* owner));
/* The same for any DLPack device (kDLCUDA = 2 with the CUDA ordinal, kDLCPU = 1 with 0) and
 * element type (DLPack's type code and bits: kDLUInt and 8 for bytes; nbytes a multiple of
 * bits / 8): a 1-D tensor of nbytes / (bits / 8) elements. */
PyObject* tl_py_dlpack_export_on(PyObject* owner, void* data, Py_ssize_t nbytes, int versioned,
                                 int readonly, void (*done)(PyObject* owner), int device_type,
                                 int device_id, int dtype_code, int dtype_bits);
/* The DLPack element type of a struct-module format of one character ('f': kDLFloat, 32), or
 * -1 with ValueError naming the formats that have one. */
int tl_py_format_dtype(const char* fmt, int* code, int* bits);
/* obj.__dlpack__(stream=stream, max_version=(1, 0)) (stream left out when NULL), retried
 * without max_version for older producers; the capsule (checked to be one) or NULL. */
PyObject* tl_py_dlpack_call(PyObject* obj, PyObject* stream);
/* Checks __dlpack__'s keywords for a host producer (BufferError for a stream, a dl_device other
 * than (1, 0), copy=True) and sets *versioned from max_version. 0 or -1. */
int tl_py_dlpack_check_args(PyObject* stream, PyObject* max_version, PyObject* dl_device,
                            PyObject* copy, int* versioned);
/* from_dlpack(obj) -> memoryview over a consumed host tensor. */
PyObject* tl_py_from_dlpack(PyObject* module, PyObject* obj);
/* A CUDA tensor borrowed for one NCCL call: the capsule is kept, not consumed, so releasing it
 * (its destructor) frees the producer's managed tensor; the producer's own tensor object keeps
 * the memory alive after that. */
typedef struct {
  PyObject* capsule;  /* strong; NULL once released */
  void* data;         /* device address of the first element */
  tl_dtype_t dtype;   /* DLPack's DLDataType */
  int64_t count;      /* elements */
  int readonly;       /* the producer set DLPACK_FLAG_BITMASK_READ_ONLY */
} tl_py_cuda_tensor_t;
/* 0 if obj.__dlpack_device__() is (kDLCUDA, device); else -1 with TypeError (no DLPack) or
 * InvalidArgumentError saying to move the tensor or use CpuComm (host) / naming the device
 * mismatch. `what` ("NcclComm.allreduce") starts the messages. Calls no __dlpack__. */
int tl_py_dlpack_cuda_device(PyObject* module, PyObject* obj, const char* what, int device);
/* obj.__dlpack__(stream=...) for the CUDA stream handle `stream` (0: the legacy default stream,
 * passed to DLPack as 1), then checks the tensor (cuda:device, compact row-major). 0 or -1. */
int tl_py_dlpack_cuda_borrow(PyObject* module, PyObject* obj, unsigned long long stream,
                             int device, const char* what, tl_py_cuda_tensor_t* out);
void tl_py_dlpack_cuda_release(tl_py_cuda_tensor_t* t);

/* hash.c */
extern PyType_Spec tl_py_hasher_spec;
/* xxh3_64(data, seed=0, *, impl=None) -> int */
PyObject* tl_py_xxh3_64(PyObject* module, PyObject* args, PyObject* kwargs);

/* wfile.c */
extern PyType_Spec tl_py_wfile_spec;
/* copyplan.c */
extern PyType_Spec tl_py_copyplan_spec;

/* share.c */
extern PyType_Spec tl_py_refprobe_spec;
extern PyType_Spec tl_py_sharewalk_spec;
/* Checks this interpreter's object header once, at exec: sets share_refusal and
 * py_class_dealloc. Never fails. */
void tl_py_share_init(core_state* st);
/* share_code(code) -> int: the constants below a code object made immortal */
PyObject* tl_py_share_code(PyObject* module, PyObject* code);
/* share_layout() -> (ok, how or why not) */
PyObject* tl_py_share_layout(PyObject* module, PyObject* unused);

/* cluster.c */
/* hostlist_expand(list) -> list of str */
PyObject* tl_py_hostlist_expand(PyObject* module, PyObject* arg);
/* signal_ignore(signum) -> None: SIG_IGN, from any thread */
PyObject* tl_py_signal_ignore(PyObject* module, PyObject* arg);
/* preempt_notice(signum) -> None: a handler that writes one line and ignores the signal */
PyObject* tl_py_preempt_notice(PyObject* module, PyObject* arg);

/* nccl.c */
extern PyType_Spec tl_py_ncclcomm_spec;
/* nccl_unique_id() -> bytes (128) */
PyObject* tl_py_nccl_unique_id(PyObject* module, PyObject* unused);
/* _nccl_comm_closed(nranks, rank, device, type=NcclComm) -> a closed NcclComm (tests) */
PyObject* tl_py_nccl_comm_closed(PyObject* module, PyObject* args);

/* device.c, device_stream.c */
extern PyType_Spec tl_py_device_spec;
extern PyType_Spec tl_py_stream_spec;
extern PyType_Spec tl_py_event_spec;
extern PyType_Spec tl_py_dbuf_spec;
extern PyType_Spec tl_py_staging_spec;
extern PyType_Spec tl_py_slot_spec;
/* devices_select(spec), devices_backend() -> dict, device_count(kind=None), device(kind, i),
 * import_dlpack(obj, stream) */
PyObject* tl_py_devices_select(PyObject* module, PyObject* arg);
PyObject* tl_py_devices_backend(PyObject* module, PyObject* unused);
PyObject* tl_py_sim_configure(PyObject* module, PyObject* arg);
PyObject* tl_py_device_count(PyObject* module, PyObject* args);
PyObject* tl_py_device_get(PyObject* module, PyObject* args);
PyObject* tl_py_device_import(PyObject* module, PyObject* args, PyObject* kwargs);
PyObject* tl_py_sim_import(PyObject* module, PyObject* obj);

#endif /* THREADLOOM_PY_CORE_H */
