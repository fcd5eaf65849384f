"""The GIL guard: notice when an extension turns the GIL back on, and name it.

On a free-threaded CPython (3.13t), importing an extension module that does not declare the
``Py_mod_gil`` slot turns the GIL on for the whole process, for good, with a RuntimeWarning
that is easy to miss; from then on threads no longer run Python in parallel. ``install(policy)``
makes that visible:

  forbid  the import stops the program (``GILEnabledError``, a ``SystemExit`` with status 1)
          with one message naming the module, where it was imported and what to do; a
          program that catches it (``except BaseException``, ``contextlib.suppress``) is
          stopped where it would go on (see ``_stop_if_swallowed``);
  warn    one line on stderr naming the module; the program goes on with the GIL on;
  allow   silent.

Mechanism, and why: the extension loader (``importlib``'s ExtensionFileLoader) calls
``_imp.create_dynamic(spec)`` for every extension module, looking the function up on the
``_imp`` module at each call. The guard wraps it and compares ``sys._is_gil_enabled()`` before
and after: the GIL, once turned on this way, never goes off again, so the first load after which
it is on is the culprit, whatever the warning filters say (libraries often silence warnings
around imports, and ``warnings.resetwarnings()`` drops any filter we add). CPython's own warning
is filtered out, since the guard's message replaces it. The filter matches by message prefix
with a tiny matcher object instead of a regex, so installing the guard imports neither
``warnings`` nor ``re`` (the launcher's start-up budget). Limits: two threads loading
extensions for the first time at the same moment can get the blame swapped; a GIL already on
when the guard is installed (a .pth file, sitecustomize) is reported without a module name.

The guard uses only builtin modules, so the launcher loads this file before ``threadloom``
itself (whose ``_core`` pulls in the C runtime). ``PYTHON_GIL=1`` / ``-X gil=1`` (the user asked
for the GIL) is reported once, never refused; ``PYTHON_GIL=0`` keeps the GIL off, so there is
nothing to guard.
"""

import _imp
import _thread
import sys

POLICIES = ("forbid", "warn", "allow")
_CPYTHON_WARNING = "The global interpreter lock (GIL) has been enabled to load module"


class GILEnabledError(SystemExit):
    """Raised (under ``--gil=forbid``) by the import that turned the GIL on. A SystemExit, so
    ``except Exception`` / ``except ImportError`` fallbacks cannot swallow it and leave the
    process running with the GIL; ``finally`` blocks and atexit handlers still run. ``module``
    is the module's name (None when unknown), ``where`` the importing file:line."""

    def __init__(self, message, module=None, where=None):
        super().__init__(message)
        self.module = module
        self.where = where


class _Prefix:
    """A warnings-filter message matcher: the C warnings code calls ``.match(text)``."""

    def __init__(self, prefix):
        self.prefix = prefix

    def match(self, text):
        return text.startswith(self.prefix)

    def __repr__(self):
        return "threadloom.gilguard._Prefix(%r)" % (self.prefix,)


_lock = _thread.allocate_lock()  # guards _state
_state = {"policy": None, "reported": False, "main": None, "origin": "threadloom", "real": None,
          "module": None,        # the module the guard saw turn the GIL on
          "turns_warned": False}  # warn_if_gil_on() has warned


class GILWarning(RuntimeWarning):
    """Threads that would run Python in parallel take turns: the GIL is on (warn_if_gil_on)."""


def is_free_threaded():
    """True on a free-threaded build (whether or not the GIL is on right now)."""
    if hasattr(sys, "abiflags"):
        return "t" in sys.abiflags
    import sysconfig
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def gil_build_message():
    """The sentence a GIL build is refused with."""
    return ("threadloom: %s is a Python %d.%d built with the GIL, and threadloom needs a "
            "free-threaded one (3.13t or later, configured with --disable-gil): run "
            "scripts/bootstrap.sh in the threadloom sources, which builds one into "
            "~/.cache/threadloom, or install a python3.13t package"
            % (sys.executable or "this interpreter", sys.version_info[0], sys.version_info[1]))


def policy():
    """The installed policy, or None when the guard is not installed."""
    return _state["policy"]


def warn_if_gil_on(what, threads, stacklevel=1):
    """Warns once per process (a GILWarning) when `what` is about to run Python on `threads`
    threads while the GIL is on, since they then take turns: says why it is on and what to do.
    Returns True when this call warned. Safe from any thread; stacklevel as warnings.warn's,
    counted from the caller."""
    if is_free_threaded() and not sys._is_gil_enabled():
        return False
    with _lock:
        if _state["turns_warned"]:
            return False
        _state["turns_warned"] = True
    if not is_free_threaded():
        why = ("this is Python %d.%d built with the GIL (%s)"
               % (sys.version_info[0], sys.version_info[1], sys.executable or "?"))
        todo = "run it on a free-threaded Python (3.13t or later: python3.13t)"
    elif getattr(sys.flags, "gil", None) == 1:
        why = "PYTHON_GIL=1 or -X gil=1 turned the GIL on"
        todo = "unset it"
    elif _state["module"] is not None:
        why = "importing %r, which does not declare Py_mod_gil, turned the GIL on" % _state["module"]
        todo = "leave that module out, or ask its authors to declare Py_mod_gil"
    else:
        why = "an extension module without Py_mod_gil turned the GIL on"
        todo = ("find it with `threadloom run --gil=warn` (it names the module) or "
                "`python -X importtime`, and leave it out")
    import warnings
    warnings.warn("%s: the GIL is on, so its %d thread%s take turns running Python instead of "
                  "running in parallel: %s; to get parallel threads, %s"
                  % (what, threads, "s" if threads != 1 else "", why, todo),
                  GILWarning, stacklevel=stacklevel + 1)
    return True


def _where():
    """file:line of the innermost frame outside importlib and this file."""
    try:
        f = sys._getframe(2)
    except ValueError:
        return None
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith("<frozen importlib") and name != __file__:
            return "%s:%d" % (name, f.f_lineno)
        f = f.f_back
    return None


def _report(module, origin, where):
    """Applies the policy once per process. Returns the exception to raise, or None."""
    with _lock:
        if _state["reported"]:
            return None
        _state["reported"] = True
        _state["module"] = module
        pol = _state["policy"]
    if pol == "allow":
        return None
    if module is None:
        what = "the GIL was already on when threadloom started (an extension imported by a .pth " \
               "file, sitecustomize or PYTHONSTARTUP lacks Py_mod_gil)"
        todo = "find it with `python -X importtime`, and"
    else:
        what = "module %r%s%s does not declare Py_mod_gil, so importing it turned the GIL on for " \
               "the whole process" % (module, " (%s)" % origin if origin else "",
                                      ", imported at %s," % where if where else "")
        todo = "ask its authors to declare Py_mod_gil (Py_MOD_GIL_NOT_USED) once it is thread-safe, or"
    if pol == "warn":
        sys.stderr.write("threadloom: warning: %s and threads no longer run Python in parallel; "
                         "%s run with --gil=allow to silence this\n" % (what, todo))
        return None
    msg = ("threadloom: %s (--gil=forbid stops here); %s run with --gil=warn to go on with "
           "the GIL on" % (what, todo))
    if _thread.get_ident() != _state["main"]:
        # A SystemExit would end only this thread, and the process would run on with the GIL:
        # stop the process instead (finally blocks and atexit handlers do not run).
        import os
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        os._exit(1)
    return GILEnabledError(msg, module, where)


def _handling(exc):
    """True while the calling thread is inside a handler of `exc` (or of one it led to)."""
    cur = sys.exception()
    while cur is not None:
        if cur is exc:
            return True
        cur = cur.__context__
    return False


def _stop_if_swallowed(err):
    """Makes a caught GILEnabledError stop the program anyway.

    GILEnabledError is a SystemExit so that ``except Exception`` cannot swallow it; ``except
    BaseException`` and ``contextlib.suppress(BaseException)`` still can, and the program would
    then go on with the GIL on, quietly. So once it is raised, sys.monitoring (used only from
    this point: it costs nothing before) records every frame that enters a handler for it
    (EXCEPTION_HANDLED) and watches the lines of those frames: a handler that re-raises (a
    ``finally``, a ``with`` whose ``__exit__`` returns False, ``except ...: raise``) leaves its
    frame without running another line of it, but a frame that runs a line while no longer
    handling the error has swallowed it, and the process stops there: one line on stderr, exit
    status 1 (``os._exit``: the program already showed it would not stop by itself). Where no
    tool id is free (a debugger or profiler holds all six), the message is written at once, so
    the GIL never comes back quietly."""
    mon = getattr(sys, "monitoring", None)
    # Frames that entered a handler of err (kept alive: the process is ending), each with the
    # lines its handlers start on: the cleanup a `with` or `finally` runs before re-raising is on
    # those lines, and may run after the error stopped being the handled one.
    frames = []  # [frame, set of handler lines, the next line event opens a handler]
    tool = None
    if mon is not None:
        for t in range(6):
            try:
                mon.use_tool_id(t, "threadloom-gilguard")
            except ValueError:
                continue
            tool = t
            break

    def die(where):
        sys.stderr.write("threadloom: the program caught GILEnabledError%s and would go on with the "
                         "GIL on; --gil=forbid stops it (exit status 1)\n%s\n"
                         % (" at %s" % where if where else "", err.code))
        sys.stderr.flush()
        import os
        os._exit(1)

    if tool is not None:
        E = mon.events

        def on_handled(code, offset, exc):
            if exc is err or (isinstance(exc, BaseException) and err is exc.__context__):
                f = sys._getframe(1)
                for entry in frames:
                    if entry[0] is f:
                        break
                else:
                    entry = [f, set(), False]
                    frames.append(entry)
                    mon.set_local_events(tool, code, mon.get_local_events(tool, code) | E.LINE)
                entry[1].add(f.f_lineno)
                entry[2] = True

        def on_line(code, line):
            f = sys._getframe(1)
            for entry in frames:
                if entry[0] is f:
                    if entry[2]:
                        entry[1].add(line)
                        entry[2] = False
                    elif line not in entry[1] and not _handling(err):
                        die("%s:%d" % (code.co_filename, line))
                    return

        mon.register_callback(tool, E.EXCEPTION_HANDLED, on_handled)
        mon.register_callback(tool, E.LINE, on_line)
        mon.set_events(tool, E.EXCEPTION_HANDLED)

    else:
        # Nothing can watch: at least never be quiet about it.
        sys.stderr.write("%s\n" % err.code)
        return

    import atexit

    def at_exit():
        # Registered when the error was raised, so it runs before every exit hook registered
        # until then (atexit is LIFO): their lines are not watched.
        mon.set_events(tool, 0)
        mon.register_callback(tool, E.LINE, None)
        mon.register_callback(tool, E.EXCEPTION_HANDLED, None)
        mon.free_tool_id(tool)

    atexit.register(at_exit)


def _create_dynamic(spec, *args):
    before = sys._is_gil_enabled()
    try:
        return _state["real"](spec, *args)
    finally:
        if not before and sys._is_gil_enabled():
            err = _report(getattr(spec, "name", None), getattr(spec, "origin", None), _where())
            if err is not None:
                _stop_if_swallowed(err)
                raise err


def install(policy="forbid", origin="threadloom"):
    """Installs the guard with `policy` ("forbid", "warn" or "allow"); a second call changes
    the policy. Call it on the main thread before user code. Raises ValueError for another
    policy, SystemExit (gil_build_message()) on a GIL build, and GILEnabledError when the GIL is
    already on under "forbid"."""
    if policy not in POLICIES:
        raise ValueError("policy must be one of %s, not %r" % (", ".join(POLICIES), policy))
    if not is_free_threaded():
        raise SystemExit(gil_build_message())
    with _lock:
        first = _state["policy"] is None
        _state["policy"] = policy
        _state["origin"] = origin
        if first:
            _state["main"] = _thread.get_ident()
            _state["real"] = _imp.create_dynamic
            _imp.create_dynamic = _create_dynamic
            import _warnings
            _warnings.filters.insert(0, ("ignore", _Prefix(_CPYTHON_WARNING), RuntimeWarning, None, 0))
            if hasattr(_warnings, "_filters_mutated"):
                _warnings._filters_mutated()
    if not first or not sys._is_gil_enabled():
        return
    if getattr(sys.flags, "gil", None) == 1:
        with _lock:
            _state["reported"] = True
        if policy != "allow":
            sys.stderr.write("threadloom: note: the GIL is on because PYTHON_GIL=1 or -X gil=1 asked "
                             "for it; unset it to run threads in parallel\n")
        return
    err = _report(None, None, None)
    if err is not None:
        raise err
