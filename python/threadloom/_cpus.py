"""The CPUs this process may run on, read once, whichever thread asks.

A thread's own affinity is no answer: spmd pins each rank thread to its launch core and
threadloom.pin() pins loader threads, so an Executor or a DataLoader made on such a thread would
size itself for one core (and the plan caches keyed on it would make a second plan). The
process's CPUs are, in this order:

1. the affinity the ``threadloom`` launcher started with, which it exports as
   THREADLOOM_START_CPUS="<pid>:<cpu list>" before it pins its main thread to the plan's main
   slot (interp/pin.c); the pid makes a child process, which inherits the environment but not
   the launcher's start, ignore it;
2. else the main thread's affinity (the thread group leader's: sched_getaffinity of the pid)
   when this module is first imported; threads inherit it unless they pin themselves, and
   pinning the main thread later (threadloom.pin(role="main")) does not shrink the answer;
3. else, without sched_getaffinity, os.cpu_count().

Standard library only. Thread-safety: _PROCESS is written once, at import (the import lock
serializes it), and only read afterwards.
"""

import os

__all__ = ["process_cpus", "parse_cpu_list"]

ENV = "THREADLOOM_START_CPUS"


def parse_cpu_list(text):
    """The CPUs of a Linux CPU list ("0-3,8,10-11") as a frozenset. Raises ValueError."""
    out = set()
    for part in text.strip().split(","):
        lo, dash, hi = part.partition("-")
        lo = int(lo)
        hi = int(hi) if dash else lo
        if lo < 0 or hi < lo:
            raise ValueError("bad CPU range %r in %r" % (part, text))
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError("empty CPU list %r" % (text,))
    return frozenset(out)


def _from_launcher(value, pid):
    """The CPUs of a THREADLOOM_START_CPUS value meant for process `pid`, else None."""
    owner, sep, cpus = (value or "").partition(":")
    if not sep or owner != str(pid):
        return None
    try:
        return parse_cpu_list(cpus)
    except ValueError:
        return None


def _read():
    pid = os.getpid()
    cpus = _from_launcher(os.environ.get(ENV), pid)
    if cpus is not None:
        return cpus
    try:
        return frozenset(os.sched_getaffinity(pid))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


_PROCESS = _read()


def process_cpus():
    """The CPUs this process may run on (a frozenset of CPU numbers): see the module docstring.
    The same answer on every thread, pinned or not."""
    return _PROCESS
