"""threadloom.share(): objects made immortal, read by many threads while the collector runs,
mutated afterwards; objects of other threads left alone; cycles, deep and large graphs;
subinterpreters; the report's numbers."""

import gc
import subprocess
import sys
import sysconfig
import threading
import time
import types
import weakref

import pytest

import threadloom
from threadloom import _core, share
from threadloom.share import path_of
from conftest import gil_python, run_python

free_threaded = pytest.mark.skipif(not sysconfig.get_config_var("Py_GIL_DISABLED"),
                                   reason="share() does nothing on a GIL build (tested in "
                                          "test_gil_build_does_nothing_and_says_so)")
THREADS = 8


def immortal(o):
    """3.13 has no sys._is_immortal: an immortal object's count reads as UINT32_MAX."""
    return sys.getrefcount(o) >= 2**32 - 1


def reachable(root):
    """The objects share() walks by default below root, by identity: a second walker, in
    Python, to check the report against."""
    seen, stack = {}, [root]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen[id(o)] = o
        if type(o) in (list, tuple, set, frozenset):
            stack.extend(o)
        elif type(o) is dict:
            for k, v in o.items():
                stack += (k, v)
    return list(seen.values())


def fresh_graph():
    """Objects made at run time (not code constants, which may be immortal already)."""
    words = ["w%d-%s" % (i, "x" * (i % 7)) for i in range(50)]
    nums = [float(i) + 0.5 for i in range(30)] + [10**6 + i for i in range(30)]
    inner = {words[i]: nums[i] for i in range(20)}
    return {"words": words, "nums": nums, "inner": inner, "pair": (words[0], nums[0]),
            "set": frozenset(words[:5]), "none": None, "small": 7, "self": None}


@free_threaded
def test_report_numbers_are_exact_and_every_object_is_immortal():
    root = fresh_graph()
    objs = reachable(root)
    mortal = [o for o in objs if not immortal(o)]
    expect_bytes = sum(sys.getsizeof(o) for o in mortal)
    assert len(mortal) == 50 + 60 + 6  # words, numbers and containers: made at run time
    r = share(root)
    assert r.enabled and r.skipped == {}
    assert r.made_immortal == len(mortal)
    assert r.already_immortal == len(objs) - len(mortal)
    assert r.visited == len(objs)
    assert r.bytes == expect_bytes
    assert all(immortal(o) for o in objs)
    # a second call finds everything immortal and makes nothing
    r2 = share(root)
    assert (r2.made_immortal, r2.bytes, r2.already_immortal) == (0, 0, len(objs))
    assert "never freed" in str(r)


@free_threaded
def test_cycles_are_walked_once():
    a = {"name": "a" * 3 + str(len("x"))}
    b = [a]
    a["b"] = b
    a["self"] = a
    t = (b, a)
    b.append(t)
    r = share(a)
    assert r.visited == len(reachable(a))
    assert immortal(a) and immortal(b) and immortal(t)


@free_threaded
def test_deep_nesting_does_not_recurse():
    depth = 200_000  # far past sys.getrecursionlimit()
    root = cur = []
    for i in range(depth):
        nxt = [i + 10**6]
        cur.append(nxt)
        cur = nxt
    r = share(root)
    assert r.made_immortal == 2 * depth + 1  # the lists and the ints
    assert immortal(cur) and immortal(cur[0])


@free_threaded
def test_a_million_objects():
    n = 333_334
    gc.disable()
    try:
        recs = [(i, str(i)) for i in range(n)]
    finally:
        gc.enable()
    r = share(recs, collect=False)
    # the list, the tuples, the ints above 256 (smaller ones are CPython's immortal singletons)
    # and the strings
    assert r.made_immortal == 1 + n + (n - 257) + n
    assert r.already_immortal == 257 and r.visited > 10**6
    assert r.visited == 1 + 3 * n
    assert immortal(recs[-1][1])


@free_threaded
def test_objects_of_another_live_thread_are_left_alone():
    made, done, box = threading.Event(), threading.Event(), {}

    def owner():
        box["data"] = [[i + 1000] for i in range(100)]
        made.set()
        done.wait()
        box["own"] = share(box["data"])  # the owner itself may share them

    t = threading.Thread(target=owner)
    t.start()
    try:
        made.wait()
        r = share(box["data"])
        assert r.made_immortal == 0
        assert r.skipped == {"other_thread": 201}
        assert r.collected  # it retried after a collection, in vain: the owner is alive
        ex = r.examples["other_thread"]
        assert len(ex) == 3 and ("obj", "list") in ex and all(p.startswith("obj") for p, _ in ex)
        assert any(p.endswith("][0]") and t == "int" for p, t in ex), ex
        assert not immortal(box["data"]) and not immortal(box["data"][5][0])
    finally:
        done.set()
        t.join()
    assert box["own"].made_immortal == 201 and box["own"].skipped == {}
    assert immortal(box["data"][5][0])


@free_threaded
def test_containers_of_an_exited_thread_are_shared_after_a_collection():
    box = {}
    t = threading.Thread(target=lambda: box.update(data=[[i + 1000] for i in range(100)]))
    t.start()
    t.join()
    r = share(box["data"], collect=False)
    assert r.made_immortal == 0 and r.skipped == {"other_thread": 201}
    r = share(box["data"])
    # the lists' memory went back to the interpreter (ob_tid 0); the ints keep the exited
    # thread's id (CPython never revisits non-container objects), as the report says
    assert r.collected
    assert r.made_immortal == 101 and r.skipped == {"other_thread": 100}
    assert immortal(box["data"][0]) and not immortal(box["data"][0][0])


@free_threaded
def test_threads_read_a_shared_graph_while_the_collector_runs():
    data = {"k%d" % i: [("v%d" % j, float(j) + i) for j in range(40)] for i in range(300)}
    data["cycle"] = [data]
    expect = sum(len(v) for k, v in data.items() if k != "cycle")
    share(data)
    stop = threading.Event()
    barrier = threading.Barrier(THREADS + 1)
    errors, rounds = [], [0] * THREADS

    def reader(k):
        try:
            barrier.wait()
            while not stop.is_set():
                total = 0
                for key, rows in list(data.items()):
                    if key != "cycle":
                        for name, x in rows:
                            total += name.startswith("v") and x >= 0
                assert total == expect
                rounds[k] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=reader, args=(k,)) for k in range(THREADS)]
    for t in ts:
        t.start()
    barrier.wait()
    for _ in range(40):
        gc.collect()
    while min(rounds) < 3 and not errors:
        gc.collect()
    stop.set()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert immortal(data) and immortal(data["k7"][3])


class Box:
    def __init__(self, v):
        self.v = v


@free_threaded
def test_shared_containers_mutated_by_threads():
    shared_list = [Box(i) for i in range(10)]
    shared_dict = {"k%d" % i: Box(i) for i in range(10)}
    share(shared_list)
    share(shared_dict)
    assert immortal(shared_list) and immortal(shared_dict) and immortal(shared_list[3])
    per_thread = 2000
    barrier = threading.Barrier(THREADS)
    errors = []

    def writer(k):
        try:
            barrier.wait()
            for i in range(per_thread):
                shared_list.append((k, i))            # appends: every one lands
                shared_dict["t%d-%d" % (k, i)] = i    # distinct keys: every one lands
                if i % 100 == 0:
                    gc.collect()
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert len(shared_list) == 10 + THREADS * per_thread
    assert sorted(x for x in shared_list[10:]) == sorted(
        (k, i) for k in range(THREADS) for i in range(per_thread))
    assert len(shared_dict) == 10 + THREADS * per_thread
    # values put in later are ordinary objects: freed once removed
    later = Box(-1)
    ref = weakref.ref(later)
    shared_dict["later"] = later
    del later
    assert not immortal(shared_dict["later"])
    del shared_dict["later"]
    gc.collect()
    assert ref() is None
    # a shared value removed from its container is kept for good
    old = shared_list.pop(0)
    keep = weakref.ref(old)
    del old
    gc.collect()
    assert keep() is not None and keep().v == 0


@free_threaded
def test_flags_walk_modules_classes_functions_code():
    def helper(x, scale=[1.5 + len("ab")]):  # noqa: B006 (a default to share)
        return x * scale[0]

    class Table:
        ROWS = ["r%d" % i for i in range(5)]

        def __init__(self):
            self.rows = ["row-%d" % i for i in range(5)]

    mod = types.ModuleType("fake_workload")
    mod.VOCAB = {"w%d" % i: i + 10**6 for i in range(5)}
    mod.os = sys  # a module reached from the root module: left out
    root = {"fn": helper, "cls": Table, "inst": Table(), "mod": mod}
    r = share(root, collect=False)
    assert r.skipped == {"function": 1, "class": 1, "module": 1}
    assert immortal(root["inst"].rows[2])       # plain instances are walked by default
    assert not immortal(helper.__defaults__[0])
    assert not immortal(Table.ROWS[1]) and not immortal(mod.VOCAB)
    r = share(root, functions=True, classes=True, modules=True, collect=False)
    assert immortal(helper.__defaults__[0]) and immortal(Table.ROWS[1])
    assert immortal(mod.VOCAB["w3"])
    # a module given as the root is walked whatever the flags, and names the paths
    mod2 = types.ModuleType("other_workload")
    mod2.TABLE = [[str(i) * 3] for i in range(4)]
    r = share(mod2)
    assert immortal(mod2.TABLE[2][0])


@free_threaded
def test_extension_objects_only_when_asked():
    import array
    a = array.array("d", [1.0, 2.0])
    r = share({"arr": a}, collect=False)
    assert r.skipped == {"extension": 1} and not immortal(a)
    assert r.examples["extension"] == [("obj['arr']", "array")]
    r = share({"arr": a}, extensions=True, collect=False)
    assert immortal(a) and r.skipped == {}


@free_threaded
def test_paths():
    mod = types.ModuleType("workload")
    mod.VOCAB = {"the": [1, 2]}
    chain = (mod, vars(mod), mod.VOCAB, mod.VOCAB["the"])
    assert path_of(chain, "workload") == "workload.VOCAB['the']"
    inst = Box([5, 6])
    assert path_of((inst, inst.v, inst.v), "dataset") in ("dataset.v", "dataset.v[?]")
    assert path_of((inst, inst.v), "dataset") == "dataset.v"
    rec = [(1, "a")]
    assert path_of((rec, rec[0], rec[0][1]), "records") == "records[0][1]"


@free_threaded
def test_share_code_makes_constants_immortal():
    src = "def f(x):\n    return x * 0.75 + 123457 + len((2.5, 9876543))\n"
    ns = {}
    exec(compile(src, "<test>", "exec"), ns)  # compile(): CPython leaves these mortal
    consts = [c for c in ns["f"].__code__.co_consts if c is not None]
    assert not any(immortal(c) for c in consts)
    module_code = compile(src, "<test>", "exec")
    n = _core.share_code(module_code)
    fcode = next(c for c in module_code.co_consts if isinstance(c, types.CodeType))
    assert all(immortal(c) for c in fcode.co_consts)
    assert n >= 3
    with pytest.raises(TypeError):
        _core.share_code("not code")


@free_threaded
def test_subinterpreter():
    try:
        import _interpreters as interpreters  # 3.13; concurrent.interpreters is 3.14
    except ImportError:
        pytest.skip("this interpreter has no _interpreters module")
    interp = interpreters.create()
    try:
        code = ("import sys; sys.path[:0] = %r\n"
                "import gc, threadloom\n"
                "d = {'k': [str(i) * 3 for i in range(1000)]}\n"
                "r = threadloom.share(d)\n"
                "assert r.made_immortal == 1002 and r.already_immortal == 1, r\n"
                "assert sys.getrefcount(d['k'][500]) >= 2**32 - 1\n"
                "d['k'].append('x' * 5); gc.collect()\n" % (sys.path,))
        err = interpreters.exec(interp, code)
        assert err is None, err
    finally:
        interpreters.destroy(interp)
    gc.collect()


@free_threaded
def test_layout_is_reported():
    ok, how = _core.share_layout()
    assert ok, how
    assert "3.13" in how or "PyUnstable_SetImmortal" in how
    assert threadloom.share is share


def test_gil_build_does_nothing_and_says_so():
    exe = gil_python()
    if exe is None:
        pytest.skip("no GIL baseline with threadloom installed (make build-gil makes build/venv-gil)")
    code = ("import threadloom, sys\n"
            "r = threadloom.share({'a': [1.5, 'x' * 3]})\n"
            "assert not r.enabled and r.made_immortal == 0, r\n"
            "assert 'built with the GIL' in str(r), str(r)\n"
            "assert not threadloom.imports_shared()['on']\n"
            "from threadloom.share import ShareInSteps\n"
            "s = ShareInSteps({'a': [1.5]})\n"
            "assert s.done and s.step(10) and not s.report.enabled, s.report\n"
            "dl = threadloom.DataLoader(list(range(8)), batch_size=2, num_workers=2,\n"
            "                           replicate='share')\n"
            "assert dl.share_report is not None and not dl.share_report.enabled\n"
            "assert sum(len(b) for b in dl) == 8\n"
            "print('ok')\n")
    r = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


class Vocab:
    """A read-only map-style dataset: every sample reads the shared table."""

    def __init__(self, n):
        self.table = {"w%d" % i: [i * 1.5, "v%d" % i] for i in range(n)}
        self.keys = list(self.table)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        seen.append((id(threadloom.get_worker_info().dataset), threading.get_ident()))
        v = self.table[self.keys[i]]
        return int(v[0] * 2)


seen = []


@free_threaded
def test_dataloader_replicate_share():
    ds = Vocab(64)
    seen.clear()
    loader = threadloom.DataLoader(ds, batch_size=4, num_workers=2, replicate="share")
    r = loader.share_report
    # the instance, its table and key list, and per word its key, list, float and string
    assert r.made_immortal == 3 + 64 * 4 and r.skipped == {}, r
    assert immortal(ds) and immortal(ds.table["w5"][1])
    got = [x for b in loader for x in b.tolist()]
    assert got == [i * 3 for i in range(64)]
    # every worker read the one dataset object (no replica), and no copy was made
    assert {d for d, _ in seen} == {id(ds)} and len({t for _, t in seen}) >= 1
    assert [x for b in threadloom.DataLoader(Vocab(64), batch_size=4, num_workers=2)
            for x in b.tolist()] == got  # the same batches as the default replicas
    # nothing is shared without workers (one thread reads it), and a bad value is named
    assert threadloom.DataLoader(Vocab(4), num_workers=0, replicate="share").share_report is None
    with pytest.raises(ValueError, match="'copy', 'share', a factory"):
        threadloom.DataLoader(ds, num_workers=2, replicate="shared")


@free_threaded
def test_share_while_other_threads_read():
    # share() may run while other threads read the data (the data's owner shares it)
    data = {"k%d" % i: [("v%d" % j, float(j) + i) for j in range(20)] for i in range(2000)}
    expect = 2000 * 20
    stop = threading.Event()
    barrier = threading.Barrier(THREADS + 1)
    errors = []

    def reader():
        try:
            barrier.wait()
            while not stop.is_set():
                assert sum(len(v) for v in list(data.values())) == expect
                for rows in list(data.values())[::50]:
                    for name, x in rows:
                        assert name[0] == "v" and x >= 0
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=reader) for _ in range(THREADS)]
    for t in ts:
        t.start()
    barrier.wait()
    r = share(data)
    gc.collect()
    stop.set()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert r.skipped == {} and r.visited == len(reachable(data))
    assert all(immortal(o) for o in reachable(data))


# -- share() in steps (ShareInSteps, _core.ShareWalk): the DataLoader's replicate="share" ---------

def records(n):
    """A list of n (int, str, float) records, made at run time: the shape that takes steps."""
    return [(10**6 + k, "rec-%d" % k, k + 0.25) for k in range(n)]


@free_threaded
def test_in_steps_the_report_is_share_s():
    from threadloom.share import ShareInSteps
    a = {"recs": records(3000), "more": {"k%d" % i: [float(i) + 0.5, "v%d" % i] for i in range(500)},
         "graph": fresh_graph()}
    b = {"recs": records(3000), "more": {"k%d" % i: [float(i) + 0.5, "v%d" % i] for i in range(500)},
         "graph": fresh_graph()}
    whole = share(a)
    s = ShareInSteps(b, name="b")
    steps = 0
    while not s.step(100):
        steps += 1
        assert s.report is None and 0 < s.reached <= whole.visited
    assert steps > 20  # 3000 records and 500 entries in slices of 100: many steps
    r = s.report
    assert (r.made_immortal, r.bytes, r.already_immortal, r.visited, r.skipped) == \
        (whole.made_immortal, whole.bytes, whole.already_immortal, whole.visited, whole.skipped)
    assert all(immortal(o) for o in reachable(b))
    assert s.step(100) and s.report is r  # done stays done


@free_threaded
def test_in_steps_while_threads_read_mutate_and_collect():
    # between steps the consumer's own code runs: readers on other threads, the collector, and
    # the owner changing the data; nothing crashes, the readers always see consistent data, and
    # what the final graph holds that the walk reached is immortal
    from threadloom.share import ShareInSteps
    data = {"k%d" % i: [("v%d" % j, float(j) + i) for j in range(20)] for i in range(1000)}
    big = records(20000)
    data["big"] = big
    stop = threading.Event()
    errors = []

    def reader():
        try:
            while not stop.is_set():
                for key, rows in list(data.items())[::50]:
                    for row in rows[-20:]:
                        assert isinstance(row[1], float if key != "big" else str), (key, row)
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=reader) for _ in range(THREADS)]
    for t in ts:
        t.start()
    s = ShareInSteps(data, name="data")
    k = 0
    while not s.step(500):
        k += 1
        if k % 5 == 0:
            gc.collect()
        if k % 3 == 0:
            big.pop()                   # the list being walked shrinks under the walk
            big.append((7, "new-%d" % k, 1.5))  # and takes one the walk may not reach
        if k % 7 == 0:
            data["k%d" % (k % 1000)] = [("n%d" % k, 2.5)]  # the dict is replaced into
    stop.set()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert k > 40 and s.report.skipped == {}
    assert immortal(data) and immortal(big) and immortal(big[0]) and immortal(big[0][1])
    gc.collect()
    assert sum(len(v) for key, v in data.items() if key != "big") >= 999


@free_threaded
def test_in_steps_closed_midway_keeps_what_it_did():
    from threadloom.share import ShareInSteps
    recs = records(5000)
    s = ShareInSteps(recs)
    assert not s.step(100)
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.step(100)
    done = [r for r in recs if immortal(r)]
    assert 0 < len(done) < len(recs)  # the list is walked from its end, 100 items a step
    assert all(immortal(r) for r in recs[-len(done):])
    assert not immortal(recs)  # a container is made immortal once all of it is walked
    del s
    gc.collect()
    assert all(immortal(r[1]) for r in done)


class Records:
    """A read-only map-style dataset over a list of records large enough to be walked in steps
    (DatasetShare.FIRST objects in the constructor, then the consumer's idle time); the first
    sample of each batch of 64 sleeps 0.5 ms, so the consumer waits for batches."""

    def __init__(self, n):
        self.recs = records(n)

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        if i % 64 == 0:
            time.sleep(0.0005)
        return self.recs[i][0]


@free_threaded
def test_dataloader_share_walks_a_large_dataset_after_the_first_batch():
    from threadloom.data.worker import DatasetShare
    ds = Records(4 * DatasetShare.FIRST)
    loader = threadloom.DataLoader(ds, batch_size=64, num_workers=2, replicate="share")
    assert loader.share_report is None and not loader._sharing.done  # the first slice only
    reached = loader._sharing._walk.reached
    it = iter(loader)
    first = next(it)
    # the first batch waited for nothing else: the walk has not moved since the constructor
    assert loader._sharing._walk.reached == reached
    got = first.tolist() + [x for b in it for x in b.tolist()]
    assert got == [10**6 + k for k in range(len(ds))]
    # 1250 batches, each one's first sample sleeping: the consumer waited, and walked meanwhile
    r = loader.share_report
    assert r is not None and r.skipped == {} and r.made_immortal >= 3 * len(ds), r
    assert immortal(ds) and immortal(ds.recs) and immortal(ds.recs[123][1])
    assert [x for b in loader for x in b.tolist()] == got  # the next epoch: nothing left to do


@free_threaded
def test_dataloader_share_of_an_iterable_dataset_ends_when_the_epoch_starts():
    from threadloom.data import IterableDataset
    from threadloom.data.worker import DatasetShare

    class Stream(IterableDataset):
        def __init__(self, n):
            self.recs = records(n)

        def __iter__(self):
            info = threadloom.get_worker_info()
            return iter([r[0] for r in self.recs[info.id::info.num_workers]])

    ds = Stream(2 * DatasetShare.FIRST)
    loader = threadloom.DataLoader(ds, batch_size=None, num_workers=2, replicate="share")
    assert loader.share_report is None
    it = iter(loader)
    assert loader.share_report is not None and immortal(ds.recs)
    assert sorted(int(x) for x in it) == [10**6 + k for k in range(len(ds.recs))]


@free_threaded
def test_dataloader_share_that_fails_loses_no_batch(monkeypatch, caplog):
    from threadloom.data.worker import DatasetShare
    from threadloom.share import ShareInSteps
    calls = []
    real = ShareInSteps.step

    def failing(self, budget):
        calls.append(budget)
        if len(calls) > 1:
            raise MemoryError("injected")
        return real(self, budget)

    monkeypatch.setattr(ShareInSteps, "step", failing)
    ds = Records(4 * DatasetShare.FIRST)
    loader = threadloom.DataLoader(ds, batch_size=64, num_workers=2, replicate="share")
    with caplog.at_level("WARNING", logger="threadloom.data"):
        got = [x for _ in range(2) for b in loader for x in b.tolist()]
        loader._sharing.finish()
    assert got == 2 * [10**6 + k for k in range(len(ds))]
    r = loader.share_report
    assert r is not None and not r.enabled and "injected" in r.note
    assert len(calls) == 2 and "sharing the dataset failed" in caplog.text


@free_threaded
def test_deferred_objects_before_any_thread_are_made_immortal_not_called_merges():
    # 3.13 gives modules, their dicts and top-level functions deferred reference counts until
    # a second thread starts (their shared count flagged as a queued merge, the gc bit 64 set);
    # share() in a process with one thread used to skip them as "merge pending" and advise
    # calling it again. In a child: this process has threads, which made them immortal already.
    code = ("import ctypes, sys, types, threadloom\n"
            "def deferred(o):\n"
            "    return ctypes.c_uint8.from_address(id(o) + 11).value & 64 != 0\n"
            "m = types.ModuleType('m')\n"
            "exec('def f():\\n    return 1\\nX = [1.5, \\'x\\' * 3]\\n', m.__dict__)\n"
            "assert all(deferred(o) for o in (m, m.__dict__, m.f)), 'no deferred objects'\n"
            "r = threadloom.share(m, functions=True)\n"
            "assert 'merge_pending' not in r.skipped, r\n"
            "assert all(sys.getrefcount(o) >= 2**32 - 1 for o in (m, m.__dict__, m.f, m.X)), r\n"
            "assert not any(deferred(o) for o in (m, m.__dict__, m.f))\n"
            "import gc, threading\n"
            "gc.collect()\n"
            "t = threading.Thread(target=m.f); t.start(); t.join()\n"
            "assert m.f() == 1 and m.X[1] == 'xxx'\n"
            "print('ok')\n")
    r = run_python("-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
