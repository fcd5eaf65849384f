"""threadloom.share(): read-only data that every thread reads without reference-count contention.

On free-threaded CPython every object has an owner thread, which counts its references without
atomics; every other thread that takes a reference adds and subtracts atomically in a second
field, so a dict, list or string that several threads read moves its cache line between their
cores at every read and the threads stop scaling. An *immortal* object's reference count is
never written. ``share(obj)`` walks the objects below ``obj`` and makes each one immortal (the
interpreter's own mechanism: see python/src/share.c), so every thread reads them as it reads
``None``::

    VOCAB = load_vocabulary()
    report = threadloom.share(VOCAB)      # before the threads start
    print(report)                         # 50,001 objects made immortal, 3.2 MiB, for good

**Permanent.** An immortal object is never freed: the memory of everything share() made
immortal stays allocated until the process exits, even when nothing refers to it any more (and
its ``__del__`` and weak-reference callbacks never run).
Share data that lives as long as the process (vocabularies, lookup tables, a dataset), not
per-batch objects, and never in a loop.

What is walked: containers (tuple, list, dict keys and values, set, frozenset), str, bytes,
numbers, and plain instances (objects of classes defined with ``class``: their ``__dict__`` and
slots). Modules (their globals), classes (their attributes), functions (defaults, closures,
``__dict__``), code objects (constants) and C-extension objects are walked only when asked
(``modules=True`` ...), except ``obj`` itself, which is always walked. An object that another
thread owns is left alone (that thread's unsynchronised count could undo it): call share() on
the thread that built the data. share() retries those once after a ``gc.collect()``, which
hands the containers (lists, dicts, instances...) of threads that have exited over to nobody;
their strings and numbers keep the exited thread's id and stay unshared.

Mutating shared containers later is allowed and safe: an immortal dict, list or set is still a
normal container, changed under its own lock as before, so no update is lost and nothing
crashes. What a value put into it later is: an ordinary object, counted (and contended) as
usual until share() is called again; what a replaced or removed shared value is: kept forever.

``share_imports()`` (installed by ``import threadloom`` and by the ``threadloom`` launcher)
does the same to the constants of the code of every module imported afterwards, so a function
in a module scales as it does in the script. ``THREADLOOM_SHARE_IMPORTS=0`` or
``share_imports(False)`` turns it off.

On an interpreter built with the GIL there is no such contention: share() does nothing and its
report says so.
"""

import _thread
import os
import sys
import time

__all__ = ["ShareInSteps", "ShareReport", "imports_shared", "path_of", "share", "share_imports"]

ENV_IMPORTS = "THREADLOOM_SHARE_IMPORTS"

# reason -> what it means and what to do (the report prints it)
REASONS = {
    "other_thread": "owned by another thread, which counts its references without atomics (so "
                    "making them immortal from here could be undone: CPython gh-113956); call "
                    "share() on the thread that made them. A thread that has exited keeps "
                    "owning its strings, numbers and other non-container objects",
    "merge_pending": "a reference-count merge was queued for it; call share() again",
    "refused": "the interpreter refused (PyUnstable_SetImmortal)",
    "module": "modules, left out: pass modules=True to share their globals",
    "class": "classes, left out: pass classes=True to share their attributes",
    "function": "functions (and methods, cells, properties), left out: pass functions=True to "
                "share their defaults and closures",
    "code": "code objects, left out: pass code=True to share their constants",
    "extension": "C-extension objects, left out: pass extensions=True to share them too (only "
                 "for extension types that are safe to read from several threads)",
}


# Set by the launcher (interp/main.c), which loads this file before the package: _core is then
# loaded from this file by path at the first import the hook sees, not with the package.
_CORE_FILE = None
_core_lock = _thread.allocate_lock()  # one load of _core by path


def _core():
    """threadloom._core, also when this module was loaded by path before the package."""
    mod = sys.modules.get("threadloom._core")
    if mod is not None:
        return mod
    if _CORE_FILE is None:
        from threadloom import _core as mod
        return mod
    with _core_lock:
        mod = sys.modules.get("threadloom._core")
        if mod is None:
            import _frozen_importlib as boot
            import _frozen_importlib_external as ext
            spec = ext.spec_from_file_location("threadloom._core", _CORE_FILE)
            mod = boot.module_from_spec(spec)
            sys.modules["threadloom._core"] = mod
            spec.loader.exec_module(mod)
    return mod


class ShareReport:
    """What share() did. Attributes:

    made_immortal     objects made immortal by this call
    bytes             their size (sys.getsizeof summed): memory that is never freed
    already_immortal  objects reached that were immortal already (interned strings, small
                      ints, code constants, an earlier share())
    visited           objects reached: made_immortal + already_immortal + sum(skipped)
    skipped           {reason: count} of objects reached and left as they were; REASONS says
                      what each reason means
    examples          {reason: [(path, type name), ...]}, a few of each
    collected         whether a gc.collect() ran to retry objects of other threads
    seconds           the call's duration
    enabled           False when nothing could be done (a GIL build); note says why
    """

    def __init__(self, raw=None, root_name="obj", seconds=0.0, note=None):
        raw = raw or {}
        self.enabled = note is None
        self.note = note
        self.made_immortal = raw.get("made_immortal", 0)
        self.bytes = raw.get("bytes", 0)
        self.already_immortal = raw.get("already_immortal", 0)
        self.visited = raw.get("visited", 0)
        self.skipped = dict(raw.get("skipped", {}))
        self.collected = raw.get("collected", False)
        self.seconds = seconds
        self.examples = {reason: [(path_of(chain, root_name), type(chain[-1]).__qualname__)
                                  for chain in chains]
                         for reason, chains in raw.get("examples", {}).items()}

    def __repr__(self):
        if not self.enabled:
            return "ShareReport(enabled=False, note=%r)" % self.note
        return ("ShareReport(made_immortal=%d, bytes=%d, already_immortal=%d, visited=%d, "
                "skipped=%r)" % (self.made_immortal, self.bytes, self.already_immortal,
                                 self.visited, self.skipped))

    def __str__(self):
        if not self.enabled:
            return "threadloom.share: nothing done: %s" % self.note
        lines = ["threadloom.share: %s object(s) made immortal, %s, never freed (%s already "
                 "immortal, %s reached, %.3f s)" % (
                     format(self.made_immortal, ","), _size(self.bytes),
                     format(self.already_immortal, ","), format(self.visited, ","),
                     self.seconds)]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            ex = ", ".join("%s (%s)" % e for e in self.examples.get(reason, []))
            lines.append("  skipped %s: %s%s" % (format(n, ","), REASONS.get(reason, reason),
                                                  "; e.g. " + ex if ex else ""))
        return "\n".join(lines)


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "bytes" else ("%.1f %s" % (n, unit))
        n /= 1024.0


def share(obj, *, name=None, modules=False, classes=False, functions=False, code=False,
          extensions=False, collect=True, examples=3):
    """Makes the objects below ``obj`` immortal, for good (see the module's documentation);
    returns a ShareReport. ``name`` labels ``obj`` in the report's paths (default: the
    module's name for a module, else "obj"). Flags walk more kinds below ``obj``: ``modules``
    (globals), ``classes`` (attributes), ``functions`` (defaults, closures, ``__dict__``),
    ``code`` (constants), ``extensions`` (C-extension objects, through their tp_traverse).
    ``collect=False`` skips the gc.collect() that retries objects owned by other threads (the
    containers of threads that have exited become shareable). Raises NotImplementedError on a
    free-threaded interpreter whose object layout threadloom has not verified (the message
    names it)."""
    walk = ShareInSteps(obj, name=name, modules=modules, classes=classes, functions=functions,
                        code=code, extensions=extensions, collect=collect, examples=examples)
    walk.step(0)  # the whole walk in one step
    return walk.report


class ShareInSteps:
    """share(obj) done a slice at a time: ``step(budget)`` walks on until ``budget`` more
    units were spent (one per item or object looked at and one per object reached, about 30 ns
    each; <= 0: to the end) and returns True once the walk ended; ``report``
    is its ShareReport from then on (None before; ``seconds`` counts the steps' time only).
    Objects are made immortal by the thread that calls step() (those another live thread owns
    are skipped, as in share()); between steps the data may be read by any thread, and what was
    made immortal stays so if the walk is dropped (``close()``). One step at a time. The
    DataLoader's replicate="share" runs the walk in the consumer's idle time this way. On a GIL
    build the report is there at once, saying that nothing was done."""

    def __init__(self, obj, *, name=None, modules=False, classes=False, functions=False,
                 code=False, extensions=False, collect=True, examples=3):
        core = _core()
        ok, how = core.share_layout()
        if not ok and not _gil_build():
            raise NotImplementedError("threadloom.share: %s" % how)
        if name is None:
            name = obj.__name__ if type(obj).__name__ == "module" else "obj"
        self._name = name
        self._walk = None
        self._seconds = 0.0
        self.report = None
        if not ok:
            self.report = ShareReport(root_name=name, note=how)
            return
        t0 = time.perf_counter()
        self._walk = core.ShareWalk(obj, modules=modules, classes=classes, functions=functions,
                                    code=code, extensions=extensions, collect=collect,
                                    examples=examples)
        self._seconds = time.perf_counter() - t0

    @property
    def done(self):
        return self.report is not None

    @property
    def reached(self):
        """Objects reached so far (0 once an unfinished walk was closed)."""
        if self.report is not None:
            return self.report.visited
        return self._walk.reached if self._walk is not None else 0

    def step(self, budget):
        if self.report is not None:
            return True
        if self._walk is None:
            raise RuntimeError("ShareInSteps.step: the walk was closed")
        t0 = time.perf_counter()
        try:
            done = self._walk.step(budget)
        finally:
            self._seconds += time.perf_counter() - t0
        if done:
            raw, self._walk = self._walk.result(), None
            self.report = ShareReport(raw, root_name=self._name, seconds=self._seconds)
        return done

    def close(self):
        """Drops an unfinished walk (its references to the data go; the objects it made
        immortal stay so)."""
        if self._walk is not None:
            self._walk.close()
            self._walk = None


def _gil_build():
    """True on an interpreter built with the GIL (not a free-threaded one with the GIL on)."""
    import sysconfig
    return not sysconfig.get_config_var("Py_GIL_DISABLED")


# ------------------------------------------------------------------------------------------------
# Paths: the objects from a root down to an object -> "workload.VOCAB['the']"
# ------------------------------------------------------------------------------------------------

def _key_repr(k):
    r = repr(k)
    return r if len(r) <= 40 else r[:37] + "..."


def _step(parent, child, nxt):
    """The text of one step parent -> child; (text, skip): skip means `nxt` continues from
    parent's namespace (a module's or instance's __dict__, a class's dict)."""
    tname = type(parent).__name__
    if tname == "module" or isinstance(parent, type):
        ns = vars(parent)
        if child is ns or (isinstance(child, dict) and not isinstance(parent, type)
                           and child is getattr(parent, "__dict__", None)):
            return "", True
    if isinstance(parent, dict):
        for k, v in list(parent.items()):
            if v is child:
                return "[%s]" % _key_repr(k), False
        for k in list(parent):
            if k is child:
                return "{key %s}" % _key_repr(k), False
        return "[?]", False
    if isinstance(parent, (list, tuple)):
        for i, v in enumerate(list(parent)):
            if v is child:
                return "[%d]" % i, False
        return "[?]", False
    if isinstance(parent, (set, frozenset)):
        return "{%s}" % _key_repr(child), False
    if type(parent).__name__ == "code":
        if child is parent.co_consts:
            return ".co_consts", False
    if type(parent).__name__ == "function":
        for attr in ("__defaults__", "__kwdefaults__", "__closure__", "__dict__", "__code__"):
            if getattr(parent, attr, None) is child:
                return "." + attr, False
    if type(parent).__name__ == "cell":
        return ".cell_contents", False
    d = getattr(parent, "__dict__", None)
    if child is d:
        return "", True
    if isinstance(d, dict):
        for k, v in list(d.items()):
            if v is child:
                return ".%s" % k, False
    for cls in type(parent).__mro__:
        for slot in getattr(cls, "__slots__", ()) if isinstance(getattr(cls, "__slots__", ()),
                                                                 (tuple, list)) else ():
            if getattr(parent, slot, None) is child:
                return ".%s" % slot, False
    return " -> %s" % type(child).__name__, False


def path_of(chain, root_name="obj"):
    """A readable path for `chain`, the objects from a root down to an object (as share() and
    contention() report them): "workload.VOCAB['the']", "obj.records[12][1]". Steps it cannot
    name show the type reached ("-> Foo")."""
    out = [root_name]
    after_ns = False
    for i in range(1, len(chain)):
        parent, child = chain[i - 1], chain[i]
        text, skip = _step(parent, child, chain[i + 1] if i + 1 < len(chain) else None)
        if skip:
            after_ns = True
            continue
        if after_ns and text.startswith("[") and isinstance(parent, dict):
            k = text[1:-1]
            text = "." + (k[1:-1] if k[:1] in "'\"" else k)
        after_ns = False
        out.append(text)
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# Imported code like script code
# ------------------------------------------------------------------------------------------------
# CPython 3.13t makes the constants of the code it compiles for a script immortal, but not
# those of code compiled by the builtin compile() (importlib compiles a module's source with it)
# and, from .pyc files, only what marshal interns; see docs/design.md ("Shared data"). The hook
# wraps the get_code() of importlib's two file loaders (SourceLoader: .py, and .pyc found next
# to it or in __pycache__; SourcelessFileLoader: .pyc alone), which runpy uses for -m too, and
# makes the constants of each code object immortal before the module runs, on the importing
# thread, which owns them.

_lock = _thread.allocate_lock()  # guards _hook
_hook = {"on": False, "originals": None, "modules": 0, "constants": 0, "checked": False}


def _wrap(original):
    def get_code(self, fullname):
        code = original(self, fullname)
        if code is not None and _hook["on"]:
            core = _core()
            if _hook["checked"] or _check(core):
                n = core.share_code(code)
                with _lock:
                    _hook["modules"] += 1
                    _hook["constants"] += n
        return code
    get_code.__wrapped__ = original
    get_code.__doc__ = original.__doc__
    return get_code


def _check(core):
    """Whether share() works here (once); turns the hook off when it does not."""
    ok = core.share_layout()[0]
    with _lock:
        _hook["checked"] = ok
        if not ok:
            _hook["on"] = False
    return ok


def share_imports(enabled=True):
    """Turns the import hook on (the default once threadloom is imported) or off; returns
    whether it was on. On a GIL build, or an interpreter share() refuses, it stays off."""
    import _frozen_importlib_external as ext  # importlib._bootstrap_external: the file loaders
    if enabled and _CORE_FILE is None and not _check(_core()):
        return False
    with _lock:
        was = _hook["on"]
        if enabled and not was:
            if _hook["originals"] is None:
                _hook["originals"] = (ext.SourceLoader.get_code, ext.SourcelessFileLoader.get_code)
                ext.SourceLoader.get_code = _wrap(_hook["originals"][0])
                ext.SourcelessFileLoader.get_code = _wrap(_hook["originals"][1])
            _hook["on"] = True
        elif not enabled and was:
            _hook["on"] = False
            ext.SourceLoader.get_code, ext.SourcelessFileLoader.get_code = _hook["originals"]
            _hook["originals"] = None
    return was


def imports_shared():
    """{"on": bool, "modules": code objects seen, "constants": constants made immortal}."""
    with _lock:
        return {"on": _hook["on"], "modules": _hook["modules"], "constants": _hook["constants"]}


def enabled_by_env():
    """False when THREADLOOM_SHARE_IMPORTS is 0, off, false or no."""
    return os.environ.get(ENV_IMPORTS, "1").strip().lower() not in ("0", "off", "false", "no")


def install_from_env():
    """share_imports() unless THREADLOOM_SHARE_IMPORTS turns it off (import threadloom and the
    launchers call this); returns whether the hook is on."""
    if enabled_by_env():
        share_imports(True)
    return imports_shared()["on"]
