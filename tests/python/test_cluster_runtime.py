"""The multi-node runtime: launcher flags on both launchers, the NCCL id exchange, the watchdog,
preemption (threadloom.cluster: launch, runtime, preempt, and cluster.current()).

Nodes are real launcher processes on 127.0.0.1, each test with its own random job id and token.
Nothing sleeps to order processes: a test reads a node's "ready" line from its stdout pipe
(blocking) before it kills or signals it, and waits for exits with generous bounds. The
watchdog tests use a WATCHDOG_S (5 s) heartbeat timeout, generous for a loaded 2-core machine; how fast a death is noticed is not asserted."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import BIN, run_python

import threadloom
from threadloom import cluster

HAVE_BIN = os.access(BIN, os.X_OK)
TORCHRUN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT")
LAUNCHERS = [pytest.param("c", marks=pytest.mark.skipif(
                 not HAVE_BIN, reason="launcher not built (%s): run `make build`" % BIN)),
             "py"]
WAIT = 120   # seconds any node may take to finish (a bound, not a measurement)
WATCHDOG_S = 5   # heartbeat timeout of the watchdog tests: a stall this long on a loaded machine would be a false death


def _env(job, extra=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM") and k not in TORCHRUN + ("PYTHON_GIL", "CUDA_VISIBLE_DEVICES")}
    env["THREADLOOM_JOB_TOKEN"] = job["token"]
    env["THREADLOOM_JOB_ID"] = job["id"]
    env.update(extra or {})
    return env


@pytest.fixture
def job():
    return {"token": secrets.token_hex(16), "id": "test-" + secrets.token_hex(6)}


def _argv(launcher, flags, script, *args):
    head = [BIN, "run"] if launcher == "c" else [sys.executable, "-m", "threadloom", "run"]
    return head + list(flags) + [script] + list(args)


def start_node(launcher, job, flags, script, *args, env=None):
    """Starts one node; stdout and stderr are pipes (text)."""
    return subprocess.Popen(_argv(launcher, flags, script, *args), env=_env(job, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def node_flags(n, r, extra=()):
    return ["--nnodes", str(n), "--node-rank", str(r), "--master", "127.0.0.1", *extra]


def wait_ready(p):
    """Blocks until node p prints its "ready ..." line; returns it split. Fails when p exits
    first. The lines before it are kept for finish()."""
    p.early = ""
    for line in p.stdout:
        p.early += line
        if line.startswith("ready"):
            return line.split()
    p.wait(WAIT)
    pytest.fail("node exited with %s before it was ready: %s" % (p.returncode, p.stderr.read()))


def finish(p):
    if p.stdin is not None and p.stdin.closed:
        p.stdin = None
    out, err = p.communicate(timeout=WAIT)
    return p.returncode, getattr(p, "early", "") + out, err


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Launcher flags: the rendezvous before user code, current(), the torchrun environment
# ---------------------------------------------------------------------------------------------

SHOW = """
    import json, os
    from threadloom import cluster
    rv = cluster.current()
    print(json.dumps({"rank": rv.rank, "world": rv.world_size, "hosts": list(rv.hosts),
                      "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "env": {k: os.environ.get(k) for k in %r}}))
""" % (TORCHRUN,)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("nnodes", [2, 3])
def test_nodes_meet_before_user_code(launcher, nnodes, job, tmp_path):
    script = write(tmp_path, "show.py", SHOW)
    procs = [start_node(launcher, job, node_flags(nnodes, r), script) for r in range(nnodes)]
    results = [finish(p) for p in procs]
    seen = []
    for r, (rc, out, err) in enumerate(results):
        assert rc == 0, err
        d = json.loads(out.strip().splitlines()[-1])
        assert (d["rank"], d["world"], len(d["hosts"])) == (r, nnodes, nnodes)
        env = d["env"]
        assert (env["RANK"], env["WORLD_SIZE"], env["GROUP_RANK"]) == (str(r), str(nnodes), str(r))
        assert (env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
        seen.append(env["MASTER_PORT"])
    assert len(set(seen)) == 1 and int(seen[0]) > 0   # one torch.distributed port for the job


def _unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_master_port_is_torchs(launcher, job, tmp_path):
    # --master HOST:PORT means what torchrun's --master-port means: torch.distributed's store
    # listens there (MASTER_PORT on every node); threadloom's own store takes another port.
    port = _unused_port()
    script = write(tmp_path, "show.py", SHOW + """
    print(json.dumps({"store_port": rv.store_port}))
    """)
    flags = ["--master", "127.0.0.1:%d" % port]
    procs = [start_node(launcher, job, ["--nnodes", "2", "--node-rank", str(r)] + flags, script)
             for r in range(2)]
    for rc, out, err in (finish(p) for p in procs):
        assert rc == 0, err
        lines = out.strip().splitlines()
        assert json.loads(lines[-2])["env"]["MASTER_PORT"] == str(port)
        assert json.loads(lines[-1])["store_port"] != port


def test_master_port_in_use_or_different_between_nodes(job, tmp_path):
    script = write(tmp_path, "show.py", SHOW)
    with socket.socket() as busy:       # something already listens on the port
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run(_argv("py", ["--nnodes", "1", "--node-rank", "0", "--master",
                                        "127.0.0.1:%d" % port], script), env=_env(job),
                           capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 1 and "port %d" % port in p.stderr and "in use" in p.stderr, p.stderr
    a, b = _unused_port(), _unused_port()
    procs = [start_node("py", job, ["--nnodes", "2", "--node-rank", str(r), "--master",
                                     "127.0.0.1:%d" % (a, b)[r], "--rdzv-timeout", "20"],
                        script) for r in range(2)]
    errs = [finish(p)[2] for p in procs]
    assert "MASTER_PORT" in errs[1] and str(a) in errs[1] and str(b) in errs[1], errs
    assert "MASTER_PORT" in errs[0], errs   # node 0 stops too, saying why


INNER = """
    import json, sys
    from threadloom import cluster
    with cluster.rendezvous(timeout=30) as rv:          # written for a plain `python` launch
        same = rv is cluster.current()
        rv.store.set("inner/%d" % rv.rank, b"1")
        rv.store.wait("inner/%d" % (1 - rv.rank), 30)   # both nodes are inside the block
    with cluster.rendezvous() as again:                 # a second block: still the same job
        pass
    try:
        cluster.rendezvous(nnodes=5)
        clash = None
    except Exception as e:
        clash = "%s: %s" % (type(e).__name__, e)
    print(json.dumps({"rank": rv.rank, "same": same, "again": again is rv, "clash": clash}))
"""


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_program_rendezvous_under_the_launcher_is_the_launchers(launcher, job, tmp_path):
    """A program that calls cluster.rendezvous() itself (as it would under plain python/srun)
    gets the launcher's Rendezvous instead of meeting twice ("node rank 1 was claimed by two
    nodes" before), its `with` block does not leave the job, and the job ends cleanly."""
    script = write(tmp_path, "inner.py", INNER)
    procs = [start_node(launcher, job, node_flags(2, r), script) for r in range(2)]
    for r, (rc, out, err) in enumerate(finish(p) for p in procs):
        assert rc == 0, err
        d = json.loads(out.strip().splitlines()[-1])
        assert (d["rank"], d["same"], d["again"]) == (r, True, True)
        assert d["clash"].startswith("InvalidArgumentError") and "node %d of 2" % r in d["clash"]
        assert "threadloom:" not in err    # no abort, no trouble leaving


def test_mixed_launchers_meet(job, tmp_path):
    if not HAVE_BIN:
        pytest.skip("launcher not built (%s): run `make build`" % BIN)
    script = write(tmp_path, "show.py", SHOW)
    procs = [start_node("c", job, node_flags(2, 0), script),
             start_node("py", job, node_flags(2, 1), script)]
    for r, p in enumerate(procs):
        rc, out, err = finish(p)
        assert rc == 0, err
        assert json.loads(out.strip().splitlines()[-1])["rank"] == r


BAD_FLAGS = [
    (["--nnodes", "2", "--node-rank", "0"], "missing --master"),
    (["--nnodes", "2", "--master", "h"], "missing --node-rank"),
    (["--node-rank", "0", "--master", "h"], "missing --nnodes"),
    (["--nnodes", "2", "--node-rank", "2", "--master", "h"], "not below --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "0", "--master", "h:99999"], "outside 1-65535"),
    (["--nnodes", "2", "--node-rank", "0", "--master", "h:port"], "is not a number"),
    (["--nnodes", "2", "--node-rank", "0", "--master", "h", "--rdzv-timeout", "0"],
     "--rdzv-timeout must be positive"),
]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flag_combinations(launcher, flags, message, job, tmp_path):
    script = write(tmp_path, "never.py", "print('user code ran')\n")
    p = subprocess.run(_argv(launcher, flags, script), env=_env(job), capture_output=True,
                       text=True, timeout=WAIT)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "user code ran" not in p.stdout
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("flags,message", [
    (["--nnodes", "x"], "--nnodes takes an integer"),
    (["--nnodes", "0"], "--nnodes"),
    (["--node-rank", "-1"], "--node-rank"),
    (["--master"], "--master needs a value"),
])
def test_malformed_flag_values(launcher, flags, message, job):
    argv = _argv(launcher, flags, "-c", "pass") if flags != ["--master"] else \
        _argv(launcher, [], "")[:-1] + ["--master"]
    p = subprocess.run(argv, env=_env(job), capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("where", ["/proc/nope", "a-file/logs"])
def test_log_dir_that_cannot_be_made_is_one_line(launcher, where, job, tmp_path):
    # A --log-dir that cannot be created (or written): one line naming it, no traceback, and
    # the program does not run without the log it asked for.
    (tmp_path / "a-file").write_text("x")
    script = write(tmp_path, "never.py", "print('user code ran')\n")
    p = subprocess.run(_argv(launcher, ["--log-dir=" + where], script), env=_env(job),
                       capture_output=True, text=True, timeout=WAIT, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--log-dir %s" % where in p.stderr and "user code ran" not in p.stdout


def test_c_launcher_refuses_cluster_flags_outside_run(job):
    if not HAVE_BIN:
        pytest.skip("launcher not built (%s): run `make build`" % BIN)
    p = subprocess.run([BIN, "--nnodes", "2", "info"], env=_env(job), capture_output=True,
                       text=True, timeout=WAIT)
    assert p.returncode == 2 and "options of `threadloom run`" in p.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_rendezvous_timeout_names_the_missing_node(launcher, job, tmp_path):
    script = write(tmp_path, "never.py", "print('user code ran')\n")
    p = subprocess.run(_argv(launcher, node_flags(2, 0, ["--rdzv-timeout", "1"]), script),
                       env=_env(job), capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 1, p.stderr
    assert "rank(s) 1 of 2 did not arrive" in p.stderr
    assert "user code ran" not in p.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_slurm_supplies_the_flags_and_narrows_gpus(launcher, job, tmp_path):
    script = write(tmp_path, "show.py", SHOW)
    slurm = {"SLURM_JOB_ID": job["id"], "SLURM_STEP_ID": "0", "SLURM_NNODES": "2",
             "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1",
             "SLURM_STEP_GPUS": "2,3"}
    procs = [start_node(launcher, job, [], script,
                        env=dict(slurm, SLURM_NODEID=str(r), SLURM_PROCID=str(r),
                                 SLURMD_NODENAME="n%d" % r))
             for r in range(2)]
    for r, p in enumerate(procs):
        rc, out, err = finish(p)
        assert rc == 0, err
        d = json.loads(out.strip().splitlines()[-1])
        assert (d["rank"], d["world"], d["hosts"]) == (r, 2, ["n0", "n1"])
        assert d["cvd"] == "2,3"           # from SLURM_STEP_GPUS, before CUDA started
        assert d["env"]["MASTER_ADDR"] == "127.0.0.1"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_slurm_cuda_visible_devices_is_kept_and_one_node_needs_no_rendezvous(launcher, job,
                                                                             tmp_path):
    script = write(tmp_path, "one.py", """
        import os
        from threadloom import cluster
        print(cluster.current(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    """)
    env = {"SLURM_JOB_ID": job["id"], "SLURM_STEP_ID": "0", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "n1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
           "SLURM_STEP_GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "0,1"}
    p = subprocess.run(_argv(launcher, [], script), env=_env(job, env), capture_output=True,
                       text=True, timeout=WAIT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["None", "0,1"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_log_dir_gets_each_nodes_output(launcher, job, tmp_path):
    script = write(tmp_path, "talk.py", """
        import sys
        from threadloom import cluster
        r = cluster.current().rank
        print("out from node", r)
        print("err from node", r, file=sys.stderr)
    """)
    logs = tmp_path / "logs"
    procs = [start_node(launcher, job, node_flags(2, r, ["--log-dir", str(logs)]), script)
             for r in range(2)]
    for r, p in enumerate(procs):
        rc, out, err = finish(p)
        assert rc == 0, err
        assert "out from node %d" % r in out           # the terminal still gets it
        assert "err from node %d" % r in err
        text = (logs / ("node-%d.log" % r)).read_text()
        assert "out from node %d\n" % r in text and "err from node %d\n" % r in text


# ---------------------------------------------------------------------------------------------
# NCCL bootstrap: one id for nnodes x GPUs ranks, exchanged through the store
# ---------------------------------------------------------------------------------------------

def _nccl_id_or_skip():
    try:
        return threadloom._core.nccl_unique_id()
    except threadloom.LibraryNotFoundError as e:
        pytest.skip("ncclGetUniqueId needs libnccl.so.2: %s" % e)


def test_nccl_unique_id_needs_no_gpu():
    a, b = _nccl_id_or_skip(), _nccl_id_or_skip()
    assert len(a) == len(b) == cluster.NCCL_ID_BYTES and a != b


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_nccl_id_exchange_across_processes(launcher, job, tmp_path):
    _nccl_id_or_skip()   # node 0 makes a real id with ncclGetUniqueId
    script = write(tmp_path, "boot.py", """
        import json
        from threadloom import cluster
        rv = cluster.current()
        out = []
        for _ in range(2):                      # two bootstraps: two ids, same ranks
            b = rv.nccl_bootstrap(2, timeout=60)
            out.append({"id": b.unique_id.hex(), "world": b.world_size,
                        "ranks": [b.rank_of(g) for g in range(2)], "gen": b.generation})
        print(json.dumps(out))
    """)
    procs = [start_node(launcher, job, node_flags(3, r), script) for r in range(3)]
    got = []
    for p in procs:
        rc, out, err = finish(p)
        assert rc == 0, err
        got.append(json.loads(out.strip().splitlines()[-1]))
    for k in range(2):
        assert len({g[k]["id"] for g in got}) == 1               # every node has node 0's id
        assert {g[k]["world"] for g in got} == {6}
        assert sorted(r for g in got for r in g[k]["ranks"]) == list(range(6))
        assert [g[k]["ranks"] for g in got] == [[0, 1], [2, 3], [4, 5]]
        assert {g[k]["gen"] for g in got} == {k}
    assert got[0][0]["id"] != got[0][1]["id"]


def _threads_rendezvous(n, job):
    """n Rendezvous objects, one per node, met from threads of this process."""
    out, errs = [None] * n, []

    def node(r):
        try:
            out[r] = cluster.rendezvous(n, r, "127.0.0.1", token=job["token"], job_id=job["id"],
                                        timeout=60, environ={})
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    ts = [threading.Thread(target=node, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs, errs
    return out


def _close_all(rvs):
    ts = [threading.Thread(target=rv.close) for rv in rvs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def test_nccl_bootstrap_gpu_count_mismatch_aborts_the_job(job):
    rvs = _threads_rendezvous(2, job)
    errs = [None, None]
    fixed_id = bytes(range(128))

    def node(r):
        try:
            rvs[r].nccl_bootstrap(2 + r, timeout=60, unique_id=lambda: fixed_id)
        except threadloom.Error as e:
            errs[r] = e

    ts = [threading.Thread(target=node, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(isinstance(e, threadloom.InvalidArgumentError) for e in errs)
    assert "node 1 (" in str(errs[0]) and "drives 3 GPUs" in str(errs[0])
    reason = json.loads(rvs[0].store.get(cluster.ABORT_KEY))["reason"]
    assert "failed in the NCCL bootstrap" in reason
    _close_all(rvs)


def test_nccl_bootstrap_timeout_names_missing_node_and_publishes_abort(job):
    rvs = _threads_rendezvous(3, job)
    errs = {}

    def node(r):   # nodes 0 and 1 arrive, node 2 never does
        try:
            rvs[r].nccl_bootstrap(1, timeout=1, unique_id=lambda: bytes(128))
        except threadloom.Error as e:
            errs[r] = e

    ts = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in (0, 1):
        assert isinstance(errs[r], threadloom.TimedOutError)
        assert "node(s) 2 did not arrive" in str(errs[r])
    assert "did not arrive" in json.loads(rvs[2].store.wait(cluster.ABORT_KEY, 30))["reason"]
    _close_all(rvs)


def test_nccl_bootstrap_rank_arithmetic_and_bad_arguments(job):
    (rv,) = _threads_rendezvous(1, job)
    b = rv.nccl_bootstrap(4, unique_id=lambda: b"\x07" * 128)
    assert (b.world_size, list(b.ranks), b.rank_of(3)) == (4, [0, 1, 2, 3], 3)
    with pytest.raises(threadloom.InvalidArgumentError, match="local_gpu must be in 0..3"):
        b.rank_of(4)
    with pytest.raises(threadloom.InvalidArgumentError, match="gpus_per_node"):
        rv.nccl_bootstrap(0)
    with pytest.raises(threadloom.InvalidArgumentError, match="has 5 bytes"):
        rv.nccl_bootstrap(1, unique_id=lambda: b"short")
    rv.close()


@pytest.mark.gpu
def test_nccl_comm_one_gpu_world(job, require_gpu):
    _nccl_id_or_skip()
    (rv,) = _threads_rendezvous(1, job)
    b = rv.nccl_bootstrap(1)
    comm = b.init_comm(0)
    assert (comm.rank, comm.nranks, comm.device) == (0, 1, 0)
    assert rv.abort_comms() == 1 and comm.aborted
    comm.close()
    assert comm.closed
    rv.close()


def test_nccl_comm_without_gpu_says_why():
    uid = _nccl_id_or_skip()
    n, _ = (0, None)
    try:
        n = threadloom._core.cuda_device_count()
    except threadloom.Error:
        pass
    if n:
        pytest.skip("this machine has a GPU: the GPU test covers NcclComm")
    with pytest.raises((threadloom.NoDriverError, threadloom.NoDeviceError, threadloom.NotBuiltError)):
        threadloom._core.NcclComm(uid, 1, 0, 0)
    with pytest.raises(ValueError, match="128 bytes"):
        threadloom._core.NcclComm(b"x", 1, 0, 0)


# ---------------------------------------------------------------------------------------------
# Watchdog: a dead or failing node takes every node down, with one line naming it
# ---------------------------------------------------------------------------------------------

STUCK = """
    import os, threading
    from threadloom import cluster
    rv = cluster.current()
    print("ready", rv.rank, os.getpid(), flush=True)
    threading.Event().wait()      # as good as a rank stuck in a collective forever
"""


def _watchdog_job(launcher, job, tmp_path, n=3, script=STUCK, args=()):
    path = write(tmp_path, "node.py", script)
    procs = [start_node(launcher, job, node_flags(n, r, ["--watchdog-timeout", str(WATCHDOG_S)]), path, *args)
             for r in range(n)]
    for p in procs:
        wait_ready(p)
    return procs


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigkill_of_a_node_aborts_the_others(launcher, job, tmp_path):
    procs = _watchdog_job(launcher, job, tmp_path)
    procs[2].send_signal(signal.SIGKILL)
    assert procs[2].wait(WAIT) == -signal.SIGKILL
    for r in (0, 1):
        rc, _, err = finish(procs[r])
        assert rc == cluster.ABORT_EXIT, err
        lines = [l for l in err.splitlines() if "aborts" in l]
        assert len(lines) == 1, err
        assert lines[0].startswith("threadloom: node %d (" % r)
        assert "node 2 (" in lines[0] and "heartbeat" in lines[0]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigkill_of_node_0_is_seen_as_the_store_going(launcher, job, tmp_path):
    procs = _watchdog_job(launcher, job, tmp_path)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(WAIT)
    for r in (1, 2):
        rc, _, err = finish(procs[r])
        assert rc == cluster.ABORT_EXIT, err
        assert "lost the rendezvous store on node 0" in err


FAILS = """
    import sys, threading
    from threadloom import cluster
    rv = cluster.current()
    print("ready", rv.rank, flush=True)
    sys.stdin.readline()                      # the test says when
    if rv.rank == int(sys.argv[1]):
        raise ValueError("boom on purpose")
    threading.Event().wait()
"""


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("failing", [0, 1])
def test_uncaught_exception_on_one_node_aborts_all(launcher, failing, job, tmp_path):
    path = write(tmp_path, "fails.py", FAILS)
    procs = [subprocess.Popen(_argv(launcher, node_flags(3, r, ["--watchdog-timeout", str(WATCHDOG_S)]), path,
                                    str(failing)), env=_env(job), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(3)]
    for p in procs:
        wait_ready(p)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for r, p in enumerate(procs):
        rc, _, err = finish(p)
        if r == failing:
            assert rc == 1 and "ValueError: boom on purpose" in err, err
            assert "aborts" not in err
        else:
            assert rc == cluster.ABORT_EXIT, err
            assert ("node %d (" % failing) in err and "failed: ValueError: boom on purpose" in err


def test_watchdog_cancels_spmd_collectives_without_exiting(job):
    rvs = _threads_rendezvous(2, job)
    wd = cluster.Watchdog(rvs[0], timeout=1.0, exit=False).start()  # node 1 never beats
    rvs[0].watchdog = wd

    def train(ctx):
        if ctx.rank == 1:
            wd.aborted.wait(WAIT)               # busy elsewhere until the job aborts
            return "left"
        ctx.barrier()                           # waits for rank 1 until the abort

    with pytest.raises(threadloom.CanceledError, match="node 1 .* sent no heartbeat"):
        threadloom.spmd(train, devices="cpu", cpu_world=2, pin=False)
    assert wd.aborted.is_set() and "node 1" in wd.reason
    rvs[1].close()
    rvs[0].close()


def test_clean_exit_is_not_a_failure(job, tmp_path):
    """Nodes finishing at different times leave cleanly: no watchdog fires."""
    script = write(tmp_path, "end.py", """
        import sys
        from threadloom import cluster
        rv = cluster.current()
        print("ready", rv.rank, flush=True)
        sys.stdin.readline()
    """)
    procs = [subprocess.Popen(_argv("py", node_flags(3, r, ["--watchdog-timeout", str(WATCHDOG_S)]), script),
                              env=_env(job), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(3)]
    for p in procs:
        wait_ready(p)
    for p in (procs[0], procs[2], procs[1]):     # node 0 first: it waits for the others
        p.stdin.write("end\n")
        p.stdin.flush()
        p.stdin.close()
    for p in procs:
        rc, _, err = finish(p)
        assert rc == 0 and "aborts" not in err, err


# ---------------------------------------------------------------------------------------------
# Preemption: checkpoint, scontrol requeue, distinct exit status, resume on restart
# ---------------------------------------------------------------------------------------------

def fake_scontrol(tmp_path, status=0, message=""):
    """A real program standing in for scontrol: appends its arguments to a file, prints
    `message` on stderr and exits with `status`."""
    record = tmp_path / "scontrol.calls"
    path = tmp_path / "scontrol"
    path.write_text("#!/bin/sh\necho \"$@\" >> %s\n%sexit %d\n" % (
        record, ("echo '%s' >&2\n" % message) if message else "", status))
    path.chmod(0o755)
    return str(path), record


TRAIN = """
    import sys, threading
    import threadloom
    from threadloom import cluster

    ckdir, scontrol, defer = sys.argv[1], sys.argv[2], sys.argv[3] == "defer"
    try:
        state = threadloom.load(ckdir)
        print("resumed at step", state["step"], flush=True)
    except threadloom.NotFoundError:
        state = {"step": 0, "w": [0.0] * 4}
    ck = threadloom.Checkpointer(ckdir)
    p = cluster.on_preempt(ck, state=lambda: (state, state["step"]), defer=defer,
                           commands=cluster.SlurmCommands(scontrol=scontrol))
    first = state["step"]
    while True:
        state["step"] += 1
        state["w"] = [x + 1.0 for x in state["w"]]
        if defer:
            p.check()
        if state["step"] == first + 3:
            print("ready", state["step"], flush=True)   # (after check: the signal comes next)
        if state["step"] >= first + 3:
            if defer:
                p.requested.wait()
            else:
                threading.Event().wait()      # the preemption thread ends this
"""


@pytest.mark.parametrize("defer", ["now", "defer"])
def test_usr2_checkpoints_requeues_and_resumes(defer, tmp_path):
    script = write(tmp_path, "train.py", TRAIN)
    scontrol, record = fake_scontrol(tmp_path)
    ck = str(tmp_path / "ck")
    env = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "0"}

    def run_once():
        p = subprocess.Popen([sys.executable, script, ck, scontrol, defer],
                             env=_env({"token": "x" * 32, "id": "p"}, env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = wait_ready(p)
        p.send_signal(signal.SIGUSR2)
        rc, out, err = finish(p)
        return int(ready[1]), rc, out, err

    step, rc, out, err = run_once()
    # now: the main thread is parked at `step`; defer: check() runs at the next step boundary
    step += defer == "defer"
    assert rc == cluster.PREEMPT_EXIT, err
    assert "checkpoint saved (step %d" % step in err and "requeued SLURM job 4242" in err
    assert record.read_text().split() == ["requeue", "4242"]
    saved = threadloom.load(ck)
    assert saved["step"] == step
    assert list(saved["w"]) == [float(step)] * 4
    # the requeued job starts again and resumes from that checkpoint
    step2, rc, out, err = run_once()
    assert "resumed at step %d" % saved["step"] in out
    assert step2 == step + 3 and rc == cluster.PREEMPT_EXIT, err
    assert record.read_text().split() == ["requeue", "4242"] * 2


def test_requeue_failure_is_reported_and_not_the_preempt_status(tmp_path):
    script = write(tmp_path, "train.py", TRAIN)
    scontrol, record = fake_scontrol(tmp_path, status=1,
                                     message="slurm_requeue error: Job is pending execution")
    ck = str(tmp_path / "ck")
    p = subprocess.Popen([sys.executable, script, ck, scontrol, "now"],
                         env=_env({"token": "x" * 32, "id": "p"}, {"SLURM_JOB_ID": "77"}),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_ready(p)
    p.send_signal(signal.SIGUSR2)
    rc, _, err = finish(p)
    assert rc == 1
    assert "requeue failed" in err and "Job is pending execution" in err and "status 1" in err
    assert threadloom.load(ck)["step"] >= 3          # the checkpoint was still saved
    assert record.read_text().split() == ["requeue", "77"]


def test_requeue_backend_errors(tmp_path):
    with pytest.raises(threadloom.NotFoundError, match="install slurm-client"):
        cluster.SlurmCommands(scontrol=str(tmp_path / "absent")).requeue("1")
    scontrol, _ = fake_scontrol(tmp_path, status=3, message="nope")
    with pytest.raises(threadloom.InputOutputError, match="failed with status 3: nope") as ei:
        cluster.SlurmCommands(scontrol=scontrol).requeue("1")
    # The advice is about SLURM, not the disk the error table's EIO advice is for.
    assert "scontrol ping" in ei.value.hint and "dmesg" not in str(ei.value)


def test_on_preempt_bad_arguments(tmp_path):
    with threadloom.Checkpointer(tmp_path / "ck") as ck:
        with pytest.raises(threadloom.InvalidArgumentError, match="state must be a callable"):
            cluster.on_preempt(ck)
    with pytest.raises(threadloom.InvalidArgumentError, match="unknown signal"):
        cluster.on_preempt(lambda: None, signal="NOPE")
    with pytest.raises(threadloom.InvalidArgumentError, match="Checkpointer or a callable"):
        cluster.on_preempt(42)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_preemption_of_a_two_node_job(launcher, job, tmp_path):
    """Both nodes get USR2 (SLURM signals every step task): each saves, node 0 alone
    requeues, both leave cleanly (the watchdog stays quiet) with PREEMPT_EXIT."""
    scontrol, record = fake_scontrol(tmp_path)
    script = write(tmp_path, "node.py", """
        import sys, threading
        from threadloom import cluster
        rv = cluster.current()
        saved = []
        cluster.on_preempt(lambda: saved.append(rv.rank) or "node %d" % rv.rank,
                           commands=cluster.SlurmCommands(scontrol=sys.argv[1]))
        print("ready", rv.rank, flush=True)
        threading.Event().wait()
    """)
    env = {"SLURM_JOB_ID": "555", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1"}
    procs = [start_node(launcher, job, node_flags(2, r, ["--watchdog-timeout", str(WATCHDOG_S)]), script,
                        scontrol, env=dict(env, SLURM_NODEID=str(r), SLURM_PROCID=str(r)))
             for r in range(2)]
    for p in procs:
        wait_ready(p)
    for p in procs:
        p.send_signal(signal.SIGUSR2)
    for r, p in enumerate(procs):
        rc, _, err = finish(p)
        assert rc == cluster.PREEMPT_EXIT, err
        assert "checkpoint saved (node %d)" % r in err and "aborts" not in err
    assert record.read_text().split() == ["requeue", "555"]


# ---------------------------------------------------------------------------------------------
# The preemption signal while exiting, and with nobody to handle it
# ---------------------------------------------------------------------------------------------

ONE_NODE_SLURM = {"SLURM_JOB_ID": "31", "SLURM_NNODES": "1", "SLURM_NTASKS": "1",
                  "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "127.0.0.1"}

# The process stops twice on its way out, each time until the test has sent the signal and
# written a byte to its stdin: in an atexit hook registered before on_preempt's (atexit runs
# hooks last-in first-out, so on_preempt's has run), and in a __del__ that runs while
# __main__'s globals are cleared, after Python has put SIG_DFL back for every signal whose
# handler was a Python function.
EXITING = """
    import atexit, os, sys
    from threadloom import cluster

    def stop(what, write=os.write, read=os.read):
        write(1, b"%s\\n" % what.encode())
        read(0, 1)
        write(1, b"after %s\\n" % what.encode())

    class Last:
        def __del__(self, stop=stop):   # (globals may be gone by now)
            stop("finalizing")

    last = Last()
    atexit.register(stop, "atexit")
    if sys.argv[1] == "on_preempt":
        cluster.on_preempt(lambda: "saved", requeue=False)
    print("ready", flush=True)
"""


@pytest.mark.parametrize("how", [
    pytest.param(("python", "on_preempt"), id="python-on_preempt"),
    pytest.param(("c", "on_preempt"), id="launcher-on_preempt",
                 marks=pytest.mark.skipif(not HAVE_BIN, reason="launcher not built")),
    pytest.param(("c", "none"), id="launcher-no-handler",
                 marks=pytest.mark.skipif(not HAVE_BIN, reason="launcher not built")),
    pytest.param(("py", "none"), id="python-m-launcher-no-handler"),
])
def test_preemption_signal_while_exiting_is_ignored(how, tmp_path):
    """A process that is already exiting when the signal comes ends normally: no preemption
    work starts (the job is done), and it is not killed by the signal (with srun
    --kill-on-bad-exit a task dying of it fails the whole job). Under SLURM the launchers'
    notice covers a program that never called on_preempt, through finalization too."""
    launcher, mode = how
    script = write(tmp_path, "exiting.py", EXITING)
    argv = [sys.executable, script, mode] if launcher == "python" else _argv(launcher, [], script, mode)
    p = subprocess.Popen(argv, env=_env({"token": "x" * 32, "id": "e"}, ONE_NODE_SLURM),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_ready(p)
    for stage in ("atexit", "finalizing"):
        line = p.stdout.readline()
        assert line == stage + "\n", (line, p.early)
        p.send_signal(signal.SIGUSR2)
        if mode == "none":   # the notice is written by the handler, before kill() returns here
            notice = p.stderr.readline()
            assert "SIGUSR2 (the job's preemption warning) arrived" in notice, notice
            assert "did not call threadloom.cluster.on_preempt()" in notice
        p.stdin.write("x")
        p.stdin.flush()
        assert p.stdout.readline() == "after %s\n" % stage
    p.stdin.close()
    rc, out, err = finish(p)
    assert rc == 0, (rc, err)
    assert "preemption" not in err and "saved" not in err, err


NO_HANDLER = """
    import os, sys
    print("ready", flush=True)
    os.read(0, 1)
    print("still running", flush=True)
"""


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("var, sig", [(None, signal.SIGUSR2), ("HUP", signal.SIGHUP),
                                      ("SIGTERM", signal.SIGTERM), ("12", signal.SIGUSR2)])
def test_launcher_notices_a_preemption_signal_nobody_handles(launcher, var, sig, tmp_path):
    """Under SLURM the launchers ignore the job's preemption signal (THREADLOOM_PREEMPT_SIGNAL,
    else USR2) until on_preempt takes it, and write one line saying so: the program goes on
    instead of dying 120 s before its time limit."""
    script = write(tmp_path, "busy.py", NO_HANDLER)
    env = dict(ONE_NODE_SLURM, **({"THREADLOOM_PREEMPT_SIGNAL": var} if var else {}))
    p = subprocess.Popen(_argv(launcher, [], script), env=_env({"token": "x" * 32, "id": "n"}, env),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_ready(p)
    p.send_signal(sig)
    notice = p.stderr.readline()
    assert notice.startswith("threadloom: %s (the job's preemption warning) arrived, but the "
                             "program did not call threadloom.cluster.on_preempt(): ignored"
                             % sig.name), notice
    p.stdin.write("x")
    p.stdin.close()
    rc, out, err = finish(p)
    assert rc == 0 and "still running" in out, (rc, err)
    assert err == "", err   # one line per signal, nothing else


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bad_preemption_signal_variable_stops_the_launcher(launcher, tmp_path):
    script = write(tmp_path, "t.py", "print('ran')\n")
    for value, words in (("NOPE", "unknown signal"), ("KILL", "cannot be caught"),
                         ("999", "not a signal number")):
        p = subprocess.run(_argv(launcher, [], script), capture_output=True, text=True,
                           timeout=WAIT, env=_env({"token": "x" * 32, "id": "b"},
                                                  dict(ONE_NODE_SLURM, THREADLOOM_PREEMPT_SIGNAL=value)))
        assert p.returncode == 2 and "ran" not in p.stdout, p.stderr
        assert "THREADLOOM_PREEMPT_SIGNAL=%r" % value in p.stderr and words in p.stderr, p.stderr


def test_signal_helpers_refuse_what_cannot_be_caught():
    from threadloom import _core
    for bad in (0, signal.SIGKILL, signal.SIGSTOP, 100000):
        for fn in (_core.signal_ignore, _core.preempt_notice):
            with pytest.raises(threadloom.InvalidArgumentError, match="cannot be caught"):
                fn(int(bad))
    with pytest.raises(threadloom.InvalidArgumentError, match="cannot be caught"):
        cluster.on_preempt(lambda: None, signal="KILL")
    with pytest.raises(threadloom.InvalidArgumentError, match="peer_timeout"):
        cluster.on_preempt(lambda: None, peer_timeout=0)


def test_on_preempt_follows_the_job_signal_and_uninstall_restores_the_notice(tmp_path):
    script = write(tmp_path, "follow.py", """
        import os, signal, sys
        from threadloom import cluster
        from threadloom.cluster import preempt
        os.environ["THREADLOOM_PREEMPT_SIGNAL"] = "HUP"
        preempt.guard_preempt_signal()
        p = cluster.on_preempt(lambda: "x", requeue=False)
        print(p.signal.name, signal.getsignal(signal.SIGHUP) == p._handler, flush=True)
        p.uninstall()
        os.kill(os.getpid(), signal.SIGHUP)     # the notice again: a line, not a death
        print("alive", flush=True)
    """)
    r = run_python(script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["SIGHUP", "True", "alive"]
    assert "SIGHUP (the job's preemption warning) arrived" in r.stderr


# ---------------------------------------------------------------------------------------------
# Several nodes: node 0 requeues once every node has saved
# ---------------------------------------------------------------------------------------------

def slurm_like_scontrol(tmp_path, marker_dir):
    """A stand-in for scontrol that behaves as SLURM's requeue does to the caller's job: it
    records its arguments and which nodes had finished saving when it ran (the marker files
    node.py writes after its save), then sends SIGTERM to its caller (SLURM ends the step on
    every node with SIGTERM at once)."""
    record = tmp_path / "scontrol.calls"
    path = tmp_path / "scontrol"
    path.write_text("#!/bin/sh\necho \"$@\" saved: $(ls %s | sort | tr '\\n' ' ') >> %s\n"
                    "kill -TERM $PPID\nexit 0\n" % (marker_dir, record))
    path.chmod(0o755)
    return str(path), record


SLOW_SAVE = """
    import os, sys, threading
    from threadloom import cluster
    rv = cluster.current()
    scontrol, markers, slow, peer_timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    def save():
        if rv.rank == slow:
            print("saving slowly", flush=True)
            sys.stdin.read(1)                   # until the test lets this node finish
        open(os.path.join(markers, "node-%d" % rv.rank), "w").close()
        return "node %d" % rv.rank

    cluster.on_preempt(save, commands=cluster.SlurmCommands(scontrol=scontrol),
                       peer_timeout=peer_timeout)
    print("ready", rv.rank, flush=True)
    threading.Event().wait()
"""


def _slow_save_job(launcher, job, tmp_path, peer_timeout):
    markers = tmp_path / "saved"
    markers.mkdir()
    scontrol, record = slurm_like_scontrol(tmp_path, markers)
    script = write(tmp_path, "node.py", SLOW_SAVE)
    env = {"SLURM_JOB_ID": "556", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1"}
    procs = [subprocess.Popen(_argv(launcher, node_flags(2, r), script, scontrol, str(markers),
                                    "1", str(peer_timeout)),
                              env=_env(job, dict(env, SLURM_NODEID=str(r), SLURM_PROCID=str(r))),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        wait_ready(p)
    for p in procs:
        p.send_signal(signal.SIGUSR2)
    assert procs[1].stdout.readline() == "saving slowly\n"
    return procs, record


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_node0_requeues_only_after_every_node_saved(launcher, job, tmp_path):
    """`scontrol requeue` ends the step on every node at once, so node 0 waits for the other
    nodes' checkpoints; they in turn exit only after the requeue (srun --kill-on-bad-exit would
    kill node 0 on their non-zero exit). SIGTERM, which the requeue sends, is ignored."""
    procs, record = _slow_save_job(launcher, job, tmp_path, 120)
    # node 0 has saved and says it is waiting for node 1, which is still saving
    early = ""
    for line in iter(procs[0].stderr.readline, ""):
        early += line
        if "waiting up to 120 s for node(s) 1 to save before the requeue" in line:
            break
    assert "checkpoint saved (node 0)" in early, early
    assert not record.exists(), record.read_text()
    procs[1].stdin.write("x")
    procs[1].stdin.close()
    for r, p in enumerate(procs):
        rc, _, err = finish(p)
        err = (early if r == 0 else "") + err
        assert rc == cluster.PREEMPT_EXIT, err
        assert "checkpoint saved (node %d)" % r in err and "aborts" not in err, err
    assert record.read_text().split() == ["requeue", "556", "saved:", "node-0", "node-1"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_node0_requeues_without_a_node_that_does_not_save_in_time(launcher, job, tmp_path):
    procs, record = _slow_save_job(launcher, job, tmp_path, 0.5)
    rc, _, err = finish(procs[0])
    assert rc == cluster.PREEMPT_EXIT, err
    assert "node(s) 1 did not report a checkpoint within 0.5 s; requeueing without them" in err
    assert record.read_text().split() == ["requeue", "556", "saved:", "node-0"]
    try:
        procs[1].stdin.write("x")   # node 1 finishes its save late: the requeue is done
        procs[1].stdin.close()
    except BrokenPipeError:
        pass                        # ... or its watchdog saw node 0 go and ended it
    rc, _, err = finish(procs[1])
    # node 0, and its store, are gone: node 1 fails to report (1) or its watchdog sees the
    # store gone first (ABORT_EXIT); SLURM would have ended it with SIGKILL by now anyway
    assert rc in (1, cluster.ABORT_EXIT), err
