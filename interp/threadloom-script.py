#!python
"""The `threadloom` command where the C launcher is not built: a Python with the GIL (the
baseline venv of make test-torch), or one without a shared libpython to embed. pip installs
this file as the environment's `threadloom` script and rewrites its first line to that
environment's interpreter; it runs `python -m threadloom`, whose `run` installs the same GIL
guard from inside the interpreter but cannot pin the main thread or cap os.cpu_count()
(see python -m threadloom run --help). CMakeLists.txt chooses between the two."""
import runpy

runpy.run_module("threadloom", run_name="__main__", alter_sys=True)
