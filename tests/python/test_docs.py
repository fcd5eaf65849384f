"""Every ```python block of docs/user-guide.md and docs/migration.md runs.

The blocks of one document run in order, as one program, in a fresh interpreter (what a block
imports, torch say, and the GIL an import may turn on stay out of the test process), in a
temporary directory where `tests/` points at the repository's (for the recorded topologies).
The program keeps each block on its line of the document, so a traceback names the document's
line. A block right after a line `<!-- needs: torch -->` runs only where torch is importable
and is skipped, with that reason, elsewhere (the "before" side of the migration guide)."""

import importlib.util
import os
import re

import pytest

from conftest import ROOT, run_python

DOCS = ["docs/user-guide.md", "docs/migration.md"]
FENCE = re.compile(r"^```python\s*$")
NEEDS = re.compile(r"^<!-- needs: (\w+) -->\s*$")


def blocks(path):
    """[(first line number, code, needed module or None)] of the ```python blocks."""
    out = []
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            need = None
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k >= 0 and NEEDS.match(lines[k]):
                need = NEEDS.match(lines[k]).group(1)
            j = i + 1
            while j < len(lines) and lines[j].rstrip() != "```":
                j += 1
            assert j < len(lines), "%s:%d: a ```python block is not closed" % (path, i + 1)
            out.append((i + 2, "\n".join(lines[i + 1:j]) + "\n", need))
            i = j
        i += 1
    return out


def test_the_docs_have_python_blocks():
    for doc in DOCS:
        assert len(blocks(doc)) >= 4, doc


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_block_runs(doc, tmp_path):
    os.symlink(os.path.join(ROOT, "tests"), tmp_path / "tests")
    program = [""] * len(open(os.path.join(ROOT, doc), encoding="utf-8").read().splitlines())
    ran, skipped = 0, []
    for line, code, need in blocks(doc):
        if need is not None and importlib.util.find_spec(need) is None:
            skipped.append("%s:%d needs %s" % (doc, line, need))
            continue
        for k, text in enumerate(code.splitlines()):
            program[line - 1 + k] = text
        ran += 1
    assert ran >= 4
    path = tmp_path / os.path.basename(doc)   # tracebacks: "user-guide.md", line N
    path.write_text("\n".join(program) + "\n", encoding="utf-8")
    r = run_python(str(path), cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, "%s: a block failed:\n%s" % (doc, r.stderr[-4000:])
    if skipped:
        print("skipped (module not importable here): " + "; ".join(skipped))
