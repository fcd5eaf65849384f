/* python/src/cluster.c: the cluster part's C calls for threadloom.cluster.
 *
 * _core.hostlist_expand(list) -> list of str, over tl_hostlist_expand. The expansion holds no
 * shared state, so concurrent calls need no locking; it does not detach from the interpreter
 * (a list of the size SLURM hands out expands in microseconds, and the largest legal one,
 * 1<<20 names, must be turned into Python strings attached anyway). */
#include "core.h"

PyObject* tl_py_hostlist_expand(PyObject* module, PyObject* arg) {
  Py_ssize_t len;
  const char* list = PyUnicode_AsUTF8AndSize(arg, &len);
  if (!list) return NULL;
  if ((size_t)len != strlen(list)) {
    PyErr_SetString(PyExc_ValueError, "hostlist_expand: the host list contains a NUL character");
    return NULL;
  }
  char** hosts;
  size_t n;
  int err = tl_hostlist_expand(list, &hosts, &n);
  if (err) return tl_py_fail(module, err);
  PyObject* out = PyList_New((Py_ssize_t)n);
  for (size_t i = 0; out && i < n; i++) {
    PyObject* s = PyUnicode_DecodeUTF8(hosts[i], (Py_ssize_t)strlen(hosts[i]), "surrogateescape");
    if (!s) {
      Py_CLEAR(out);
      break;
    }
    PyList_SET_ITEM(out, (Py_ssize_t)i, s); /* steals s */
  }
  tl_hostlist_free(hosts, n);
  return out;
}
