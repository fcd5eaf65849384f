/* gil_needing: a test extension that does NOT declare Py_mod_gil, the way most extensions
 * written before free-threading look. Importing it into a free-threaded CPython turns the GIL
 * on for the whole process; the GIL guard tests (tests/python/test_interp.py) use it. Built by
 * CMake into <build>/tests/python-ext/, never installed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject* gil_needing_answer(PyObject* self, PyObject* unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(42);
}

static PyMethodDef gil_needing_methods[] = {
    {"answer", gil_needing_answer, METH_NOARGS, "Returns 42."},
    {NULL, NULL, 0, NULL},
};

/* Multi-phase init with no slots at all: in particular no Py_mod_gil. */
static struct PyModuleDef gil_needing_module = {
    PyModuleDef_HEAD_INIT, "gil_needing", "A module without Py_mod_gil (for tests).", 0,
    gil_needing_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_gil_needing(void) { return PyModuleDef_Init(&gil_needing_module); }
