"""bench/_share_code.py: a function whose only shared objects are its own constants
(bench_share.py runs it as the script, `python _share_code.py --child ...`, and imported from
this module, compiled from source or loaded from .pyc).

On 3.13t the interpreter makes the constants of the code it compiles for a script immortal, and
so does unmarshalling a .pyc; importlib compiling the source (no .pyc: PYTHONDONTWRITEBYTECODE,
a read-only directory, the first import) leaves them mortal, and every thread then writes their
reference counts at each LOAD_CONST. See docs/design.md, "Shared data"."""

import sys


def crunch(lo, hi, work=400):
    """Items lo..hi-1 of float/int/tuple arithmetic on constants; returns a checksum."""
    acc = 0.0
    for i in range(lo, hi):
        for k in range(work):
            t = (2.5, 7, 1.25)
            acc += (i + k) * 0.5 + t[k % 3] * 1.75 - 3.25 + 1000003 % (k + 7)
    return acc


if __name__ == "__main__":  # the "script" case: this file run as the program
    sys.path.insert(0, sys.argv[1])  # bench/, for bench_share's timing loop
    import bench_share
    bench_share.child_main(sys.argv[2:], crunch)
