"""The Python package's layers only point down, and _core never imports Python.

Every module of python/threadloom is read with `ast` (imports inside functions included, as a
lazy import is still a dependency) and must import only modules of a lower layer, or of its
own package (data/, comm/, checkpoint/, cluster/). Modules of one layer do not import each
other, so e.g. cluster/ never imports spmd or checkpoint: it aborts what registered with
_runtime and saves through any object with save(state, step). ``from threadloom import X``
where X is no module is an import of the facade (threadloom/__init__), the top layer. The
module graph has no cycle. A module this table does not place fails the test: give it a layer
in LAYERS, and the docs/design.md section "The Python package" its line.

No module uses another module's private names (the extension's `_core._x` test hooks aside):
what a layer offers the ones above it is public within the package.

The extension's C sources (python/src) import no Python module: no PyImport_* call but
PyImport_GetModule (a look into sys.modules, which never imports: NcclComm asks an already
imported torch for its current stream), and no string naming a threadloom Python module.
"""

import ast
import os
import re

import pytest

from conftest import ROOT

PKG = os.path.join(ROOT, "python", "threadloom")
SRC = os.path.join(ROOT, "python", "src")

# The layers, lowest first; each unit is a top-level module or a package. docs/design.md ("The
# Python package") says what each is for.
LAYERS = [
    {"_core", "gilguard"},                          # C; and the guard the launcher loads by path
    {"errors", "_runtime", "share", "_cpus"},       # errors made in one place; lifetime registry;
                                                    # immortal shared data (loaded by path too);
                                                    # the process's CPUs
    {"placement", "memory", "sysinfo", "topoview",  # the machine: plans, pinning, arenas, info;
     "contention"},                                 # which shared objects threads contend on
    {"_queue", "executor"},                         # threads: closable queues, the Executor
    {"pipeline", "comm", "devices"},                # stages; communicators; the device layer
    {"data", "checkpoint", "spmd", "cluster"},      # loader, checkpoints, rank runner, jobs
    {"__init__", "__main__"},                       # the facade and the command line
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
# Loaded by path before the package exists (interp/main.c): the standard library only.
STANDALONE = {"threadloom.gilguard", "threadloom.cluster.torchrun"}


def modules():
    """{dotted name: path} of every .py file of the package."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                parts = os.path.relpath(path, PKG)[:-3].split(os.sep)
                if parts[-1] == "__init__" and len(parts) > 1:
                    parts = parts[:-1]
                out[".".join(["threadloom"] + parts)] = path
    return out


MODULES = modules()


def is_module(name):
    return name in MODULES or name == "threadloom._core"


def imports(name, path):
    """The threadloom modules `name` imports (a name of the facade counts as "threadloom")."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "threadloom")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "threadloom":
                continue
            for a in node.names:
                sub = base + "." + a.name
                out.add(sub if is_module(sub) else base)
    return out


def unit(name):
    """The layer unit of a module: threadloom.cluster.env -> "cluster", threadloom -> facade."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    missing = sorted(n for n in MODULES if unit(n) not in RANK)
    assert not missing, ("modules without a layer: %s; add them to LAYERS in %s"
                         % (missing, __file__))


def test_imports_only_point_down():
    bad = []
    for name, path in sorted(MODULES.items()):
        u = unit(name)
        for dep in sorted(imports(name, path)):
            d = unit(dep)
            if d == u and u != "__init__":
                continue  # within a package (cycles: below)
            if d not in RANK or u not in RANK or RANK[d] >= RANK[u]:
                bad.append("%s imports %s (layer %s -> %s)" % (name, dep, RANK.get(u),
                                                               RANK.get(d)))
    assert not bad, "imports that do not point down:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    graph = {n: {d for d in imports(n, p) if d in MODULES} for n, p in MODULES.items()}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def private_uses(name, path):
    """[(line, "module._name")] where `name` uses a private name of another threadloom module
    (not the extension's test hooks): `from threadloom.m import _x`, or `m._x` with m bound to
    a threadloom module by an import."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    aliases, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("threadloom"):
            for a in node.names:
                sub = node.module + "." + a.name
                if is_module(sub):
                    aliases[a.asname or a.name] = sub
                elif a.name.startswith("_") and node.module != name:
                    out.append((node.lineno, sub))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("threadloom.") and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            out.append((node.lineno, "%s.%s" % (aliases[node.value.id], node.attr)))
    return [(ln, what) for ln, what in out if not what.startswith("threadloom._core.")]


def test_no_module_uses_another_modules_private_names():
    bad = ["%s:%d uses %s" % (name, ln, what) for name, path in sorted(MODULES.items())
           for ln, what in private_uses(name, path)]
    assert not bad, "private names used across modules:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_modules_loaded_by_path_import_only_the_standard_library(name):
    assert not imports(name, MODULES[name]), "%s imports threadloom modules" % name


# The C sources: calls that import or create modules, and strings that are a threadloom module's
# name (not type or exception names such as "threadloom._core.NcclComm" or "threadloom.Error",
# nor messages that name a function, "call threadloom.cluster.on_preempt()").
_IMPORT_CALL = re.compile(r"\bPyImport_(\w+)")
_ALLOWED_IMPORT_CALLS = {"GetModule"}   # sys.modules lookup: never imports
_MODULE_STRING = re.compile(r'"threadloom(?!\._core")(\.[a-z_]+)+"')   # a whole module name


def c_sources():
    return sorted(os.path.join(SRC, f) for f in os.listdir(SRC) if f.endswith((".c", ".h")))


def test_core_never_imports_python():
    bad = []
    for path in c_sources():
        for i, line in enumerate(open(path, encoding="utf-8"), 1):
            code = line.split("//")[0]
            for m in _IMPORT_CALL.finditer(code):
                if m.group(1) not in _ALLOWED_IMPORT_CALLS:
                    bad.append("%s:%d: PyImport_%s" % (os.path.basename(path), i, m.group(1)))
            for m in _MODULE_STRING.finditer(code):
                bad.append("%s:%d: %s" % (os.path.basename(path), i, m.group(0)))
    assert not bad, "python/src reaches into Python modules:\n  " + "\n  ".join(bad)


def test_the_checks_see_violations(tmp_path):
    """The checks above can fail: an upward import, a cycle and a C import are each found."""
    up = tmp_path / "up.py"
    up.write_text("def f():\n    from threadloom import spmd, Checkpointer\n")
    assert imports("threadloom.cluster.x", str(up)) == {"threadloom.spmd", "threadloom"}
    rel = tmp_path / "rel.py"
    rel.write_text("from . import env\nfrom .store import StoreClient\n")
    assert imports("threadloom.cluster.x", str(rel)) == {"threadloom.cluster.env",
                                                        "threadloom.cluster.store"}
    assert RANK[unit("threadloom.spmd")] >= RANK[unit("threadloom.cluster.x")]
    eng = tmp_path / "eng.py"
    eng.write_text("from threadloom import pipeline as _p\nfrom threadloom.spmd import _World\n"
                   "q = _p._Queue(1)\nx = _p.Pipeline\n")
    assert [w for _, w in private_uses("threadloom.data.x", str(eng))] == [
        "threadloom.spmd._World", "threadloom.pipeline._Queue"]
    line = 'PyObject* m = PyImport_ImportModule("threadloom.spmd");'
    assert _IMPORT_CALL.search(line).group(1) == "ImportModule"
    assert _MODULE_STRING.search(line)
    assert not _MODULE_STRING.search('.name = "threadloom._core.NcclComm",')
    assert not _MODULE_STRING.search('"did not call threadloom.cluster.on_preempt(): ignored"')
    assert not _MODULE_STRING.search('PyImport_GetModule("threadloom._core")')
