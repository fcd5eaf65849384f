"""The process-lifetime objects of threadloom: one registry, one exit hook, one abort.

Objects that own threads or communicators (an Executor's pool, a Pipeline's or a DataLoader
engine's threads, an spmd world, an NCCL communicator made through a cluster bootstrap)
register here when they start and unregister when they close:

    _runtime.register(self, close=Pipeline.close)                 # closed at interpreter exit
    _runtime.register(world, abort=lambda w, reason: w.abort(...))  # aborted by abort_all()

- At interpreter exit, before the threading module joins non-daemon threads (the moment
  ThreadPoolExecutor uses, through the same hook), every registered object's `close(obj)` runs,
  newest first, so no worker thread is left attached to the interpreter during finalisation.
- ``abort_all(reason)`` calls `abort(obj, reason)` on every registered object that has one: the
  cluster watchdog's "abort everything" when another node of the job failed, without this
  layer or the watchdog knowing which kinds of objects exist.

The registry holds its objects weakly: registering keeps nothing alive, and an object that is
collected without unregistering simply drops out. `close` and `abort` are plain functions of
the object (not bound methods, which would keep it alive).

Thread-safety: every function may be called from any thread. Invariant: `_entries` is read and
written under `_lock` only; `close` and `abort` run without it (they may register or
unregister other objects, or take their own locks).
"""

import threading
import weakref

_lock = threading.Lock()
_entries = {}      # id(obj) -> _Entry; under _lock
_order = 0         # registrations so far: each entry's place in registration order


class _Entry:
    __slots__ = ("ref", "close", "abort", "owner", "order")

    def __init__(self, ref, close, abort, owner, order):
        self.ref = ref          # weakref.ref to the object
        self.close = close      # close(obj) at exit, or None
        self.abort = abort      # abort(obj, reason) -> truthy when it aborted something, or None
        self.owner = owner      # what abort_all(owner=) selects (e.g. a Rendezvous), or None
        self.order = order


def register(obj, *, close=None, abort=None, owner=None):
    """Registers `obj` for the rest of its life (weakly). close: close(obj), called at
    interpreter exit if it is still registered. abort: abort(obj, reason), called by
    abort_all(). owner: a tag abort_all(owner=...) selects on. Registering an object again
    replaces its entry."""
    global _order
    if close is None and abort is None:
        raise TypeError("register(%r): give close= or abort= (or both)" % (obj,))
    ref = weakref.ref(obj)
    with _lock:
        _order += 1
        # drop the entries of objects collected without unregistering (their ids may be reused)
        for key in [k for k, e in _entries.items() if e.ref() is None]:
            del _entries[key]
        _entries[id(obj)] = _Entry(ref, close, abort, owner, _order)


def unregister(obj):
    """Forgets `obj` (no-op when it is not registered)."""
    with _lock:
        e = _entries.get(id(obj))
        if e is not None and e.ref() is obj:
            del _entries[id(obj)]


def _live(kind, owner=None):
    """[(obj, fn)] of the registered objects that have `kind` ("close" or "abort"), newest
    first; with owner, only the ones registered with that owner."""
    with _lock:
        entries = sorted(_entries.values(), key=lambda e: -e.order)
    out = []
    for e in entries:
        obj, fn = e.ref(), getattr(e, kind)
        if obj is not None and fn is not None and (owner is None or e.owner is owner):
            out.append((obj, fn))
    return out


def abort_all(reason, owner=None):
    """Aborts every registered object that has an abort function (only those registered with
    `owner`, when given), newest first. One failing abort does not stop the others; the first
    exception is raised once all ran. Returns how many objects reported an abort."""
    n, first = 0, None
    for obj, fn in _live("abort", owner):
        try:
            n += bool(fn(obj, reason))
        except Exception as e:  # noqa: BLE001 (the others must still be aborted)
            first = first or e
    if first is not None:
        raise first
    return n


def close_all():
    """Closes every registered object that has a close function, newest first (the exit hook;
    also for tests). Like abort_all, the first exception is raised after all ran."""
    first = None
    for obj, fn in _live("close"):
        try:
            fn(obj)
        except Exception as e:  # noqa: BLE001
            first = first or e
        unregister(obj)
    if first is not None:
        raise first


# The one exit hook. threading's (private, but the hook concurrent.futures uses for the same
# reason) runs before non-daemon threads are joined and before atexit: worker threads attached
# to the interpreter are joined while it is still whole.
threading._register_atexit(close_all)
