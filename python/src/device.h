/* python/src/device.h: what device.c (Device, Event, DeviceBuffer, selection) and
 * device_stream.c (Stream, copies, staging, DLPack import) share. Not installed. */
#ifndef THREADLOOM_PY_DEVICE_H
#define THREADLOOM_PY_DEVICE_H

#include <stdatomic.h>

#include "core.h"

typedef struct {
  PyObject_HEAD
  tl_device_t* dev;      /* the library's; lives for the process */
  tl_device_props_t props; /* a copy (they never change) */
} DeviceObject;

typedef struct {
  PyObject_HEAD
  PyObject* device;      /* strong: the Device */
  tl_event_t* e;         /* owned */
} EventObject;

typedef struct tl_py_pending_s tl_py_pending_t;

typedef struct {
  PyObject_HEAD
  PyObject* device;      /* strong */
  tl_stream_t* s;        /* from the calling thread's pool; released at dealloc */
  tl_py_pending_t* pending; /* host buffers of copies in flight, oldest first (the object's
                               critical section) */
  tl_py_pending_t* pending_tail;
} StreamObject;

typedef struct {
  PyObject_HEAD
  PyObject* device;      /* strong: the Device */
  tl_dbuf_t* b;          /* owned block (NULL for views and imports, and once freed) */
  PyObject* base;        /* strong: the buffer a view is of, or the object an import keeps */
  PyObject* capsule;     /* an imported tensor's capsule (unconsumed: frees it when dropped) */
  _Atomic(void*) ptr;    /* device address; NULL once freed */
  Py_ssize_t nbytes;
  _Atomic long exports;  /* live DLPack exports and views: free() refuses while > 0 */
  char format[2];        /* its elements' struct-module format ("B": bytes; cast() sets it) and
                            their DLPack type (code, bits), set before the object is shared */
  unsigned char dt_code, dt_bits;
} DeviceBufferObject;

/* Detail text is per thread and overwritten by the next call: copy it at once. */
#define TL_DETAIL_COPY(buf) char buf[512]; snprintf(buf, sizeof buf, "%s", tl_err_detail())

/* The module state of an object of these types or of a Python subclass. */
core_state* tl_pydev_state(PyObject* self);
/* Raise the exception of a failed tl_* call (with the calling thread's detail, or `detail`). */
PyObject* tl_pydev_fail(PyObject* self, int err);
PyObject* tl_pydev_fail_detail(PyObject* self, int err, const char* detail);
/* None -> -1, seconds >= 0 -> ms; -2 with an exception. */
int tl_pydev_timeout_ms(PyObject* t);
/* Parses (timeout=None) with `fmt` ("|O:name") into *ms. 0 or -1. */
int tl_pydev_timeout_arg(PyObject* args, PyObject* kwargs, const char* fmt, int* ms);
/* The C object of a Device / Stream / Event argument, or NULL with TypeError. */
tl_device_t* tl_pydev_device_of(core_state* st, PyObject* o);
tl_stream_t* tl_pydev_stream_of(core_state* st, PyObject* o);
/* A new Device object for d (the library's device). */
PyObject* tl_pydev_device_wrap(core_state* st, tl_device_t* d);
/* A new, untracked DeviceBuffer of `device` with nothing in it (the caller fills and tracks). */
DeviceBufferObject* tl_pydev_dbuf_new(core_state* st, PyObject* device);
/* The block a buffer or the buffer it views owns; NULL for imports. */
tl_dbuf_t* tl_pydev_dbuf_root(DeviceBufferObject* b);

#endif /* THREADLOOM_PY_DEVICE_H */
