/* interp/main.c: the `threadloom` launcher.
 *
 * A small C program that embeds the free-threaded libpython3.13t it was built against, so that
 * what must be settled before the first thread starts is settled before the interpreter
 * exists: the main thread is pinned to the placement plan's main slot (interp/pin.c),
 * os.cpu_count() and the OpenMP/BLAS thread counts are capped to the cores this process may
 * use, and the GIL guard (python/threadloom/gilguard.py) is installed before user code runs.
 *
 *   threadloom [OPTIONS] run [OPTIONS] [PYTHON-OPTIONS] (script.py | -m module | -c code) [ARGS]
 *   threadloom [OPTIONS] info [ARGS]      threadloom [OPTIONS] topo [ARGS]
 *   threadloom [OPTIONS] slurm script|submit [ARGS]
 *
 * `run` hands everything after the launcher's own options to CPython's command-line parser
 * (PyConfig.parse_argv) and runs it with Py_RunMain(), so sys.argv, sys.path[0], stdin/stdout,
 * exit codes, tracebacks, SystemExit, KeyboardInterrupt and signal handlers are exactly
 * python's. `info`, `topo` and `slurm` run the package's __main__ (python -m threadloom).
 *
 * Several nodes: `run --nnodes N --node-rank R --master HOST[:PORT]` (or a SLURM step over
 * several nodes, whose environment supplies them) meets the other nodes before user code runs
 * (python/threadloom/cluster/launch.py, launch()). The launcher checks the flags' syntax here;
 * their combination is checked by launch(), shared with `python -m threadloom run`. Under SLURM,
 * CUDA_VISIBLE_DEVICES is set from SLURM_STEP_GPUS/SLURM_JOB_GPUS when SLURM left it unset,
 * before the placement plan counts the GPUs and long before anything starts CUDA.
 *
 * Nothing of a checkout or a build tree is baked in: pip installs the launcher as the
 * `threadloom` script of the environment it installs threadloom into (docs/design.md,
 * "Installing"), so the interpreter is found next to it when it runs: python3.13t in the same
 * bin/ directory (a venv's, or a prefix's), else the interpreter it was built with
 * (TL_INTERP_PYTHON: `pip install --user` puts scripts in ~/.local/bin). sys.executable is
 * that python3.13t, so CPython finds the venv's site-packages as python would, and code that
 * re-runs sys.executable (multiprocessing's spawn, subprocess) gets a normal interpreter. The
 * package is found on that interpreter's sys.path (tl__startup_code). libpython is found
 * through the rpath (the interpreter's LIBDIR).
 *
 * mimalloc options: none are set. CPython's bundled mimalloc reads MIMALLOC_* from the
 * environment. On a threaded allocation benchmark (bench/bench_startup.py --alloc: 2 threads
 * building and dropping dicts of lists, medians of 7 runs on the 2-core VM) none moved the time
 * by more than the run-to-run spread: no option 1652 ms; MIMALLOC_ARENA_EAGER_COMMIT=1 +0.3%,
 * MIMALLOC_PURGE_DELAY=-1 -9.3% (spread 1320 ms), MIMALLOC_ALLOW_LARGE_OS_PAGES=1 +4.9%. So the
 * launcher sets none and leaves CPython's heaps as python would; re-measure on a quiet
 * many-core machine before adding one. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "interp/internal.h"
#include "threadloom/common.h"

#ifndef Py_GIL_DISABLED
#error "the threadloom launcher needs a free-threaded Python (3.13t): run scripts/bootstrap.sh"
#endif
#if !defined(TL_INTERP_PYTHON) || !defined(TL_INTERP_PYTHON_NAME)
#error "TL_INTERP_PYTHON (the interpreter built with) and TL_INTERP_PYTHON_NAME (python3.13t) must be defined by the build"
#endif

static const char tl__usage[] =
    "usage: threadloom [OPTIONS] run [OPTIONS] [PYTHON-OPTIONS] (script.py | -m module | -c code) [ARGS...]\n"
    "       threadloom [OPTIONS] info [--json]\n"
    "       threadloom [OPTIONS] topo [--plan] [--xml FILE] [...]   (threadloom topo --help)\n"
    "       threadloom [OPTIONS] slurm script|submit [OPTIONS] train.py [ARGS...]\n"
    "                                an sbatch script for one process per node (slurm script --help)\n"
    "\n"
    "Runs Python code on the free-threaded interpreter threadloom was built with, after pinning\n"
    "the main thread, capping os.cpu_count() and OMP/BLAS threads to the allowed cores, and with\n"
    "a guard against extensions that turn the GIL back on.\n"
    "\n"
    "options:\n"
    "  --gil=forbid|warn|allow  an extension without Py_mod_gil turned the GIL on: stop with a\n"
    "                           message naming it (forbid, the default for run), print one line\n"
    "                           naming it and go on (warn, the default for info/topo), or go on\n"
    "                           silently (allow)\n"
    "  --no-pin                 leave the main thread's CPU affinity and memory policy alone\n"
    "  --torchrun-env           set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,\n"
    "                           MASTER_ADDR, MASTER_PORT for one process on one node, where unset\n"
    "\n"
    "run on several nodes (one process per node; under a multi-node SLURM step these come from\n"
    "SLURM and may be left out; every node needs the same THREADLOOM_JOB_TOKEN):\n"
    "  --nnodes N               number of nodes\n"
    "  --node-rank R            this node's rank, 0..N-1 (node 0 runs the rendezvous store)\n"
    "  --master HOST[:PORT]     node 0's address, and torch.distributed's port there\n"
    "                           (MASTER_PORT, as torchrun's --master-port; default: a free one);\n"
    "                           threadloom's own store uses ports derived from the job\n"
    "  --rdzv-timeout S         give up when the nodes have not met after S seconds (300)\n"
    "  --watchdog-timeout S     abort every node when one stops heartbeating for S seconds or\n"
    "                           fails (60; 0: no watchdog)\n"
    "  --log-dir DIR            also write this node's stdout and stderr to DIR/node-<rank>.log\n"
    "  -h, --help               this text\n"
    "  --version                threadloom's and Python's versions\n";

typedef struct {
  const char* cmd;  /* "run", "info", "topo" or "slurm" */
  const char* gil;  /* "forbid", "warn", "allow"; NULL: the command's default */
  int pin;          /* 0 after --no-pin */
  int torchrun_env; /* 1 after --torchrun-env */
  int rest;         /* index in argv of the first argument for Python */
  /* The cluster flags' values (pointers into argv), NULL when not given. */
  const char* nnodes;           /* --nnodes */
  const char* node_rank;        /* --node-rank */
  const char* master;           /* --master */
  const char* rdzv_timeout;     /* --rdzv-timeout */
  const char* watchdog_timeout; /* --watchdog-timeout */
  const char* log_dir;          /* --log-dir */
  int cluster_flags;            /* 1 when any of them was given */
} tl__args_t;

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

/* Exits with status 2 unless v is a decimal integer >= min. */
static void tl__check_int(const char* flag, const char* v, long min) {
  char* end;
  errno = 0;
  long n = strtol(v, &end, 10);
  if (!*v || *end || errno || n < min || n > (1L << 30)) {
    fprintf(stderr, "threadloom: %s takes an integer >= %ld, not \"%s\"\n", flag, min, v);
    exit(2);
  }
}

/* Exits with status 2 unless v is a number of seconds >= 0. */
static void tl__check_seconds(const char* flag, const char* v) {
  char* end;
  errno = 0;
  double d = strtod(v, &end);
  if (!*v || *end || errno || !(d >= 0)) {
    fprintf(stderr, "threadloom: %s takes a number of seconds, not \"%s\"\n", flag, v);
    exit(2);
  }
}

/* The cluster flags: `--flag VALUE` or `--flag=VALUE`. 1 when argv[*i] was one (its value
 * stored, *i on the value), 0 when not; exits on a missing or malformed value. */
static int tl__parse_cluster_option(int argc, char** argv, int* i, tl__args_t* a) {
  static const char* const flags[] = {"--nnodes", "--node-rank", "--master", "--rdzv-timeout",
                                      "--watchdog-timeout", "--log-dir"};
  const char** slots[] = {&a->nnodes, &a->node_rank, &a->master, &a->rdzv_timeout,
                          &a->watchdog_timeout, &a->log_dir};
  const char* s = argv[*i];
  for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++) {
    size_t n = strlen(flags[k]);
    if (strncmp(s, flags[k], n) != 0 || (s[n] != '\0' && s[n] != '=')) continue;
    const char* v = s[n] == '=' ? s + n + 1 : (*i + 1 < argc ? argv[++*i] : NULL);
    if (!v || !*v) {
      fprintf(stderr, "threadloom: %s needs a value (threadloom --help)\n", flags[k]);
      exit(2);
    }
    if (k == 0) tl__check_int(flags[k], v, 1);
    if (k == 1) tl__check_int(flags[k], v, 0);
    if (k == 3 || k == 4) tl__check_seconds(flags[k], v);
    *slots[k] = v;
    a->cluster_flags = 1;
    return 1;
  }
  return 0;
}

/* 1: argv[*i] was a launcher option (consumed, *i advanced past it); 0: not one; exits on
 * a bad option. */
static int tl__parse_option(int argc, char** argv, int* i, tl__args_t* a) {
  const char* s = argv[*i];
  if (tl__parse_cluster_option(argc, argv, i, a)) {
  } else if (strcmp(s, "--no-pin") == 0) {
    a->pin = 0;
  } else if (strcmp(s, "--torchrun-env") == 0) {
    a->torchrun_env = 1;
  } else if (strncmp(s, "--gil=", 6) == 0 || strcmp(s, "--gil") == 0) {
    const char* v = s[5] == '=' ? s + 6 : (*i + 1 < argc ? argv[++*i] : "");
    if (strcmp(v, "forbid") != 0 && strcmp(v, "warn") != 0 && strcmp(v, "allow") != 0) {
      fprintf(stderr, "threadloom: --gil takes forbid, warn or allow, not \"%s\"\n", v);
      exit(2);
    }
    a->gil = v;
  } else {
    return 0;
  }
  ++*i;
  return 1;
}

static void tl__parse_args(int argc, char** argv, tl__args_t* a) {
  memset(a, 0, sizeof *a);
  a->pin = 1;
  int i = 1;
  while (i < argc && tl__parse_option(argc, argv, &i, a)) {
  }
  if (i >= argc || strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
    fputs(tl__usage, i >= argc ? stderr : stdout);
    exit(i >= argc ? 2 : 0);
  }
  if (strcmp(argv[i], "--version") == 0) {
    printf("threadloom %s (Python %s)\n", TL_VERSION_STRING, PY_VERSION);
    exit(0);
  }
  a->cmd = argv[i++];
  if (strcmp(a->cmd, "run") == 0) {
    while (i < argc && tl__parse_option(argc, argv, &i, a)) {
    }
  } else if (strcmp(a->cmd, "info") != 0 && strcmp(a->cmd, "topo") != 0 &&
             strcmp(a->cmd, "slurm") != 0) {
    fprintf(stderr, "threadloom: unknown command \"%s\" (run, info, topo or slurm; threadloom --help)\n",
            a->cmd);
    exit(2);
  } else if (a->cluster_flags) {
    fprintf(stderr, "threadloom: --nnodes, --node-rank, --master, --rdzv-timeout, "
                    "--watchdog-timeout and --log-dir are options of `threadloom run`, not of %s\n",
            a->cmd);
    exit(2);
  }
  if (!a->gil) a->gil = strcmp(a->cmd, "run") == 0 ? "forbid" : "warn";
  a->rest = i;
}

// ---------------------------------------------------------------------------------------------
// Environment and configuration
// ---------------------------------------------------------------------------------------------

/* OpenMP and BLAS size their pools from the CPU count (or, for OpenMP, from the creating
 * thread's affinity, which would be the main thread's one core): cap them at the allowed PUs
 * unless the user chose. */
static void tl__cap_thread_pools(int allowed_pus) {
  static const char* const vars[] = {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"};
  char n[16];
  snprintf(n, sizeof n, "%d", allowed_pus > 0 ? allowed_pus : 1);
  for (size_t k = 0; k < sizeof vars / sizeof vars[0]; k++) setenv(vars[k], n, 0);
}

/* SLURM names a step's GPUs in SLURM_STEP_GPUS (SLURM_JOB_GPUS in the batch script) and, with
 * gres, also sets CUDA_VISIBLE_DEVICES; where it did not, CUDA would see every GPU of the node.
 * Sets CUDA_VISIBLE_DEVICES from them, never overriding a value SLURM or the user set. */
static void tl__narrow_cuda_visible_devices(void) {
  if (!getenv("SLURM_JOB_ID") && !getenv("SLURM_JOBID")) return;
  if (getenv("CUDA_VISIBLE_DEVICES")) return;
  const char* g = getenv("SLURM_STEP_GPUS");
  if (!g) g = getenv("SLURM_JOB_GPUS");
  if (g) setenv("CUDA_VISIBLE_DEVICES", g, 0);
}

static int tl__status_fail(PyStatus st, PyConfig* config) {
  PyConfig_Clear(config);
  if (PyStatus_IsExit(st)) return st.exitcode;
  Py_ExitStatusException(st); /* prints and exits */
  return 1;
}

/* The interpreter to run, into out[PATH_MAX]: TL_INTERP_PYTHON_NAME in the launcher's own
 * directory (/proc/self/exe, symlinks resolved: a venv's bin/ or a prefix's), else
 * TL_INTERP_PYTHON. Exits with status 1, saying what to do, when neither is there. */
static void tl__find_python(char* out) {
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    self[n] = '\0';
    char* slash = strrchr(self, '/');
    if (slash && (size_t)(slash - self) + 1 + sizeof TL_INTERP_PYTHON_NAME <= PATH_MAX) {
      snprintf(out, PATH_MAX, "%.*s/%s", (int)(slash - self), self, TL_INTERP_PYTHON_NAME);
      if (access(out, X_OK) == 0) return;
    }
  }
  if (access(TL_INTERP_PYTHON, X_OK) == 0) {
    snprintf(out, PATH_MAX, "%s", TL_INTERP_PYTHON);
    return;
  }
  fprintf(stderr,
          "threadloom: no Python to run: there is no %s next to this launcher (%s), and %s, "
          "the interpreter it was built with, is gone. Install threadloom into the "
          "free-threaded Python you use (python3.13t -m pip install threadloom), and run the "
          "threadloom command of that environment.\n",
          TL_INTERP_PYTHON_NAME, n > 0 ? self : "/proc/self/exe unreadable", TL_INTERP_PYTHON);
  exit(1);
}

static PyStatus tl__configure(PyConfig* config, int argc, char** argv, const tl__args_t* a,
                              int allowed_pus) {
  PyStatus st;
  char python[PATH_MAX];
  tl__find_python(python);
  PyConfig_InitPythonConfig(config);
  st = PyConfig_SetBytesString(config, &config->program_name, python);
  if (PyStatus_Exception(st)) return st;
  st = PyConfig_SetBytesString(config, &config->executable, python);
  if (PyStatus_Exception(st)) return st;
  if (strcmp(a->cmd, "run") == 0) {
    /* CPython parses [argv0, PYTHON-OPTIONS, script | -m mod | -c code, ARGS] as python would. */
    char** pyargv = malloc(sizeof(char*) * (size_t)(argc - a->rest + 2));
    if (!pyargv) return PyStatus_NoMemory();
    int n = 0;
    pyargv[n++] = argv[0];
    for (int i = a->rest; i < argc; i++) pyargv[n++] = argv[i];
    pyargv[n] = NULL;
    config->parse_argv = 1;
    st = PyConfig_SetBytesArgv(config, n, pyargv);
    free(pyargv);
  } else {
    /* python -m threadloom CMD ARGS: argv[0] "-m" is what runpy expects (and replaces). */
    char** pyargv = malloc(sizeof(char*) * (size_t)(argc - a->rest + 3));
    if (!pyargv) return PyStatus_NoMemory();
    int n = 0;
    pyargv[n++] = "-m";
    pyargv[n++] = (char*)a->cmd;
    for (int i = a->rest; i < argc; i++) pyargv[n++] = argv[i];
    pyargv[n] = NULL;
    config->parse_argv = 0;
    st = PyConfig_SetBytesArgv(config, n, pyargv);
    free(pyargv);
    if (!PyStatus_Exception(st)) st = PyConfig_SetString(config, &config->run_module, L"threadloom");
  }
  if (PyStatus_Exception(st)) return st;
  st = PyConfig_Read(config);
  if (PyStatus_Exception(st)) return st;
  /* -X cpu_count / PYTHON_CPU_COUNT from the user win; otherwise the allowed PUs. */
  if (config->cpu_count < 0 && allowed_pus > 0) config->cpu_count = allowed_pus;
  return PyStatus_Ok();
}

// ---------------------------------------------------------------------------------------------
// Before user code: free-threaded check, GIL guard, torchrun environment
// ---------------------------------------------------------------------------------------------

/* Loads gilguard.py (and cluster/torchrun.py) by path rather than importing the package: the
 * package's __init__ loads _core and its libraries, which costs start-up time the user's script
 * may never need. Registered under their package names, so `threadloom.gilguard` is this one. The
 * import hook that makes imported code's constants immortal (threadloom/share.py, unless
 * THREADLOOM_SHARE_IMPORTS=0) needs _core, which share.py loads the same way at the first import
 * it sees (a script that imports nothing new does not pay for it). The package directory is
 * where the interpreter's sys.path finds it (PathFinder only looks: it runs no __init__). */
static const char tl__startup_code[] =
    "import sys, _frozen_importlib as _b, _frozen_importlib_external as _e\n"
    "_spec = _e.PathFinder.find_spec('threadloom')\n"
    "if _spec is None or not _spec.submodule_search_locations:\n"
    "    sys.stderr.write('threadloom: the threadloom package is not installed for %s: install "
    "it with %s -m pip install threadloom (or reinstall it into the environment this "
    "launcher belongs to)\\n' % (sys.executable, sys.executable))\n"
    "    raise SystemExit(1)\n"
    "pkg = _spec.submodule_search_locations[0]\n"
    "def _load(name, path):\n"
    "    spec = _e.spec_from_file_location(name, path)\n"
    "    mod = _b.module_from_spec(spec)\n"
    "    sys.modules[name] = mod\n"
    "    spec.loader.exec_module(mod)\n"
    "    return mod\n"
    "_g = _load('threadloom.gilguard', pkg + '/gilguard.py')\n"
    "_g.install(policy, origin='threadloom run')\n"
    "_s = _load('threadloom.share', pkg + '/share.py')\n"
    "if _s.enabled_by_env():\n"
    "    import _imp\n"
    "    _s._CORE_FILE = pkg + '/_core' + _imp.extension_suffixes()[0]\n"
    "    _s.share_imports(True)\n"
    "if cluster is not None:\n"
    "    from threadloom.cluster import launch as _launch\n"
    "    _launch.launch_or_exit(origin='threadloom run', **cluster)\n"
    "if torchrun:\n"
    "    _load('threadloom.cluster.torchrun', pkg + '/cluster/torchrun.py')"
    ".apply_torchrun_env()\n";

/* The keyword arguments of threadloom.cluster.launch.launch() for the flags given (a new dict), or None
 * (a new reference) when this is not a run that may span nodes. */
static PyObject* tl__cluster_kwargs(const tl__args_t* a) {
  if (strcmp(a->cmd, "run") != 0 || (!a->cluster_flags && !getenv("SLURM_JOB_ID")))
    return Py_NewRef(Py_None);
  PyObject* d = PyDict_New();
  if (!d) return NULL;
  struct {
    const char* key;
    const char* value;
    int integer;
  } items[] = {{"nnodes", a->nnodes, 1},           {"node_rank", a->node_rank, 1},
               {"master", a->master, 0},           {"rdzv_timeout", a->rdzv_timeout, 0},
               {"watchdog_timeout", a->watchdog_timeout, 0}, {"log_dir", a->log_dir, 0}};
  for (size_t k = 0; k < sizeof items / sizeof items[0]; k++) {
    if (!items[k].value) continue;
    PyObject* v = items[k].integer ? PyLong_FromString(items[k].value, NULL, 10)
                                   : PyUnicode_DecodeFSDefault(items[k].value);
    if (!v || PyDict_SetItemString(d, items[k].key, v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(d);
      return NULL;
    }
    Py_DECREF(v);
  }
  return d;
}

/* 0, or the exit status when the process must stop (the error was printed). */
static int tl__before_user_code(const tl__args_t* a) {
  PyObject* globals = PyDict_New();
  if (!globals) goto fail;
  PyObject* v;
  if (!(v = PyUnicode_FromString(a->gil)) || PyDict_SetItemString(globals, "policy", v) < 0) goto fail_v;
  Py_DECREF(v);
  if (PyDict_SetItemString(globals, "torchrun", a->torchrun_env ? Py_True : Py_False) < 0) goto fail;
  if (!(v = tl__cluster_kwargs(a)) || PyDict_SetItemString(globals, "cluster", v) < 0) goto fail_v;
  Py_DECREF(v);
  if (PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) < 0) goto fail;
  PyObject* r = PyRun_String(tl__startup_code, Py_file_input, globals, globals);
  if (!r) goto fail;
  Py_DECREF(r);
  Py_DECREF(globals);
  return 0;
fail_v:
  Py_XDECREF(v);
fail:
  Py_XDECREF(globals);
  /* A GILEnabledError (a SystemExit) exits here with its status, after printing its message. */
  PyErr_Print();
  return 1;
}

int main(int argc, char** argv) {
  tl__args_t a;
  tl__parse_args(argc, argv, &a);

  if (strcmp(a.cmd, "run") == 0) tl__narrow_cuda_visible_devices();
  tl__interp_place_t place;
  tl__interp_place(a.pin, &place);
  tl__cap_thread_pools(place.allowed_pus);

  PyConfig config;
  PyStatus st = tl__configure(&config, argc, argv, &a, place.allowed_pus);
  if (PyStatus_Exception(st)) return tl__status_fail(st, &config);
  st = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(st)) return tl__status_fail(st, &config);

  /* Pinned after the interpreter's start-up, which ran while the topology loaded, and before
   * any of the user's code (the guard, .pth files and sitecustomize run unpinned). */
  tl__interp_pin_main(&place);
  int rc = tl__before_user_code(&a);
  if (rc) {
    Py_FinalizeEx();
    return rc;
  }
  return Py_RunMain();
}
