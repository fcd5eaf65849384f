/* python/src/share.c: threadloom._core.ShareWalk, share_code and RefProbe: making read-only data
 * immortal so that threads reading it write no reference count, and finding which shared
 * objects have their counts written by other threads.
 *
 * Why: on free-threaded CPython every object has an owner thread (ob_tid) that counts its own
 * references in ob_ref_local without atomics; every other thread adds and subtracts in
 * ob_ref_shared with atomic instructions, so an object many threads read bounces its cache line
 * between their cores. An immortal object (ob_ref_local == UINT32_MAX) has neither field written
 * by Py_INCREF/Py_DECREF. CPython immortalizes interned strings, small ints, static types, code
 * constants it compiles itself, and (3.13) objects with deferred reference counts once a second
 * thread starts; share() does the same to a graph of user data.
 *
 * The mechanism is the interpreter's own: PyUnstable_SetImmortal where it exists (3.15), else
 * the field writes of CPython 3.13's internal _Py_SetImmortal (Objects/object.c, read at
 * v3.13.5) for the free-threaded header: untrack from the GC if tracked, then ob_ref_local =
 * UINT32_MAX, ob_tid = 0, ob_ref_shared = 0. The untracking is why an immortal container stays
 * correct: the free-threaded collector never traverses an immortal object (update_refs in
 * Python/gc_free_threading.c untracks any it meets, visit_decref skips them), so whatever an
 * immortal container refers to counts as referenced from outside the heap and is never
 * collected; a dict that later receives a tracked value is tracked again by CPython itself and
 * untracked again at the next collection. Any other interpreter (3.14, or a 3.13 whose header
 * does not answer the self-check at import) is refused with the reason.
 *
 * Rules, from CPython's own issues: an object owned by another thread is never touched (gh-113956:
 * the owner's non-atomic ob_ref_local++ could overwrite UINT32_MAX; PyUnstable_SetImmortal's
 * rule since gh-150865). An object whose owner exited keeps that thread's id until a collection
 * gives its abandoned memory back (gc_restore_tid merges its counts and zeroes ob_tid), so share()
 * retries such objects once after gc.collect() and only then reports them as owned by a live
 * thread. An object queued for a reference-count merge (ob_ref_shared's flags == _Py_REF_QUEUED)
 * is skipped the same way: the merge would read UINT32_MAX as a count and make it mortal again.
 * (3.13's deferred-count objects carry that flag too, without being queued: they are made
 * immortal, as CPython does to them when a second thread starts; see make_immortal.)
 *
 * Concurrency: the walk runs attached, on the calling thread; lists, dicts, sets and instances
 * are read and made immortal inside their critical section (Py_BEGIN_CRITICAL_SECTION), which
 * excludes mutations by other threads, which CPython makes under the same section. The fields
 * are written with atomic stores (ob_ref_local relaxed, as Py_INCREF loads it; the other two
 * release, see make_immortal): a reader that raced ahead of the store does one more atomic add
 * to ob_ref_shared, which no longer matters once the object is immortal, and ob_tid is cleared
 * before ob_ref_shared so that a concurrent decrement that finds ob_ref_shared zero drops its
 * reference (ob_tid == 0: brc's Py_DECREF, a no-op now) instead of queueing the object to this
 * thread. So other threads may read the data while share() runs. Every object with children is
 * held by a strong reference until the walk ends, and atoms are handled while their container
 * is (inside its critical section, or held), so a concurrent mutation of the graph cannot free
 * an object the walk still reads; the walk does not promise a consistent snapshot of a graph
 * other threads are changing. RefProbe samples
 * ob_ref_shared detached from the interpreter (it holds a reference to every object it reads).
 *
 * The walk is iterative (an explicit stack: no recursion limit), visits each object once (an
 * open-addressing set of pointers, so cycles end), and records for each object the one it was
 * first reached from, so reports can name a path. */
#include "core.h"

#include <string.h>
#include <time.h>

#if defined(Py_GIL_DISABLED) && PY_VERSION_HEX >= 0x030F0000
#define TL_SHARE_API 1 /* PyUnstable_SetImmortal (3.15) */
#elif defined(Py_GIL_DISABLED) && PY_VERSION_HEX >= 0x030D0000 && PY_VERSION_HEX < 0x030E0000
#define TL_SHARE_FIELDS 1 /* 3.13's _Py_SetImmortal, written out for the free-threaded header */
#define TL_GC_BITS_DEFERRED 64 /* _PyGC_BITS_DEFERRED, Include/internal/pycore_gc.h (3.13.5) */
#endif

// ---------------------------------------------------------------------------------------------
// The layout check, at import
// ---------------------------------------------------------------------------------------------

void tl_py_share_init(core_state* st) {
  st->share_refusal = NULL;
  /* A class statement's instances are deallocated by subtype_dealloc: that pointer tells a plain
   * instance (walked by default) from a C extension's object (walked only when asked). */
  st->py_class_dealloc = NULL;
  PyObject* cls = PyObject_CallFunction((PyObject*)&PyType_Type, "s()N", "_tl_probe", PyDict_New());
  if (cls) {
    st->py_class_dealloc = ((PyTypeObject*)cls)->tp_dealloc;
    Py_DECREF(cls);
  } else {
    PyErr_Clear();
  }
#if !defined(Py_GIL_DISABLED)
  st->share_refusal = "this interpreter is built with the GIL: its threads take turns, so no "
                      "reference count is contended and there is nothing to share";
#elif defined(TL_SHARE_FIELDS)
  if ((Py_Version >> 16) != (PY_VERSION_HEX >> 16)) {
    st->share_refusal = "threadloom._core was built for another Python minor version than the "
                        "one running: rebuild it (make build)";
    return;
  }
  /* The header must answer as 3.13's does: a new object is owned by this thread with one local
   * reference and nothing shared; None is immortal by ob_ref_local alone. */
  PyObject* probe = PyFloat_FromDouble(0.25);
  int ok = probe && _Py_atomic_load_uintptr_relaxed(&probe->ob_tid) == _Py_ThreadId() &&
           _Py_atomic_load_uint32_relaxed(&probe->ob_ref_local) == 1 &&
           _Py_atomic_load_ssize_relaxed(&probe->ob_ref_shared) == 0 &&
           _Py_atomic_load_uint32_relaxed(&Py_None->ob_ref_local) == _Py_IMMORTAL_REFCNT_LOCAL &&
           _Py_IsImmortal(Py_None) && !_Py_IsImmortal(probe) && st->py_class_dealloc;
  if (!probe) PyErr_Clear();
  Py_XDECREF(probe);
  if (!ok)
    st->share_refusal = "this interpreter's object header does not answer like CPython 3.13's "
                        "free-threaded one (ob_tid, ob_ref_local, ob_ref_shared), so threadloom "
                        "will not write it";
#elif defined(TL_SHARE_API)
  if (!st->py_class_dealloc) st->share_refusal = "could not create a probe class at import";
#else
  st->share_refusal = "threadloom.share() knows the object header of free-threaded CPython 3.13 "
                      "and uses PyUnstable_SetImmortal from 3.15; this free-threaded version "
                      "has neither verified: use 3.13t (scripts/bootstrap.sh) or 3.15t";
#endif
}

static core_state* state_of(PyObject* module) { return get_state(module); }

static PyObject* share_refused(core_state* st) {
  PyErr_Format(PyExc_NotImplementedError, "threadloom.share: %s", st->share_refusal);
  return NULL;
}

PyObject* tl_py_share_layout(PyObject* module, PyObject* unused) {
  (void)unused;
  core_state* st = state_of(module);
  if (st->share_refusal) return Py_BuildValue("(Os)", Py_False, st->share_refusal);
#if defined(TL_SHARE_API)
  return Py_BuildValue("(Os)", Py_True, "PyUnstable_SetImmortal");
#else
  return Py_BuildValue("(Os)", Py_True, "the field writes of CPython 3.13's _Py_SetImmortal");
#endif
}

#if defined(Py_GIL_DISABLED)
// ---------------------------------------------------------------------------------------------
// The graph: the objects reached, their parents, a visited set and the stack still to expand
// ---------------------------------------------------------------------------------------------

#define TL_NO_PARENT UINT32_MAX
#define TL_GRAPH_MAX ((Py_ssize_t)1 << 31) /* indexes are uint32 */

/* The visited set: one bit per 16 bytes of address space, in 32 KiB bitmaps of 4 MiB of
 * address space each, found through a small open-addressing table. Every object has a
 * 16-byte-aligned address and is at least 32 bytes long on 3.13t, so distinct live objects have
 * distinct bits; objects allocated together share bitmaps, so a graph of millions of objects
 * costs a few MiB (its heap's size / 128) where a hash set of addresses cost 16-32 bytes per
 * object, and a lookup touches one cache line of a bitmap recently used. */
#define TL_CHUNK_SHIFT 22
#define TL_CHUNK_WORDS ((1u << (TL_CHUNK_SHIFT - 4)) / 64)

typedef struct {
  uintptr_t key;  /* address >> TL_CHUNK_SHIFT, plus one (0: empty) */
  uint64_t* bits; /* TL_CHUNK_WORDS words */
} chunk_t;

typedef struct {
  chunk_t* tab;
  size_t mask, used;
  uintptr_t last_key; /* the chunk of the last lookup */
  uint64_t* last_bits;
} visited_t;

static void visited_free(visited_t* v) {
  for (size_t i = 0; v->tab && i <= v->mask; i++) PyMem_RawFree(v->tab[i].bits);
  PyMem_RawFree(v->tab);
  memset(v, 0, sizeof *v);
}

static chunk_t* visited_slot(chunk_t* tab, size_t mask, uintptr_t key) {
  size_t h = (size_t)(key * 0x9E3779B97F4A7C15ull >> 17) & mask;
  while (tab[h].key && tab[h].key != key) h = (h + 1) & mask;
  return &tab[h];
}

/* The bitmap of p's chunk; creates it when `create`. NULL: none (or MemoryError if create). */
static uint64_t* visited_bits(visited_t* v, const void* p, int create) {
  uintptr_t key = ((uintptr_t)p >> TL_CHUNK_SHIFT) + 1;
  if (key == v->last_key) return v->last_bits;
  chunk_t* c = v->tab ? visited_slot(v->tab, v->mask, key) : NULL;
  if (!c || !c->key) {
    if (!create) return NULL;
    if (!v->tab || (v->used + 1) * 2 > v->mask + 1) {
      size_t n = v->tab ? (v->mask + 1) * 2 : 64;
      chunk_t* t = PyMem_RawCalloc(n, sizeof *t);
      if (!t) goto nomem;
      for (size_t i = 0; v->tab && i <= v->mask; i++)
        if (v->tab[i].key) *visited_slot(t, n - 1, v->tab[i].key) = v->tab[i];
      PyMem_RawFree(v->tab);
      v->tab = t;
      v->mask = n - 1;
    }
    c = visited_slot(v->tab, v->mask, key);
    if (!(c->bits = PyMem_RawCalloc(TL_CHUNK_WORDS, sizeof(uint64_t)))) goto nomem;
    c->key = key;
    v->used++;
  }
  v->last_key = key;
  v->last_bits = c->bits;
  return c->bits;
nomem:
  PyErr_NoMemory();
  return NULL;
}

/* Marks p visited: 1 if it already was, 0 if not, -1 MemoryError. */
static int visited_add(visited_t* v, const void* p) {
  uint64_t* bits = visited_bits(v, p, 1);
  if (!bits) return -1;
  size_t bit = ((uintptr_t)p >> 4) & ((1u << (TL_CHUNK_SHIFT - 4)) - 1);
  uint64_t m = (uint64_t)1 << (bit & 63);
  if (bits[bit >> 6] & m) return 1;
  bits[bit >> 6] |= m;
  return 0;
}

static int visited_has(visited_t* v, const void* p) {
  uint64_t* bits = visited_bits(v, p, 0);
  size_t bit = ((uintptr_t)p >> 4) & ((1u << (TL_CHUNK_SHIFT - 4)) - 1);
  return bits && (bits[bit >> 6] >> (bit & 63)) & 1;
}

/* A leaf handler takes objects that have no children of their own to expand (see is_leaf)
 * instead of the graph storing them: share() makes them immortal on the spot. It marks them
 * visited itself. 0 or -1. */
typedef int (*leaf_fn)(void* ctx, PyObject* op, uint32_t parent);

typedef struct {
  PyObject** objs;    /* every object stored, in order; a strong reference each */
  uint32_t* parent;   /* parent[i]: the index i was first reached from, or TL_NO_PARENT */
  Py_ssize_t n, cap;
  visited_t seen;     /* every object reached, stored or handed to `leaf` */
  uint32_t* stack;    /* indexes reached but not expanded yet */
  Py_ssize_t sp, stack_cap;
  leaf_fn leaf;       /* NULL: every object is stored */
  void* leaf_ctx;
} graph_t;

static void graph_free(graph_t* g) {
  for (Py_ssize_t i = 0; i < g->n; i++) Py_DECREF(g->objs[i]);
  PyMem_RawFree(g->objs);
  PyMem_RawFree(g->parent);
  PyMem_RawFree(g->stack);
  visited_free(&g->seen);
  memset(g, 0, sizeof *g);
}

/* str, bytes, numbers, None...: no references to other objects. Exact types only. */
static inline int is_atom(PyObject* op) {
  PyTypeObject* t = Py_TYPE(op);
  return t == &PyUnicode_Type || t == &PyLong_Type || t == &PyFloat_Type || t == &PyBytes_Type ||
         t == &PyBool_Type || t == &PyComplex_Type || op == Py_None || op == Py_Ellipsis ||
         op == Py_NotImplemented || t == &PyByteArray_Type || t == &PyRange_Type;
}

/* An atom, or a tuple of atoms (a record): nothing below it but atoms. */
static int is_leaf(PyObject* op) {
  if (is_atom(op)) return 1;
  if (!PyTuple_CheckExact(op)) return 0;
  for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(op); i < n; i++)
    if (!is_atom(PyTuple_GET_ITEM(op, i))) return 0;
  return 1;
}

/* Adds op (a new strong reference) reached from `parent` and pushes it to expand, or hands a
 * leaf to g->leaf. 1 if it was reached before, 0 added, -1 with an exception. A leaf handler
 * aside (share() calls __sizeof__ there), calls no Python code: fine inside a tp_traverse. */
static int graph_add(graph_t* g, PyObject* op, uint32_t parent) {
  if (g->leaf && parent != TL_NO_PARENT && is_leaf(op))
    return g->leaf(g->leaf_ctx, op, parent) < 0 ? -1 : 0;
  int seen = visited_add(&g->seen, op);
  if (seen) return seen;
  if (g->n >= TL_GRAPH_MAX) {
    PyErr_SetString(PyExc_MemoryError, "threadloom: a graph of over 2**31 objects");
    return -1;
  }
  if (g->n == g->cap) {
    Py_ssize_t cap = g->cap ? g->cap * 2 : 1024;
    PyObject** o = PyMem_RawRealloc(g->objs, (size_t)cap * sizeof *o);
    if (!o) {
      PyErr_NoMemory();
      return -1;
    }
    g->objs = o;
    uint32_t* p = PyMem_RawRealloc(g->parent, (size_t)cap * sizeof *p);
    if (!p) {
      PyErr_NoMemory();
      return -1;
    }
    g->parent = p;
    g->cap = cap;
  }
  if (g->sp == g->stack_cap) {
    Py_ssize_t cap = g->stack_cap ? g->stack_cap * 2 : 1024;
    uint32_t* s = PyMem_RawRealloc(g->stack, (size_t)cap * sizeof *s);
    if (!s) {
      PyErr_NoMemory();
      return -1;
    }
    g->stack = s;
    g->stack_cap = cap;
  }
  Py_ssize_t i = g->n++;
  g->objs[i] = Py_NewRef(op);
  g->parent[i] = parent;
  g->stack[g->sp++] = (uint32_t)i;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// What each object is, and what lies below it
// ---------------------------------------------------------------------------------------------

typedef enum {
  K_ATOM,      /* str, bytes, bytearray, int, float, complex, bool, None, Ellipsis, range */
  K_DATA,      /* slice: builtin data with references, read through tp_traverse */
  K_TUPLE,
  K_LIST,
  K_DICT,
  K_SET,       /* set and frozenset */
  K_INSTANCE,  /* an instance of a class statement's class (builtin subclasses included) */
  K_MODULE,
  K_CLASS,     /* a heap type; static types are immortal already and never walked */
  K_FUNCTION,  /* Python functions, bound methods, cells, classmethod, staticmethod, property */
  K_CODE,
  K_EXTENSION, /* anything else: a C extension's object */
} kind_t;

typedef struct {
  int modules, classes, functions, code, extensions; /* walk these kinds below the root */
  int consts_only; /* share_code: code objects are walked, not made immortal */
} walk_flags_t;

static kind_t classify(PyObject* op, destructor py_class_dealloc) {
  PyTypeObject* t = Py_TYPE(op);
  if (is_atom(op)) return K_ATOM;
  if (t == &PyTuple_Type) return K_TUPLE;
  if (t == &PyList_Type) return K_LIST;
  if (t == &PyDict_Type) return K_DICT;
  if (t == &PySet_Type || t == &PyFrozenSet_Type) return K_SET;
  if (t == &PySlice_Type) return K_DATA;
  if (PyType_Check(op)) return K_CLASS;
  if (PyModule_Check(op)) return K_MODULE;
  if (PyFunction_Check(op) || PyMethod_Check(op) || PyCell_Check(op) ||
      t == &PyClassMethod_Type || t == &PyStaticMethod_Type || t == &PyProperty_Type)
    return K_FUNCTION;
  if (PyCode_Check(op)) return K_CODE;
  if (py_class_dealloc && t->tp_dealloc == py_class_dealloc) return K_INSTANCE;
  return K_EXTENSION;
}

/* Whether a kind is walked (and made immortal) below the root; the root always is. */
static int kind_included(kind_t k, const walk_flags_t* f) {
  switch (k) {
    case K_MODULE: return f->modules;
    case K_CLASS: return f->classes;
    case K_FUNCTION: return f->functions;
    case K_CODE: return f->code;
    case K_EXTENSION: return f->extensions;
    default: return 1;
  }
}

/* Kinds whose contents another thread may change: read inside their critical section. */
static int kind_mutable(kind_t k) {
  return k == K_LIST || k == K_DICT || k == K_SET || k == K_INSTANCE || k == K_EXTENSION ||
         k == K_FUNCTION || k == K_CLASS;
}

typedef struct {
  graph_t* g;
  uint32_t parent;
  int skip_type; /* the object's own type, visited by subtype_traverse: not a child */
  PyTypeObject* type;
} visit_arg_t;

static int visit_child(PyObject* child, void* arg) {
  visit_arg_t* a = arg;
  if (!child || (a->skip_type && child == (PyObject*)a->type)) return 0;
  return graph_add(a->g, child, a->parent) < 0 ? -1 : 0;
}

static int add_child(graph_t* g, PyObject* child, uint32_t parent) {
  return child ? (graph_add(g, child, parent) < 0 ? -1 : 0) : 0;
}

/* Pushes the children of op (index idx). Called inside op's critical section for the mutable
 * kinds. 0 or -1 with an exception. */
static int expand(graph_t* g, PyObject* op, uint32_t idx, kind_t k, int is_root) {
  visit_arg_t a = {g, idx, 0, Py_TYPE(op)};
  switch (k) {
    case K_ATOM: return 0;
    case K_DICT: {
      Py_ssize_t pos = 0;
      PyObject *key, *value;
      while (PyDict_Next(op, &pos, &key, &value))
        if (add_child(g, key, idx) < 0 || add_child(g, value, idx) < 0) return -1;
      return 0;
    }
    case K_MODULE: {
      PyObject* d = PyModule_GetDict(op); /* borrowed */
      return add_child(g, d, idx);
    }
    case K_CLASS: {
      if (!PyType_HasFeature((PyTypeObject*)op, Py_TPFLAGS_HEAPTYPE)) return 0;
      PyObject* d = PyType_GetDict((PyTypeObject*)op);
      int rc = add_child(g, d, idx);
      Py_XDECREF(d);
      return rc;
    }
    case K_CODE:
      return add_child(g, ((PyCodeObject*)op)->co_consts, idx);
    case K_FUNCTION:
      if (PyFunction_Check(op)) {
        PyFunctionObject* f = (PyFunctionObject*)op;
        /* not func_globals/func_builtins: those are modules' dicts (the modules flag) */
        if (add_child(g, f->func_defaults, idx) < 0 || add_child(g, f->func_kwdefaults, idx) < 0 ||
            add_child(g, f->func_closure, idx) < 0 || add_child(g, f->func_dict, idx) < 0 ||
            add_child(g, f->func_code, idx) < 0)
          return -1;
        return 0;
      }
      break;
    case K_INSTANCE:
      a.skip_type = 1; /* the class is reached only as a value, or as the root */
      if (PyDict_Check(op) && expand(g, op, idx, K_DICT, is_root) < 0) return -1;
      break;
    default:
      break;
  }
  traverseproc tr = Py_TYPE(op)->tp_traverse;
  if (!tr || !PyType_IS_GC(Py_TYPE(op))) return 0;
  if (k == K_EXTENSION && Py_TYPE(op)->tp_flags & Py_TPFLAGS_HEAPTYPE) a.skip_type = 1;
  return tr(op, visit_child, &a) ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------
// Making one object immortal
// ---------------------------------------------------------------------------------------------

typedef enum {
  O_MADE,
  O_ALREADY,
  O_OTHER_THREAD,  /* owned by another thread (gh-113956) */
  O_MERGE_PENDING, /* queued for a reference-count merge */
  O_REFUSED,       /* PyUnstable_SetImmortal said no */
} outcome_t;

/* Called with op's critical section held for the mutable kinds. */
static outcome_t make_immortal(PyObject* op) {
#if defined(TL_SHARE_FIELDS) || defined(TL_SHARE_API)
  if (_Py_IsImmortal(op)) return O_ALREADY;
  uintptr_t tid = _Py_atomic_load_uintptr_relaxed(&op->ob_tid);
  if (tid != 0 && tid != _Py_ThreadId()) return O_OTHER_THREAD;
  Py_ssize_t shared = _Py_atomic_load_ssize_relaxed(&op->ob_ref_shared);
  /* 3.13's deferred reference counting (modules, their dicts, top-level functions, heap types,
   * code: _PyObject_SetDeferredRefcount) marks ob_ref_shared _Py_REF_QUEUED so that the object
   * is never queued; CPython itself makes such objects immortal when a second thread starts
   * (_PyGC_ImmortalizeDeferredObjects: checked on 3.13.5, each went from gc bits DEFERRED |
   * TRACKED, ob_ref_shared QUEUED to immortal, untracked, the DEFERRED bit cleared). So
   * QUEUED with the DEFERRED bit is no pending merge: it is made immortal here as there. */
  int deferred = 0;
#if defined(TL_SHARE_FIELDS)
  deferred = (_Py_atomic_load_uint8_relaxed(&op->ob_gc_bits) & TL_GC_BITS_DEFERRED) != 0;
#endif
  if ((shared & _Py_REF_SHARED_FLAG_MASK) == _Py_REF_QUEUED && !deferred) return O_MERGE_PENDING;
#if defined(TL_SHARE_API)
  return PyUnstable_SetImmortal(op) ? O_MADE : O_REFUSED;
#else
  /* _Py_SetImmortal (3.13.5 Objects/object.c): untrack, then _Py_SetImmortalUntracked. */
  if (PyObject_IS_GC(op) && PyObject_GC_IsTracked(op)) PyObject_GC_UnTrack(op);
  if (deferred) /* as CPython's immortalization of deferred objects (see above) */
    _Py_atomic_store_uint8_relaxed(
        &op->ob_gc_bits,
        (uint8_t)(_Py_atomic_load_uint8_relaxed(&op->ob_gc_bits) & ~TL_GC_BITS_DEFERRED));
  /* ob_tid and ob_ref_shared with release stores: a thread whose decrement finds the shared
   * count zero reads ob_tid (brc's queueing, an acquire load) and, seeing 0, decrements again,
   * which must then see the immortal ob_ref_local. */
  _Py_atomic_store_uint32_relaxed(&op->ob_ref_local, _Py_IMMORTAL_REFCNT_LOCAL);
  _Py_atomic_store_uintptr_release(&op->ob_tid, 0);
  _Py_atomic_store_ssize_release(&op->ob_ref_shared, 0);
  return O_MADE;
#endif
#else
  (void)op;
  return O_REFUSED;
#endif
}

/* The __sizeof__ of the last few types met (a walk meets few types, in runs). */
#define TL_SIZEOF_CACHE 8
typedef struct {
  PyTypeObject* type[TL_SIZEOF_CACHE]; /* borrowed: the graph holds an instance of each */
  PyObject* meth[TL_SIZEOF_CACHE];     /* strong */
  int next;
  PyObject* object_sizeof;             /* object.__sizeof__ (strong), or NULL until needed */
} sizeof_cache_t;

static void sizeof_cache_clear(sizeof_cache_t* c) {
  for (int i = 0; i < TL_SIZEOF_CACHE; i++) Py_CLEAR(c->meth[i]);
  Py_CLEAR(c->object_sizeof);
}

/* sys.getsizeof(op) (Python/sysmodule.c _PySys_GetSizeOf: __sizeof__ plus the pre-header of
 * managed dicts and weak references, none for static types); -1 with an exception. */
static Py_ssize_t size_of(PyObject* op, sizeof_cache_t* c) {
  PyTypeObject* t = Py_TYPE(op);
  PyObject* meth = NULL;
  for (int i = 0; i < TL_SIZEOF_CACHE; i++)
    if (c->type[i] == t && c->meth[i]) meth = c->meth[i];
  if (!meth) {
    if (!c->object_sizeof &&
        !(c->object_sizeof = PyObject_GetAttrString((PyObject*)&PyBaseObject_Type, "__sizeof__")))
      return -1;
    if (!(meth = PyObject_GetAttrString((PyObject*)t, "__sizeof__"))) return -1;
    int k = c->next++ % TL_SIZEOF_CACHE;
    Py_XSETREF(c->meth[k], meth);
    c->type[k] = t;
  }
  Py_ssize_t n;
  if (meth == c->object_sizeof) {
    /* object.__sizeof__ (Objects/typeobject.c, 3.13.5), without the call: float, tuple... */
    n = t->tp_basicsize;
    if (t->tp_itemsize > 0) n += Py_SIZE(op) * t->tp_itemsize;
  } else {
    PyObject* r = PyObject_CallOneArg(meth, op);
    if (!r) return -1;
    n = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    if (n < 0) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "__sizeof__() should return >= 0");
      return -1;
    }
  }
  if (!PyType_Check(op) || PyType_HasFeature((PyTypeObject*)op, Py_TPFLAGS_HEAPTYPE))
    if (PyType_HasFeature(t, Py_TPFLAGS_PREHEADER)) n += 2 * (Py_ssize_t)sizeof(PyObject*);
  return n;
}

// ---------------------------------------------------------------------------------------------
// share(obj, ...) and share_code(code)
// ---------------------------------------------------------------------------------------------

enum {
  R_OTHER_THREAD, R_MERGE_PENDING, R_REFUSED, R_MODULE, R_CLASS, R_FUNCTION, R_CODE, R_EXTENSION,
  R_COUNT
};
static const char* const reason_names[R_COUNT] = {
    "other_thread", "merge_pending", "refused", "module", "class", "function", "code", "extension",
};

/* Where an object is: a stored object (obj NULL: objs[idx]), or a leaf below stored object idx,
 * possibly inside a tuple of atoms (mid). mid and obj are strong references once kept. */
typedef struct {
  uint32_t idx;
  PyObject* mid;
  PyObject* obj;
} loc_t;

typedef struct {
  graph_t g;
  walk_flags_t flags;
  destructor py_class_dealloc;
  sizeof_cache_t sizes;
  int examples;                  /* examples kept per reason */
  Py_ssize_t made, already, bytes, counts[R_COUNT], leaves;
  loc_t* ex[R_COUNT];            /* the first `examples` per reason */
  Py_ssize_t nex[R_COUNT];
  loc_t* retry;                  /* other-thread and merge-pending objects, for after gc */
  Py_ssize_t nretry, capretry;
  int in_retry;
  /* The walk in steps (ShareWalk): the stored object being expanded (-1: none), and how far: a
   * list's items done (from its end, as list_traverse goes), or a dict's PyDict_Next position. */
  int64_t cur;
  Py_ssize_t pos;
} share_t;

static PyObject* loc_object(const share_t* s, loc_t l) { return l.obj ? l.obj : s->g.objs[l.idx]; }

static loc_t loc_keep(loc_t l) {
  Py_XINCREF(l.mid);
  Py_XINCREF(l.obj);
  return l;
}

static void loc_drop(loc_t* l) {
  Py_CLEAR(l->mid);
  Py_CLEAR(l->obj);
}

static int note(share_t* s, int reason, loc_t l) {
  s->counts[reason]++;
  if (s->nex[reason] < s->examples) {
    if (!s->ex[reason] && !(s->ex[reason] = PyMem_RawMalloc((size_t)s->examples * sizeof(loc_t)))) {
      PyErr_NoMemory();
      return -1;
    }
    s->ex[reason][s->nex[reason]++] = loc_keep(l);
  }
  return 0;
}

static int outcome_done(share_t* s, outcome_t o, loc_t l) {
  switch (o) {
    case O_MADE: {
      s->made++;
      Py_ssize_t n = size_of(loc_object(s, l), &s->sizes);
      if (n < 0) return -1;
      s->bytes += n;
      return 0;
    }
    case O_ALREADY: s->already++; return 0;
    case O_REFUSED: return note(s, R_REFUSED, l);
    default: break;
  }
  if (!s->in_retry) { /* kept for one more try after gc.collect() */
    if (s->nretry == s->capretry) {
      Py_ssize_t cap = s->capretry ? s->capretry * 2 : 64;
      loc_t* r = PyMem_RawRealloc(s->retry, (size_t)cap * sizeof *r);
      if (!r) {
        PyErr_NoMemory();
        return -1;
      }
      s->retry = r;
      s->capretry = cap;
    }
    s->retry[s->nretry++] = loc_keep(l);
    return 0;
  }
  return note(s, o == O_OTHER_THREAD ? R_OTHER_THREAD : R_MERGE_PENDING, l);
}

static int kind_reason(kind_t k) {
  switch (k) {
    case K_MODULE: return R_MODULE;
    case K_CLASS: return R_CLASS;
    case K_FUNCTION: return R_FUNCTION;
    case K_CODE: return R_CODE;
    default: return R_EXTENSION;
  }
}

/* graph_t's leaf handler: an atom or a tuple of atoms below stored object `parent`, made
 * immortal on the spot (inside the parent's critical section when it has one) instead of being
 * stored, so a list of a million records costs no per-record memory. 0 or -1. */
static int share_leaf(void* ctx, PyObject* op, uint32_t parent) {
  share_t* s = ctx;
  int r = visited_add(&s->g.seen, op);
  if (r) return r < 0 ? -1 : 0;
  s->leaves++;
  if (PyTuple_CheckExact(op)) {
    for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(op); i < n; i++) {
      PyObject* item = PyTuple_GET_ITEM(op, i);
      if ((r = visited_add(&s->g.seen, item)) < 0) return -1;
      if (r) continue;
      s->leaves++;
      loc_t l = {parent, op, item};
      if (outcome_done(s, make_immortal(item), l) < 0) return -1;
    }
  }
  loc_t l = {parent, NULL, op};
  return outcome_done(s, make_immortal(op), l);
}

/* Expands and makes immortal the stored object at idx; 0 or -1. */
static int share_one(share_t* s, uint32_t idx) {
  PyObject* op = s->g.objs[idx];
  kind_t k = classify(op, s->py_class_dealloc);
  int is_root = s->g.parent[idx] == TL_NO_PARENT;
  loc_t l = {idx, NULL, NULL};
  if (!is_root && !kind_included(k, &s->flags)) return note(s, kind_reason(k), l);
  int immortalize = !(s->flags.consts_only && (k == K_CODE || is_root));
  outcome_t o = O_ALREADY;
  int rc;
  if (kind_mutable(k)) {
    Py_BEGIN_CRITICAL_SECTION(op);
    rc = expand(&s->g, op, idx, k, is_root);
    if (rc == 0 && immortalize) o = make_immortal(op);
    Py_END_CRITICAL_SECTION();
  } else {
    rc = expand(&s->g, op, idx, k, is_root);
    if (rc == 0 && immortalize) o = make_immortal(op);
  }
  if (rc < 0) return -1;
  if (!immortalize) return 0;
  return outcome_done(s, o, l);
}

/* Adds more children of the exact list or dict op (stored at idx) from s->pos, inside op's
 * critical section, taking from *budget one per item looked at plus one per object it reached
 * (a record's tuple and atoms), so a unit costs about the same whatever the data: 1 when op has no
 * children left, 0 when some remain, -1 with an exception. A list's items go from its end, as
 * list_traverse (and so the one-shot walk) visits them; a list that shrank between two calls
 * resumes at its new end, so a graph changed under a walk in steps may keep objects mortal, as
 * one changed under a walk in one go (the walk promises no snapshot). */
static int expand_some(share_t* s, PyObject* op, uint32_t idx, kind_t k, Py_ssize_t* budget) {
  graph_t* g = &s->g;
  if (k == K_LIST) {
    Py_ssize_t n = PyList_GET_SIZE(op);
    while (s->pos < n && *budget > 0) {
      Py_ssize_t before = g->n + s->leaves;
      if (add_child(g, PyList_GET_ITEM(op, n - 1 - s->pos), idx) < 0) return -1;
      s->pos++;
      *budget -= 1 + (g->n + s->leaves - before);
      n = PyList_GET_SIZE(op); /* a leaf handler may call __sizeof__, which could change it */
    }
    return s->pos >= n;
  }
  PyObject *key, *value;
  while (*budget > 0) {
    if (!PyDict_Next(op, &s->pos, &key, &value)) return 1;
    Py_ssize_t before = g->n + s->leaves;
    if (add_child(g, key, idx) < 0 || add_child(g, value, idx) < 0) return -1;
    *budget -= 1 + (g->n + s->leaves - before);
  }
  return 0;
}

/* share_one for the stored object s->cur, in steps when it is an exact list or dict (a list of a
 * million records is one object): 1 done with it, 0 not yet (budget spent), -1 error. */
static int share_some(share_t* s, Py_ssize_t* budget) {
  uint32_t idx = (uint32_t)s->cur;
  PyObject* op = s->g.objs[idx];
  kind_t k = classify(op, s->py_class_dealloc);
  if (k != K_LIST && k != K_DICT) {
    Py_ssize_t before = s->g.n + s->leaves;
    if (share_one(s, idx) < 0) return -1;
    *budget -= 1 + (s->g.n + s->leaves - before);
    return 1;
  }
  /* lists and dicts are always walked (kind_included); consts_only walks only code */
  int immortalize = !(s->flags.consts_only && s->g.parent[idx] == TL_NO_PARENT);
  outcome_t o = O_ALREADY;
  int rc;
  Py_BEGIN_CRITICAL_SECTION(op);
  rc = expand_some(s, op, idx, k, budget);
  if (rc == 1 && immortalize) o = make_immortal(op);
  Py_END_CRITICAL_SECTION();
  if (rc <= 0 || !immortalize) return rc;
  loc_t l = {idx, NULL, NULL};
  return outcome_done(s, o, l) < 0 ? -1 : 1;
}

/* Walks until `budget` units were spent (an item or object expanded, an object reached: ~30 ns
 * each on the 2-core VM) or the walk ended: 1 ended, 0 not yet, -1 error. */
static int share_steps(share_t* s, Py_ssize_t budget) {
  while (budget > 0) {
    if (s->cur < 0) {
      if (!s->g.sp) return 1;
      s->cur = s->g.stack[--s->g.sp];
      s->pos = 0;
    }
    int r = share_some(s, &budget);
    if (r < 0) return -1;
    if (r == 1) s->cur = -1;
  }
  return s->cur < 0 && !s->g.sp;
}

/* The objects from the root to objs[idx], then `extra` (n of them, NULLs skipped): a new
 * tuple. */
static PyObject* chain_of(const graph_t* g, uint32_t idx, PyObject* const* extra, int n) {
  Py_ssize_t len = 1;
  for (uint32_t i = idx; g->parent[i] != TL_NO_PARENT; i = g->parent[i]) len++;
  Py_ssize_t tail = 0;
  for (int k = 0; k < n; k++) tail += extra[k] != NULL;
  PyObject* t = PyTuple_New(len + tail);
  if (!t) return NULL;
  for (int k = n - 1; k >= 0; k--)
    if (extra[k]) PyTuple_SET_ITEM(t, len + --tail, Py_NewRef(extra[k]));
  for (uint32_t i = idx;; i = g->parent[i]) {
    PyTuple_SET_ITEM(t, --len, Py_NewRef(g->objs[i]));
    if (g->parent[i] == TL_NO_PARENT) break;
  }
  return t;
}

static PyObject* share_result(share_t* s, int collected) {
  PyObject* skipped = PyDict_New();
  PyObject* examples = PyDict_New();
  PyObject* out = NULL;
  if (!skipped || !examples) goto done;
  for (int r = 0; r < R_COUNT; r++) {
    if (!s->counts[r]) continue;
    PyObject* c = PyLong_FromSsize_t(s->counts[r]);
    if (!c || PyDict_SetItemString(skipped, reason_names[r], c) < 0) {
      Py_XDECREF(c);
      goto done;
    }
    Py_DECREF(c);
    PyObject* lst = PyList_New(0);
    if (!lst || PyDict_SetItemString(examples, reason_names[r], lst) < 0) {
      Py_XDECREF(lst);
      goto done;
    }
    Py_DECREF(lst);
    for (Py_ssize_t i = 0; i < s->nex[r]; i++) {
      PyObject* extra[2] = {s->ex[r][i].mid, s->ex[r][i].obj};
      PyObject* ch = chain_of(&s->g, s->ex[r][i].idx, extra, 2);
      if (!ch || PyList_Append(lst, ch) < 0) {
        Py_XDECREF(ch);
        goto done;
      }
      Py_DECREF(ch);
    }
  }
  out = Py_BuildValue("{s:n,s:n,s:n,s:n,s:O,s:O,s:O}", "made_immortal", s->made, "bytes",
                      s->bytes, "already_immortal", s->already, "visited", s->g.n + s->leaves,
                      "skipped", skipped, "examples", examples, "collected",
                      collected ? Py_True : Py_False);
done:
  Py_XDECREF(skipped);
  Py_XDECREF(examples);
  return out;
}

static void share_free(share_t* s) {
  for (int r = 0; r < R_COUNT; r++) {
    for (Py_ssize_t i = 0; i < s->nex[r]; i++) loc_drop(&s->ex[r][i]);
    PyMem_RawFree(s->ex[r]);
  }
  for (Py_ssize_t i = 0; i < s->nretry; i++) loc_drop(&s->retry[i]);
  PyMem_RawFree(s->retry);
  graph_free(&s->g);
  sizeof_cache_clear(&s->sizes);
}

/* Sets up a walk from obj: 0, or -1 with an exception (share_free cleans up either way). */
static int share_start(share_t* s, core_state* st, PyObject* obj, walk_flags_t flags,
                       int examples) {
  memset(s, 0, sizeof *s);
  s->flags = flags;
  s->py_class_dealloc = st->py_class_dealloc;
  s->examples = examples < 0 ? 0 : examples;
  s->g.leaf = share_leaf;
  s->g.leaf_ctx = s;
  s->cur = -1;
  return graph_add(&s->g, obj, TL_NO_PARENT) < 0 ? -1 : 0;
}

/* After the walk: the objects of other threads and queued merges retried (after a collection
 * when `collect`), and the report. NULL with an exception. */
static PyObject* share_finish(share_t* s, int collect) {
  int collected = 0;
  if (s->nretry) {
    /* Owners that exited, and queued merges: a collection hands the first's memory back
     * (their objects become unowned) and performs the second. */
    if (collect) {
      if (PyGC_Collect() < 0 && PyErr_Occurred()) return NULL;
      collected = 1;
    }
    s->in_retry = 1;
    for (Py_ssize_t i = 0; i < s->nretry; i++) {
      PyObject* op = loc_object(s, s->retry[i]);
      kind_t k = classify(op, s->py_class_dealloc);
      outcome_t o;
      if (kind_mutable(k)) {
        Py_BEGIN_CRITICAL_SECTION(op);
        o = make_immortal(op);
        Py_END_CRITICAL_SECTION();
      } else {
        o = make_immortal(op);
      }
      if (outcome_done(s, o, s->retry[i]) < 0) return NULL;
    }
    for (Py_ssize_t i = 0; i < s->nretry; i++) loc_drop(&s->retry[i]);
    s->nretry = 0;
  }
  return share_result(s, collected);
}

static PyObject* share_walk(PyObject* module, PyObject* obj, walk_flags_t flags, int collect,
                            int examples) {
  core_state* st = state_of(module);
  if (st->share_refusal) return share_refused(st);
  share_t s;
  PyObject* out = NULL;
  if (share_start(&s, st, obj, flags, examples) == 0 && share_steps(&s, PY_SSIZE_T_MAX) == 1)
    out = share_finish(&s, collect);
  share_free(&s);
  return out;
}

PyObject* tl_py_share_code(PyObject* module, PyObject* code) {
  if (!PyCode_Check(code)) {
    PyErr_Format(PyExc_TypeError, "share_code() takes a code object, not %.100s",
                 Py_TYPE(code)->tp_name);
    return NULL;
  }
  /* The constants only: nested code objects are walked, not made immortal (CPython 3.13 does
   * that itself for code objects, which have deferred reference counts, once a second thread
   * starts); no collection (an import must stay cheap), no examples. */
  walk_flags_t f = {0, 0, 0, 1, 0, 1};
  PyObject* r = share_walk(module, code, f, 0, 0);
  if (!r) return NULL;
  PyObject* made = PyDict_GetItemString(r, "made_immortal"); /* borrowed */
  PyObject* out = made ? Py_NewRef(made) : NULL;
  Py_DECREF(r);
  return out;
}

// ---------------------------------------------------------------------------------------------
// ShareWalk: share() in steps, for work done while a thread would otherwise wait
// ---------------------------------------------------------------------------------------------
/* The same walk as share(), run by step(budget) calls: the DataLoader's replicate="share" makes
 * a dataset immortal in the consumer's idle time after the first batch instead of before it (a
 * 500,000-record dataset took ~60 ms to walk on the 2-core VM, twice the first batch without
 * it). Between two steps the graph's containers are held (strong references) and the objects
 * made immortal stay so; other threads may read the data meanwhile (the walk's rules above), and
 * objects are made immortal by the thread that calls step(): those of other live threads are
 * skipped as in share(). One thread at a time: a step() that finds another running raises
 * (critical sections may be suspended while a step waits for a container's, so they cannot
 * guard the walk's own state). */

typedef struct {
  PyObject_HEAD
  share_t s;
  int collect;
  int started;      /* s is set up (share_start succeeded) */
  int busy;         /* a step() is running; atomic */
  PyObject* result; /* the report's dict once the walk ended */
} ShareWalkObject;

static PyObject* sharewalk_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"obj", "modules", "classes", "functions", "code", "extensions",
                           "collect", "examples", NULL};
  PyObject* obj;
  walk_flags_t f = {0, 0, 0, 0, 0, 0};
  int collect = 1, examples = 3;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$ppppppi:ShareWalk", kwlist, &obj,
                                   &f.modules, &f.classes, &f.functions, &f.code, &f.extensions,
                                   &collect, &examples))
    return NULL;
  PyObject* module = PyType_GetModule(type); /* borrowed */
  if (!module) return NULL;
  core_state* st = state_of(module);
  if (st->share_refusal) return share_refused(st);
  ShareWalkObject* self = (ShareWalkObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->collect = collect;
  int rc = share_start(&self->s, st, obj, f, examples);
  self->started = 1; /* share_free cleans up a failed start too */
  if (rc < 0) {
    Py_DECREF(self);
    return NULL;
  }
  return (PyObject*)self;
}

static PyObject* sharewalk_step(PyObject* op_self, PyObject* arg) {
  ShareWalkObject* self = (ShareWalkObject*)op_self;
  Py_ssize_t budget = PyLong_AsSsize_t(arg);
  if (budget == -1 && PyErr_Occurred()) return NULL;
  if (budget <= 0) budget = PY_SSIZE_T_MAX;
  int idle = 0;
  if (!_Py_atomic_compare_exchange_int(&self->busy, &idle, 1)) {
    PyErr_SetString(PyExc_RuntimeError, "ShareWalk.step: another thread is running a step");
    return NULL;
  }
  PyObject* out = NULL;
  if (self->result) {
    out = Py_NewRef(Py_True);
  } else if (!self->started) {
    PyErr_SetString(PyExc_RuntimeError, "ShareWalk.step: the walk was closed");
  } else {
    int r = share_steps(&self->s, budget);
    if (r == 0) {
      out = Py_NewRef(Py_False);
    } else {
      if (r == 1 && (self->result = share_finish(&self->s, self->collect)))
        out = Py_NewRef(Py_True);
      /* the report is made, or the walk failed (its exception is raised; a retry could count
       * objects twice): either way the graph's references go */
      share_free(&self->s);
      self->started = 0;
    }
  }
  _Py_atomic_store_int(&self->busy, 0);
  return out;
}

static PyObject* sharewalk_result(PyObject* op_self, PyObject* unused) {
  (void)unused;
  ShareWalkObject* self = (ShareWalkObject*)op_self;
  return Py_NewRef(self->result ? self->result : Py_None);
}

static PyObject* sharewalk_reached(PyObject* op_self, void* unused) {
  (void)unused;
  ShareWalkObject* self = (ShareWalkObject*)op_self;
  if (self->result) {
    PyObject* v = PyDict_GetItemString(self->result, "visited"); /* borrowed */
    return Py_NewRef(v ? v : Py_None);
  }
  return PyLong_FromSsize_t(self->started ? self->s.g.n + self->s.leaves : 0);
}

static int sharewalk_traverse(PyObject* op_self, visitproc visit, void* arg) {
  ShareWalkObject* self = (ShareWalkObject*)op_self;
  Py_VISIT(Py_TYPE(op_self));
  Py_VISIT(self->result);
  if (!self->started || _Py_atomic_load_int(&self->busy)) return 0;
  share_t* s = &self->s;
  for (Py_ssize_t i = 0; i < s->g.n; i++) Py_VISIT(s->g.objs[i]);
  for (Py_ssize_t i = 0; i < s->nretry; i++) {
    Py_VISIT(s->retry[i].mid);
    Py_VISIT(s->retry[i].obj);
  }
  for (int r = 0; r < R_COUNT; r++)
    for (Py_ssize_t i = 0; i < s->nex[r]; i++) {
      Py_VISIT(s->ex[r][i].mid);
      Py_VISIT(s->ex[r][i].obj);
    }
  return 0;
}

static int sharewalk_clear(PyObject* op_self) {
  ShareWalkObject* self = (ShareWalkObject*)op_self;
  if (self->started && !_Py_atomic_load_int(&self->busy)) {
    share_free(&self->s);
    self->started = 0;
  }
  Py_CLEAR(self->result);
  return 0;
}

static PyObject* sharewalk_close(PyObject* op_self, PyObject* unused) {
  (void)unused;
  ShareWalkObject* self = (ShareWalkObject*)op_self;
  if (_Py_atomic_load_int(&self->busy)) {
    PyErr_SetString(PyExc_RuntimeError, "ShareWalk.close: a step is running");
    return NULL;
  }
  if (self->started) {
    share_free(&self->s);
    self->started = 0;
  }
  Py_RETURN_NONE;
}

static void sharewalk_dealloc(PyObject* op_self) {
  PyTypeObject* tp = Py_TYPE(op_self);
  PyObject_GC_UnTrack(op_self);
  sharewalk_clear(op_self);
  tp->tp_free(op_self);
  Py_DECREF(tp);
}

static PyMethodDef sharewalk_methods[] = {
    {"step", sharewalk_step, METH_O,
     "step(budget) -> bool: walks on until `budget` more units were spent (one per item or "
     "object looked at, one per object reached; <= 0: to the end); True once the walk ended "
     "and its report is made (result())."},
    {"result", sharewalk_result, METH_NOARGS,
     "The report's dict, as share() returns it, once step() returned True; else None."},
    {"close", sharewalk_close, METH_NOARGS,
     "Drops the walk (the objects made immortal so far stay so); step() then raises."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sharewalk_getset[] = {
    {"reached", sharewalk_reached, NULL, "objects reached so far", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot sharewalk_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)sharewalk_new},
    {Py_tp_dealloc, (void*)(uintptr_t)sharewalk_dealloc},
    {Py_tp_traverse, (void*)(uintptr_t)sharewalk_traverse},
    {Py_tp_clear, (void*)(uintptr_t)sharewalk_clear},
    {Py_tp_methods, sharewalk_methods},
    {Py_tp_getset, sharewalk_getset},
    {Py_tp_doc, "ShareWalk(obj, *, modules=False, classes=False, functions=False, code=False, "
                "extensions=False, collect=True, examples=3): threadloom.share(obj) in steps; "
                "see python/src/share.c."},
    {0, NULL},
};

// ---------------------------------------------------------------------------------------------
// RefProbe: who writes which shared reference count
// ---------------------------------------------------------------------------------------------
/* A probe holds the graphs walked from the roots given to add() and, per object, the count
 * part of ob_ref_shared when it was added (`base`) and at the last sample (`last`). sample()
 * reads every mortal object's ob_ref_shared once, detached from the interpreter, counting
 * `moves` (the value changed since the last sample: another thread took or dropped a reference
 * in between) and `held` (it differs from base: another thread held a reference then). Only
 * threads that do not own an object write ob_ref_shared (its owner counts in ob_ref_local), so
 * both count other threads' traffic on that object. Increments and decrements between two
 * samples cancel, so the counts are samples of the traffic, not its total. Threads: add(),
 * results() and chain() on the thread that made the probe; sample() on any one thread at a time
 * (contention()'s sampler), never during add(), which may grow the arrays it reads. */

typedef struct {
  PyObject_HEAD
  graph_t g;
  Py_ssize_t* base;     /* per object: ob_ref_shared when added */
  Py_ssize_t* last;     /* at the last sample */
  uint32_t* moves;
  uint32_t* held;
  Py_ssize_t cap;       /* of the four arrays */
  Py_ssize_t samples;   /* passes made */
  destructor py_class_dealloc;
} RefProbeObject;

static PyObject* refprobe_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  if (!PyArg_ParseTuple(args, ":RefProbe") || (kwargs && PyDict_GET_SIZE(kwargs))) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "RefProbe() takes no arguments");
    return NULL;
  }
  PyObject* module = PyType_GetModule(type);
  if (!module) return NULL;
  core_state* st = state_of(module);
  RefProbeObject* self = (RefProbeObject*)type->tp_alloc(type, 0);
  if (!self) return NULL;
  self->py_class_dealloc = st->py_class_dealloc;
  return (PyObject*)self;
}

static int refprobe_grow(RefProbeObject* self) {
  if (self->g.n <= self->cap) return 0;
  Py_ssize_t cap = self->g.cap;
  void* p;
#define TL_GROW(field)                                                     \
  if (!(p = PyMem_RawRealloc(self->field, (size_t)cap * sizeof *self->field))) \
    goto nomem;                                                             \
  self->field = p;
  TL_GROW(base) TL_GROW(last) TL_GROW(moves) TL_GROW(held)
#undef TL_GROW
  self->cap = cap;
  return 0;
nomem:
  PyErr_NoMemory();
  return -1;
}

/* The count part of ob_ref_shared: its flag bits change once when another thread first reads
 * the object through a dict or list (_Py_REF_MAYBE_WEAKREF) or queues a merge, not per
 * reference. */
static inline Py_ssize_t shared_field(PyObject* op) {
  return Py_ARITHMETIC_RIGHT_SHIFT(Py_ssize_t, _Py_atomic_load_ssize_relaxed(&op->ob_ref_shared),
                                   _Py_REF_SHARED_SHIFT);
}

static PyObject* refprobe_add(PyObject* op_self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"root", "modules", "classes", "functions", "code", "extensions", NULL};
  RefProbeObject* self = (RefProbeObject*)op_self;
  PyObject* root;
  walk_flags_t f = {0, 0, 0, 0, 0, 0};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$ppppp:add", kwlist, &root, &f.modules,
                                   &f.classes, &f.functions, &f.code, &f.extensions))
    return NULL;
  Py_ssize_t first = self->g.n;
  if (graph_add(&self->g, root, TL_NO_PARENT) < 0) return NULL;
  while (self->g.sp) {
    uint32_t idx = self->g.stack[--self->g.sp];
    PyObject* op = self->g.objs[idx];
    kind_t k = classify(op, self->py_class_dealloc);
    if (self->g.parent[idx] != TL_NO_PARENT && !kind_included(k, &f)) continue;
    int rc;
    if (kind_mutable(k)) {
      Py_BEGIN_CRITICAL_SECTION(op);
      rc = expand(&self->g, op, idx, k, 0);
      Py_END_CRITICAL_SECTION();
    } else {
      rc = expand(&self->g, op, idx, k, 0);
    }
    if (rc < 0) return NULL;
  }
  if (refprobe_grow(self) < 0) return NULL;
  for (Py_ssize_t i = first; i < self->g.n; i++) {
    self->base[i] = self->last[i] = shared_field(self->g.objs[i]);
    self->moves[i] = self->held[i] = 0;
  }
  return PyLong_FromSsize_t(self->g.n - first);
}

static PyObject* refprobe_sample(PyObject* op_self, PyObject* unused) {
  (void)unused;
  RefProbeObject* self = (RefProbeObject*)op_self;
  struct timespec t0, t1;
  Py_ssize_t n = self->g.n;
  Py_BEGIN_ALLOW_THREADS
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject* op = self->g.objs[i];
    if (_Py_atomic_load_uint32_relaxed(&op->ob_ref_local) == _Py_IMMORTAL_REFCNT_LOCAL) continue;
    Py_ssize_t v = shared_field(op);
    if (v != self->last[i]) {
      self->moves[i]++;
      self->last[i] = v;
    }
    if (v != self->base[i]) self->held[i]++;
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  Py_END_ALLOW_THREADS
  self->samples++;
  return PyFloat_FromDouble((double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9);
}

static PyObject* refprobe_results(PyObject* op_self, PyObject* unused) {
  (void)unused;
  RefProbeObject* self = (RefProbeObject*)op_self;
  PyObject* out = PyList_New(0);
  if (!out) return NULL;
  for (Py_ssize_t i = 0; i < self->g.n; i++) {
    if (!self->moves[i] && !self->held[i]) continue;
    PyObject* row = Py_BuildValue("(nII)", i, (unsigned)self->moves[i], (unsigned)self->held[i]);
    if (!row || PyList_Append(out, row) < 0) {
      Py_XDECREF(row);
      Py_DECREF(out);
      return NULL;
    }
    Py_DECREF(row);
  }
  return out;
}

static PyObject* refprobe_chain(PyObject* op_self, PyObject* arg) {
  RefProbeObject* self = (RefProbeObject*)op_self;
  Py_ssize_t i = PyLong_AsSsize_t(arg);
  if (i == -1 && PyErr_Occurred()) return NULL;
  if (i < 0 || i >= self->g.n) {
    PyErr_SetString(PyExc_IndexError, "RefProbe.chain: no such object index");
    return NULL;
  }
  return chain_of(&self->g, (uint32_t)i, NULL, 0);
}

static PyObject* refprobe_contains(PyObject* op_self, PyObject* arg) {
  RefProbeObject* self = (RefProbeObject*)op_self;
  return PyBool_FromLong(visited_has(&self->g.seen, arg));
}

static PyObject* refprobe_get(PyObject* op_self, void* which) {
  RefProbeObject* self = (RefProbeObject*)op_self;
  return PyLong_FromSsize_t(which ? self->samples : self->g.n);
}

static int refprobe_traverse(PyObject* op_self, visitproc visit, void* arg) {
  RefProbeObject* self = (RefProbeObject*)op_self;
  Py_VISIT(Py_TYPE(op_self));
  for (Py_ssize_t i = 0; i < self->g.n; i++) Py_VISIT(self->g.objs[i]);
  return 0;
}

static int refprobe_clear(PyObject* op_self) {
  RefProbeObject* self = (RefProbeObject*)op_self;
  graph_free(&self->g);
  PyMem_RawFree(self->base);
  PyMem_RawFree(self->last);
  PyMem_RawFree(self->moves);
  PyMem_RawFree(self->held);
  self->base = self->last = NULL;
  self->moves = self->held = NULL;
  self->cap = 0;
  return 0;
}

static void refprobe_dealloc(PyObject* op_self) {
  PyTypeObject* tp = Py_TYPE(op_self);
  PyObject_GC_UnTrack(op_self);
  refprobe_clear(op_self);
  tp->tp_free(op_self);
  Py_DECREF(tp);
}

static PyMethodDef refprobe_methods[] = {
    {"add", (PyCFunction)(void (*)(void))refprobe_add, METH_VARARGS | METH_KEYWORDS,
     "add(root, *, modules=False, classes=False, functions=False, code=False, extensions=False) "
     "-> int: walks the graph below root as share() would (without changing it) and adds the "
     "objects not seen yet, recording their ob_ref_shared now; returns how many."},
    {"sample", refprobe_sample, METH_NOARGS,
     "Reads every mortal object's ob_ref_shared once, detached from the interpreter; returns "
     "the pass's seconds."},
    {"results", refprobe_results, METH_NOARGS,
     "[(index, moves, held)] for the objects whose shared count was seen to move or differ."},
    {"chain", refprobe_chain, METH_O,
     "chain(index) -> tuple of the objects from its root down to object `index`."},
    {"contains", refprobe_contains, METH_O, "Whether the object was reached."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef refprobe_getset[] = {
    {"objects", refprobe_get, NULL, "objects reached", (void*)0},
    {"samples", refprobe_get, NULL, "passes made by sample()", (void*)1},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot refprobe_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)refprobe_new},
    {Py_tp_dealloc, (void*)(uintptr_t)refprobe_dealloc},
    {Py_tp_traverse, (void*)(uintptr_t)refprobe_traverse},
    {Py_tp_clear, (void*)(uintptr_t)refprobe_clear},
    {Py_tp_methods, refprobe_methods},
    {Py_tp_getset, refprobe_getset},
    {Py_tp_doc, "RefProbe(): samples the shared reference-count field of the objects below the "
                "roots given to add(), for threadloom.contention(); see python/src/share.c."},
    {0, NULL},
};

#else /* a GIL build: share() and contention() refuse, saying why (see tl_py_share_init) */

PyObject* tl_py_share_code(PyObject* module, PyObject* code) {
  (void)code;
  return share_refused(state_of(module));
}

typedef struct {
  PyObject_HEAD
} RefProbeObject;

static PyObject* refprobe_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  (void)type;
  (void)args;
  (void)kwargs;
  PyErr_SetString(PyExc_NotImplementedError,
                  "threadloom.contention: this interpreter has the GIL (one reference count "
                  "field per object, no contention to find): use a free-threaded one (3.13t)");
  return NULL;
}

static PyType_Slot refprobe_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)refprobe_new},
    {Py_tp_doc, "RefProbe(): free-threaded builds only."},
    {0, NULL},
};

typedef struct {
  PyObject_HEAD
} ShareWalkObject;

static PyObject* sharewalk_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  (void)args;
  (void)kwargs;
  PyObject* module = PyType_GetModule(type);
  return module ? share_refused(state_of(module)) : NULL;
}

static PyType_Slot sharewalk_slots[] = {
    {Py_tp_new, (void*)(uintptr_t)sharewalk_new},
    {Py_tp_doc, "ShareWalk(obj, ...): free-threaded builds only."},
    {0, NULL},
};
#endif /* Py_GIL_DISABLED */

PyType_Spec tl_py_refprobe_spec = {
    .name = "threadloom._core.RefProbe",
    .basicsize = sizeof(RefProbeObject),
#if defined(Py_GIL_DISABLED)
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
#else
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
#endif
    .slots = refprobe_slots,
};

PyType_Spec tl_py_sharewalk_spec = {
    .name = "threadloom._core.ShareWalk",
    .basicsize = sizeof(ShareWalkObject),
#if defined(Py_GIL_DISABLED)
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
#else
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
#endif
    .slots = sharewalk_slots,
};
