/* python/src/cluster.c: the cluster part's C calls for threadloom.cluster.
 *
 * _core.hostlist_expand(list) -> list of str, over tl_hostlist_expand. The expansion holds no
 * shared state, so concurrent calls need no locking; it does not detach from the interpreter
 * (a list of the size SLURM hands out expands in microseconds, and the largest legal one,
 * 1<<20 names, must be turned into Python strings attached anyway).
 *
 * _core.signal_ignore(signum) and _core.preempt_notice(signum): signal dispositions for the
 * preemption path, settable from any thread (see the section below). */
#include "core.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

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

// ---------------------------------------------------------------------------------------------
// Preemption signals (threadloom.cluster.preempt and .launch)
// ---------------------------------------------------------------------------------------------

/* Why in C: Python's signal.signal() works on the main thread only, and a Python handler runs
 * only when the main thread next runs bytecode (a main thread blocked in a lock may never).
 * The preemption path must ignore SIGTERM from whichever thread does the work, and the
 * launcher's notice must be written the moment the signal arrives. Both install plain
 * sigaction() dispositions, which Python's signal module does not know about:
 * signal.getsignal() keeps reporting what Python last set, and interpreter finalization
 * leaves them in place (it resets only the signals whose handler was a Python function). No
 * state is kept: the handler formats its line from the signal number alone. */

/* The name after "SIG" of the signals a job may be asked to catch, or NULL. */
static const char* tl__signal_name(int signum) {
  switch (signum) {
    case SIGHUP: return "HUP";
    case SIGINT: return "INT";
    case SIGQUIT: return "QUIT";
    case SIGUSR1: return "USR1";
    case SIGUSR2: return "USR2";
    case SIGTERM: return "TERM";
    case SIGALRM: return "ALRM";
    case SIGCONT: return "CONT";
    case SIGURG: return "URG";
    case SIGXCPU: return "XCPU";
    case SIGWINCH: return "WINCH";
    case SIGPWR: return "PWR";
    default: return NULL;
  }
}

static size_t tl__append(char* buf, size_t at, size_t cap, const char* s) {
  size_t n = strlen(s);
  if (n > cap - at) n = cap - at;
  memcpy(buf + at, s, n);
  return at + n;
}

/* The handler preempt_notice() installs: one line on stderr, written with one write(2)
 * (async-signal-safe: strlen, memcpy and write only; errno is preserved). */
static void tl__preempt_notice_handler(int signum) {
  int saved = errno;
  char line[384];
  size_t n = tl__append(line, 0, sizeof line, "threadloom: ");
  const char* name = tl__signal_name(signum);
  if (name) {
    n = tl__append(line, n, sizeof line, "SIG");
    n = tl__append(line, n, sizeof line, name);
  } else {
    char num[12];
    size_t k = sizeof num;
    num[--k] = '\0';
    int v = signum;
    do {
      num[--k] = (char)('0' + v % 10);
      v /= 10;
    } while (v > 0 && k > 0);
    n = tl__append(line, n, sizeof line, "signal ");
    n = tl__append(line, n, sizeof line, num + k);
  }
  n = tl__append(line, n, sizeof line,
                 " (the job's preemption warning) arrived, but the program did not call "
                 "threadloom.cluster.on_preempt(): ignored; no final checkpoint is taken and "
                 "the job ends at its time limit\n");
  ssize_t w = write(2, line, n);
  (void)w;
  errno = saved;
}

static int tl__check_signum(PyObject* module, PyObject* arg, int* signum) {
  long v = PyLong_AsLong(arg);
  if (v == -1 && PyErr_Occurred()) return -1;
  if (v < 1 || v >= NSIG || v == SIGKILL || v == SIGSTOP) {
    char detail[96];
    snprintf(detail, sizeof detail, "signal %ld cannot be caught or ignored (1..%d, not KILL or STOP)",
             v, NSIG - 1);
    tl_py_raise(get_state(module), TL_EINVAL, detail);
    return -1;
  }
  *signum = (int)v;
  return 0;
}

static PyObject* tl__set_disposition(PyObject* module, int signum, void (*handler)(int)) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART; /* the program's blocking calls go on as if nothing came */
  if (sigaction(signum, &sa, NULL) != 0) return tl_py_fail(module, tl_translate_sys_error(errno));
  Py_RETURN_NONE;
}

PyObject* tl_py_signal_ignore(PyObject* module, PyObject* arg) {
  int signum;
  if (tl__check_signum(module, arg, &signum) < 0) return NULL;
  return tl__set_disposition(module, signum, SIG_IGN);
}

PyObject* tl_py_preempt_notice(PyObject* module, PyObject* arg) {
  int signum;
  if (tl__check_signum(module, arg, &signum) < 0) return NULL;
  return tl__set_disposition(module, signum, tl__preempt_notice_handler);
}
