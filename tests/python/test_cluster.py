"""threadloom.cluster: SLURM environment, host lists, the rendezvous store and its protocol.

Nodes are simulated as threads on 127.0.0.1; each test uses its own random job id and token,
so tests never meet each other's stores. Nothing here sleeps to order threads: ranks block in
rendezvous() until all have arrived, and failures are bounded by the deadlines under test."""

import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import threadloom
from threadloom import cluster
from threadloom.cluster import store

# ---------------------------------------------------------------------------------------------
# Host lists
# ---------------------------------------------------------------------------------------------

# Lists that scontrol 22.05 expands, with the expansion it prints (checked against scontrol
# show hostnames in test_matches_scontrol when it is installed).
AGREED = [
    ("linux[1,2]", ["linux1", "linux2"]),
    ("a,b", ["a", "b"]),
    (",a,,b,", ["a", "b"]),
    ("a b\tc", ["a", "b", "c"]),
    ("a,a", ["a", "a"]),
    ("node[001-003,7]", ["node001", "node002", "node003", "node7"]),
    ("n[8-12]", ["n8", "n9", "n10", "n11", "n12"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[1-010]", ["n%d" % i for i in range(1, 11)]),
    ("n[01-1]", ["n01"]),
    ("n0[8-9]", ["n08", "n09"]),
    ("[1-3]", ["1", "2", "3"]),
    ("a-[1-2]", ["a-1", "a-2"]),
    ("gpu-node-[1-2],login.example.com", ["gpu-node-1", "gpu-node-2", "login.example.com"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("n[1-2][3]", ["n13", "n23"]),
    ("n[1-2] , m", ["n1", "n2", "m"]),
    ("n[3,1,2]", ["n3", "n1", "n2"]),
    ("a_b[1-2],c", ["a_b1", "a_b2", "c"]),
    # 3+ groups: scontrol varies the last group fastest, then the others from the left
    ("a[1-2]b[1-2]c[1-2]", ["a1b1c1", "a1b1c2", "a2b1c1", "a2b1c2", "a1b2c1", "a1b2c2", "a2b2c1",
                            "a2b2c2"]),
    ("n[1-2]-[3-4].x[5-6]y[7-8]", ["n%d-%d.x%dy%d" % (a, b, c, d) for c in (5, 6) for b in (3, 4)
                                   for a in (1, 2) for d in (7, 8)]),
    ("", []),
]
# Lists both reject.
BOTH_REJECT = ["n[3-1]", "n[]", "n[1,,2]", "n[a-b]", "n[-1]", "n[[1]]", "n[1-2]]", "n[1,2 ]",
               "n[0-2000000]"]
# Where threadloom departs from scontrol 22.05 on purpose (see include/threadloom/cluster.h):
# list -> threadloom's result (a list, or None for InvalidArgumentError).
DEPARTURES = {
    "n[1-2]-ib": ["n1-ib", "n2-ib"],        # scontrol: invalid (suffix after ']')
    "a.b-c[1-2].d": ["a.b-c1.d", "a.b-c2.d"],  # scontrol: invalid
    "n[1-2": None,                          # scontrol: "n]"
    "n1-2]": None,                          # scontrol: "n1-2]"
    "n[ 1-2]": None,                        # scontrol: n01 n02
    "n[1-]": None,                          # scontrol: n1
}


@pytest.mark.parametrize("hostlist,want", AGREED)
def test_hostlist_expand(hostlist, want):
    assert threadloom._core.hostlist_expand(hostlist) == want


def test_hostlist_errors_name_the_position():
    with pytest.raises(threadloom.InvalidArgumentError) as e:
        threadloom._core.hostlist_expand("ok,n[1-2")
    assert "position 4" in e.value.detail and "no matching ']'" in e.value.detail
    with pytest.raises(threadloom.OutOfRangeError):
        threadloom._core.hostlist_expand("n[0-2000000]")
    with pytest.raises(ValueError):
        threadloom._core.hostlist_expand("a\0b")
    for bad in BOTH_REJECT:
        with pytest.raises(threadloom.Error):
            threadloom._core.hostlist_expand(bad)


def test_hostlist_non_ascii_is_a_clear_error():
    # An en dash typed for '-' used to surface as UnicodeDecodeError (half a UTF-8 sequence in
    # the message).
    with pytest.raises(threadloom.InvalidArgumentError) as e:
        threadloom._core.hostlist_expand("n[1\u20133]")
    assert "not ASCII" in str(e.value) and "en dash" in str(e.value)
    with pytest.raises(threadloom.InvalidArgumentError):
        threadloom._core.hostlist_expand("n\u00e9[1-2\u2013]")


def _random_hostlist(rng):
    names = []
    for _ in range(rng.randint(1, 3)):
        parts = []
        for _ in range(rng.randint(1, 4)):
            ranges = []
            for _ in range(rng.randint(1, 2)):
                a = rng.randint(0, 9)
                b = a + rng.randint(0, 2)
                ranges.append("%0*d-%d" % (rng.choice((1, 2)), a, b) if b > a else str(a))
            parts.append(rng.choice("abxn") + "[%s]" % ",".join(ranges))
        names.append("".join(parts))
    return ",".join(names)


@pytest.mark.skipif(shutil.which("scontrol") is None,
                    reason="scontrol not installed (apt-get install slurm-client)")
def test_random_lists_match_scontrol(tmp_path):
    # Seeded: 1-3 names of 1-4 bracket groups each, many lists per scontrol call.
    import random
    rng = random.Random(20261203)
    lists = [_random_hostlist(rng) for _ in range(300)]
    assert any(l.count("[") >= 3 for l in lists)
    theirs = _scontrol(tmp_path, ",".join(lists))
    ours = threadloom._core.hostlist_expand(",".join(lists))
    assert theirs == ours


def _scontrol(tmp_path, hostlist):
    conf = tmp_path / "slurm.conf"
    if not conf.exists():
        # scontrol reads a configuration before it parses anything; this one names no daemons
        # that have to run.
        conf.write_text("ClusterName=tlcmp\nSlurmctldHost=localhost\nNodeName=localhost\n"
                        "PartitionName=p Nodes=localhost\n")
    env = dict(os.environ, SLURM_CONF=str(conf))
    p = subprocess.run(["scontrol", "show", "hostnames", hostlist], env=env, capture_output=True,
                       text=True, timeout=30)
    ok = p.returncode == 0 and "Invalid hostlist" not in p.stdout + p.stderr
    return p.stdout.split() if ok else None


@pytest.mark.skipif(shutil.which("scontrol") is None,
                    reason="scontrol not installed (apt-get install slurm-client)")
def test_matches_scontrol(tmp_path):
    for hostlist, want in AGREED:
        if hostlist == "":
            continue  # scontrol with an empty argument prints nothing, as we return []
        assert _scontrol(tmp_path, hostlist) == want, hostlist
    for hostlist in BOTH_REJECT:
        assert _scontrol(tmp_path, hostlist) is None, hostlist
    for hostlist, ours in DEPARTURES.items():
        theirs = _scontrol(tmp_path, hostlist)
        assert theirs != ours, "%s: scontrol now agrees; move it to AGREED" % hostlist
        if ours is None:
            with pytest.raises(threadloom.InvalidArgumentError):
                threadloom._core.hostlist_expand(hostlist)
        else:
            assert threadloom._core.hostlist_expand(hostlist) == ours


# ---------------------------------------------------------------------------------------------
# SLURM environment
# ---------------------------------------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NODEID": "2",
         "SLURM_NTASKS": "4", "SLURM_NNODES": "4", "SLURM_LOCALID": "0",
         "SLURM_JOB_NODELIST": "gpu-[007-008],gpu-rack2-[01-02]", "SLURMD_NODENAME": "gpu-rack2-01"}


def test_slurm_env_none_outside_slurm():
    assert cluster.slurm_env({}) is None


def test_slurm_env_parses():
    se = cluster.slurm_env(dict(SLURM, CUDA_VISIBLE_DEVICES="2,3", SLURM_STEP_GPUS="2,3"))
    assert se.nodelist == ("gpu-007", "gpu-008", "gpu-rack2-01", "gpu-rack2-02")
    assert (se.rank, se.node_rank, se.nnodes, se.ntasks, se.local_rank) == (2, 2, 4, 4, 0)
    assert se.master_addr == "gpu-007" and se.nodename == "gpu-rack2-01"
    assert se.gpus == ("2", "3") and se.gpu_source == "CUDA_VISIBLE_DEVICES"
    assert se.cuda_visible_devices == "2,3"
    assert set(se.cpus) == os.sched_getaffinity(0)


def test_slurm_env_gpus():
    # CUDA_VISIBLE_DEVICES narrowed (by SLURM or the user) wins over SLURM's GPU lists.
    se = cluster.slurm_env(dict(SLURM, CUDA_VISIBLE_DEVICES="5", SLURM_STEP_GPUS="4,5"))
    assert se.gpus == ("5",)
    se = cluster.slurm_env(dict(SLURM, SLURM_STEP_GPUS="4,5", SLURM_JOB_GPUS="0,4,5"))
    assert se.gpus == ("4", "5") and se.cuda_visible_devices == "4,5"
    se = cluster.slurm_env(dict(SLURM))
    assert se.gpus == () and se.cuda_visible_devices is None
    se = cluster.slurm_env(dict(SLURM, CUDA_VISIBLE_DEVICES=""))  # SLURM gave no GPUs
    assert se.gpus == () and se.cuda_visible_devices == ""


def test_slurm_env_errors():
    with pytest.raises(threadloom.InvalidArgumentError, match="SLURM_PROCID='x'"):
        cluster.slurm_env(dict(SLURM, SLURM_PROCID="x"))
    with pytest.raises(threadloom.InvalidArgumentError, match="names 4 nodes"):
        cluster.slurm_env(dict(SLURM, SLURM_NNODES="3"))
    with pytest.raises(threadloom.InvalidArgumentError, match="position"):
        cluster.slurm_env(dict(SLURM, SLURM_JOB_NODELIST="gpu-[1-2"))
    with pytest.raises(threadloom.InvalidArgumentError, match="ntasks-per-node=1"):
        cluster.rendezvous(environ=dict(SLURM, SLURM_NTASKS="8", THREADLOOM_JOB_TOKEN="t" * 32))


# ---------------------------------------------------------------------------------------------
# Secret and ports
# ---------------------------------------------------------------------------------------------

def test_secret_needs_a_random_token():
    with pytest.raises(threadloom.InvalidArgumentError, match="THREADLOOM_JOB_TOKEN"):
        cluster.job_secret(None, "slurm:1.0")
    with pytest.raises(threadloom.InvalidArgumentError, match="at least 16"):
        cluster.job_secret("short", "slurm:1.0")
    t = cluster.new_job_token()
    assert len(t) == 64 and t != cluster.new_job_token()
    assert cluster.job_secret(t, "slurm:1.0") != cluster.job_secret(t, "slurm:1.1")
    assert cluster.job_secret(t, "a") != cluster.job_secret(cluster.new_job_token(), "a")


def test_ports_deterministic_in_range():
    a = cluster.store_ports("slurm:4242.0")
    assert a == cluster.store_ports("slurm:4242.0") and len(a) == cluster.PORT_TRIES
    assert all(cluster.PORT_BASE <= p < cluster.PORT_BASE + cluster.PORT_SPAN for p in a)
    assert len(set(a)) == len(a)


# ---------------------------------------------------------------------------------------------
# Rendezvous
# ---------------------------------------------------------------------------------------------

def _job():
    return {"token": cluster.new_job_token(), "job_id": "test-" + secrets.token_hex(4)}


def _run_nodes(nnodes, job, master="127.0.0.1", timeout=30.0, ranks=None):
    """Runs rendezvous() for each rank in a thread; returns {rank: Rendezvous or exception}."""
    out = {}

    def node(r):
        try:
            out[r] = cluster.rendezvous(nnodes, r, master, timeout=timeout, environ={}, **job)
        except BaseException as e:  # reported to the test
            out[r] = e

    threads = [threading.Thread(target=node, args=(r,)) for r in (ranks or range(nnodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
        assert not t.is_alive()
    return out


def _close_all(results):
    ths = [threading.Thread(target=rv.close) for rv in results.values()
           if isinstance(rv, cluster.Rendezvous)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)


def test_all_ranks_meet():
    res = _run_nodes(4, _job())
    try:
        for r, rv in res.items():
            assert isinstance(rv, cluster.Rendezvous), rv
            assert (rv.rank, rv.world_size) == (r, 4)
            assert rv.hosts == (socket.gethostname(),) * 4
        assert len({rv.master_port for rv in res.values()}) == 1
        assert len({rv.store_port for rv in res.values()}) == 1
        env = res[3].torchrun_env()
        assert env == {"RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "1",
                       "GROUP_RANK": "3", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(res[0].master_port)}
        e = {"RANK": "7"}
        res[1].apply_torchrun_env(e)
        assert e["RANK"] == "7" and e["WORLD_SIZE"] == "4"  # set values are kept
        # The store stays usable for later bootstrap steps.
        res[2].store.set("x", b"from 2")
        assert res[1].store.wait("x", 10) == b"from 2"
        assert res[3].store.add("n", 5) == 5 and res[0].store.add("n", -1) == 4
        assert res[0].store.get("missing") is None
    finally:
        _close_all(res)


def test_two_jobs_on_one_host_do_not_collide():
    # Same job id, so both derive the same ports; different tokens, so different secrets.
    a, b = _job(), _job()
    b["job_id"] = a["job_id"]
    res = {}
    ta = threading.Thread(target=lambda: res.update(a=_run_nodes(2, a)))
    tb = threading.Thread(target=lambda: res.update(b=_run_nodes(2, b)))
    ta.start(), tb.start()
    ta.join(), tb.join()
    try:
        for job in ("a", "b"):
            for rv in res[job].values():
                assert isinstance(rv, cluster.Rendezvous), rv
        assert res["a"][0].store_port != res["b"][0].store_port
        assert {res["a"][0].store_port, res["b"][0].store_port} <= set(
            cluster.store_ports("manual:" + a["job_id"]))
        assert res["a"][1].store_port == res["a"][0].store_port
        assert res["b"][1].store_port == res["b"][0].store_port
    finally:
        _close_all(res["a"])
        _close_all(res["b"])


def test_missing_rank_times_out_naming_it():
    res = _run_nodes(3, _job(), timeout=1.5, ranks=[0, 2])
    for rv in res.values():
        assert isinstance(rv, threadloom.TimedOutError), rv
        assert isinstance(rv, TimeoutError)
        assert "rank(s) 1 of 3 did not arrive" in str(rv)


def test_unreachable_master_times_out_naming_it():
    # Nothing listens on the job's store ports; the error names the master and those ports
    # (the port of --master is torch.distributed's, not the store's: it is skipped).
    job = _job()
    ports = cluster.store_ports("manual:" + job["job_id"], cluster.PORT_TRIES + 1)
    with pytest.raises(threadloom.TimedOutError) as e:
        cluster.rendezvous(2, 1, "127.0.0.1:%d" % ports[0], timeout=0.5, environ={}, **job)
    assert "127.0.0.1 port %s " % store._ports_text(ports[1:]) in str(e.value)


def test_rank_claimed_twice():
    job, out = _job(), []

    def node(r):
        try:
            out.append(cluster.rendezvous(2, r, "127.0.0.1", timeout=10.0, environ={}, **job))
        except BaseException as e:  # reported to the test
            out.append(e)

    ths = [threading.Thread(target=node, args=(r,)) for r in (0, 1, 1)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    claims = [v for v in out if isinstance(v, threadloom.InvalidArgumentError)]
    assert len(claims) == 1 and "claimed by two nodes" in str(claims[0]), out
    assert sum(isinstance(v, cluster.Rendezvous) for v in out) == 2
    _close_all(dict(enumerate(out)))


# ---------------------------------------------------------------------------------------------
# The store under attack: wrong secrets, garbage, oversized frames
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def server():
    secret = cluster.job_secret(cluster.new_job_token(), "t")
    srv = cluster.StoreServer(secret, [0], bind="127.0.0.1", max_frame=4096, handshake_timeout=5)
    srv.secret = secret
    yield srv
    srv.close()


def _good(server):
    return cluster.StoreClient.connect("127.0.0.1", [server.port], server.secret, timeout=10)


def _raw_authenticated(server):
    """A socket past the handshake, for sending hand-made frames."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    hello = store._recv_exact(s, len(cluster.MAGIC) + cluster.NONCE)
    snonce, cnonce = hello[len(cluster.MAGIC):], secrets.token_bytes(cluster.NONCE)
    s.sendall(cnonce + store._mac(server.secret, b"C", snonce, cnonce))
    assert store._recv_exact(s, 1) == b"\x01"
    store._recv_exact(s, cluster.MAC)
    return s


def _closed_by_peer(s):
    try:
        while True:
            if not s.recv(4096):
                return True
    except ConnectionResetError:
        return True


def test_wrong_secret_rejected(server):
    other = cluster.job_secret(cluster.new_job_token(), "t")
    with pytest.raises(threadloom.TimedOutError, match="rejected this job's secret"):
        cluster.StoreClient.connect("127.0.0.1", [server.port], other, timeout=0.3)
    assert server.stats()["rejected_auth"] >= 1
    c = _good(server)
    c.set("k", "v")
    assert c.get("k") == b"v"
    c.close()


def test_garbage_and_oversized_frames_rejected(server):
    c = _good(server)
    c.set("before", b"1")
    # Garbage instead of a handshake: the proof fails, the server says no and hangs up.
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(os.urandom(200))
    assert _closed_by_peer(s)
    s.close()
    # A handshake cut short.
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"\xff" * 7)
    s.shutdown(socket.SHUT_WR)
    assert _closed_by_peer(s)
    s.close()
    before = server.stats()["rejected_frames"]
    # Authenticated, then: an oversized length, a short frame, an unknown op, a bad key length.
    for frame in (struct.pack(">I", 1 << 30) + b"x" * 64, struct.pack(">I", 1) + b"\x01",
                  struct.pack(">I", 3) + b"\x09\x00\x00",
                  struct.pack(">I", 5) + b"\x01\xff\xff ab"):
        s = _raw_authenticated(server)
        s.sendall(frame)
        assert _closed_by_peer(s)
        s.close()
    assert server.stats()["rejected_frames"] == before + 4
    # The store kept serving the client connected before, and new ones.
    assert c.get("before") == b"1"
    c2 = _good(server)
    assert c2.add("ctr", 2) == 2
    # A frame over the server's limit (4096 here) from a real client: that connection is
    # dropped, the store goes on.
    with pytest.raises(threadloom.InputOutputError, match="rendezvous store at 127.0.0.1"):
        c2.set("big", b"x" * 5000)
    assert c.get("ctr") == b"2"
    with pytest.raises(threadloom.InvalidArgumentError, match="frame limit"):
        c.set("huge", b"x" * (cluster.MAX_FRAME + 1))  # refused before sending
    c.close(), c2.close()


def test_many_threads_one_store(server):
    # 16 clients add concurrently; every increment lands exactly once.
    clients = [_good(server) for _ in range(16)]
    start = threading.Barrier(len(clients))

    def work(c):
        start.wait()
        for _ in range(50):
            c.add("n", 1)

    ths = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert clients[0].get("n") == b"800"
    for c in clients:
        c.close()


def test_wait_wakes_on_set(server):
    a, b = _good(server), _good(server)
    got = []
    t = threading.Thread(target=lambda: got.append(a.wait("late", 30)))
    t.start()
    b.set("late", b"now")
    t.join(30)
    assert got == [b"now"]
    with pytest.raises(threadloom.TimedOutError, match="'never'"):
        a.wait("never", 0.2)
    a.close(), b.close()


# ---------------------------------------------------------------------------------------------
# The store under load: descriptor exhaustion, slow and idle peers, bounded threads
# ---------------------------------------------------------------------------------------------

def _store_threads():
    return sum(t.name == "threadloom-store-conn" for t in threading.enumerate())


def _wait_until(cond, timeout=10.0):
    """Polls `cond` until it holds or `timeout` passes (for a thread's exit, which has no
    event to wait on); returns its last value."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


STORE_IN_A_SMALL_PROCESS = r"""
import os, resource, sys
from threadloom import cluster
secret = cluster.job_secret(os.environ["TL_TEST_TOKEN"], "t")
# A process that runs out of descriptors quickly: the usual limit is 1,024, the attack the
# same with 1,100 connections.
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
srv = cluster.StoreServer(secret, [0], bind="127.0.0.1")
print(srv.port, flush=True)
sys.stdin.read()        # until the test closes our stdin
print(srv.stats(), flush=True)
srv.close()
"""


def test_descriptor_exhaustion_does_not_stop_the_store():
    # 150 idle connections exhaust the store process's 48 descriptors: accept() fails with
    # EMFILE. The store sheds the oldest unauthenticated connections and keeps accepting, so a
    # real node still gets in (within a few seconds, long before the attackers' 10 s
    # handshake limit would have freed anything).
    token = cluster.new_job_token()
    env = dict(os.environ, TL_TEST_TOKEN=token)
    p = subprocess.Popen([sys.executable, "-c", STORE_IN_A_SMALL_PROCESS], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    attackers = []
    try:
        port = int(p.stdout.readline())
        for _ in range(150):
            attackers.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        secret = cluster.job_secret(token, "t")
        c = cluster.StoreClient.connect("127.0.0.1", [port], secret, timeout=8)
        c.set("k", b"v")
        assert c.get("k") == b"v"
        c.close()
        # ... and again, after more attackers came.
        for _ in range(50):
            attackers.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        c = cluster.StoreClient.connect("127.0.0.1", [port], secret, timeout=8)
        assert c.get("k") == b"v"
        c.close()
    finally:
        for s in attackers:
            s.close()
        out, _ = p.communicate(timeout=30)
    stats = eval(out)
    assert stats["accept_errors"] >= 1 and stats["shed"] >= 1, stats


def test_unauthenticated_connections_are_bounded(server):
    # 60 idle connections against a cap of 8: the oldest are shed, the store holds at most 8
    # unauthenticated connections (and threads for them), and a real client gets in.
    srv = cluster.StoreServer(server.secret, [0], bind="127.0.0.1", max_unauthenticated=8)
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(60)]
    try:
        assert _wait_until(lambda: srv.stats()["shed"] >= 52), srv.stats()
        assert srv.stats()["unauthenticated"] <= 8
        assert _wait_until(lambda: _store_threads() <= 8), _store_threads()
        c = cluster.StoreClient.connect("127.0.0.1", [srv.port], server.secret, timeout=10)
        c.set("a", b"1")
        assert srv.stats()["authenticated_open"] == 1
        c.close()
    finally:
        for s in idle:
            s.close()
        srv.close()


def test_connections_in_all_are_bounded(server):
    # Every slot taken by authenticated peers: a further connection is refused (closed at
    # once), the others keep working; one leaving frees a slot.
    srv = cluster.StoreServer(server.secret, [0], bind="127.0.0.1", max_connections=3)
    clients = [cluster.StoreClient.connect("127.0.0.1", [srv.port], server.secret, timeout=10)
               for _ in range(3)]
    try:
        with pytest.raises(threadloom.TimedOutError, match="closed after 0 of"):
            cluster.StoreClient.connect("127.0.0.1", [srv.port], server.secret, timeout=0.5)
        assert srv.stats()["refused"] >= 1
        clients[0].set("x", b"1")
        clients.pop().close()
        c = cluster.StoreClient.connect("127.0.0.1", [srv.port], server.secret, timeout=10)
        assert c.get("x") == b"1"
        clients.append(c)
    finally:
        for c in clients:
            c.close()
        srv.close()


def test_slowloris_handshake_hits_a_total_deadline():
    # One byte every 0.2 s keeps every recv() under a per-recv timeout of 0.5 s; the handshake
    # deadline is for the whole handshake, so the store hangs up long before the 48 bytes.
    secret = cluster.job_secret(cluster.new_job_token(), "t")
    with cluster.StoreServer(secret, [0], bind="127.0.0.1", handshake_timeout=0.5) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        store._recv_exact(s, len(cluster.MAGIC) + cluster.NONCE)
        sent, closed = 0, False
        try:
            while sent < cluster.NONCE + cluster.MAC and not closed:
                s.sendall(b"x")
                sent += 1
                if select.select([s], [], [], 0.2)[0]:
                    closed = s.recv(1) == b""
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        s.close()
        assert closed and sent < cluster.NONCE + cluster.MAC, sent
        assert srv.stats()["timed_out"] == 1


def test_a_truncated_frame_is_dropped_after_the_frame_timeout():
    # An authenticated peer that stops mid-frame (a length, then nothing; or half a body) is
    # dropped after frame_timeout; one that idles between frames is not.
    secret = cluster.job_secret(cluster.new_job_token(), "t")
    with cluster.StoreServer(secret, [0], bind="127.0.0.1", frame_timeout=0.5) as srv:
        srv.secret = secret
        idle = _good(srv)
        for partial in (b"\x00\x00", struct.pack(">I", 10) + b"\x01\x00"):
            s = _raw_authenticated(srv)
            s.sendall(partial)
            s.settimeout(10)
            assert _closed_by_peer(s)
            s.close()
        assert srv.stats()["rejected_frames"] == 2
        idle.set("still", b"here")      # the idle connection outlived both
        assert idle.get("still") == b"here"
        idle.close()
