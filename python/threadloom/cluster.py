"""SLURM environment, rendezvous and the torchrun environment for one process per node.

A threadloom job on several servers runs one process per node (``srun --ntasks-per-node=1
threadloom run train.py``); each process drives all of its node's GPUs with threads. This
module gives each of those processes:

- ``slurm_env()``: what SLURM told this task (ranks, node list expanded by the C hostlist
  parser, the GPUs and cores it may use), or None outside SLURM;
- ``rendezvous()``: node 0 runs a small key-value store over TCP, every node connects to it,
  proves it knows the job secret, registers, and waits for the others; the result carries the
  rank, the world size, every node's host and a free port on node 0 for torch.distributed;
- ``Rendezvous.torchrun_env()``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, ...
  (launch_env.torchrun_env with per-node values) for code written for torchrun.

The store is written in Python (socket, hmac, hashlib) on the free-threaded interpreter: one
thread per connection, no GIL between them. See docs/design.md, "Cluster", for the protocol,
the secret and how the port is chosen.
"""

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import threading
import time
import zlib

from threadloom import _core, _runtime, errors, launch_env
from threadloom.comm import nccl
from threadloom.comm.nccl import NcclComm

# ---------------------------------------------------------------------------------------------
# Errors: threadloom's classes (TimedOutError, InvalidArgumentError, ...) with their detail
# ---------------------------------------------------------------------------------------------

def _error(name, detail):
    """The threadloom exception for TL_E<name> with `detail` (see threadloom.errors)."""
    return errors.error(name, detail)


# ---------------------------------------------------------------------------------------------
# SLURM environment
# ---------------------------------------------------------------------------------------------

TOKEN_VAR = "THREADLOOM_JOB_TOKEN"


@dataclasses.dataclass(frozen=True)
class SlurmEnv:
    """What SLURM told this task. Ranks count nodes, as threadloom runs one task per node."""
    job_id: str                 # SLURM_JOB_ID
    step_id: str                # SLURM_STEP_ID ("" outside a step, e.g. in the batch script)
    rank: int                   # SLURM_PROCID: this task's rank among all tasks of the step
    node_rank: int              # SLURM_NODEID: this node's index in nodelist
    ntasks: int                 # SLURM_NTASKS (SLURM_NPROCS on old versions)
    nnodes: int                 # SLURM_NNODES (SLURM_JOB_NUM_NODES), else len(nodelist)
    local_rank: int             # SLURM_LOCALID: this task's index on its node
    nodelist: tuple             # SLURM_JOB_NODELIST (SLURM_NODELIST) expanded, in order
    nodename: str               # SLURMD_NODENAME, else this host's name
    gpus: tuple                 # the physical GPUs this task may use (ids or UUIDs, as strings)
    gpu_source: str             # where gpus came from: CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS,
                                # SLURM_JOB_GPUS, or "" when none is set
    cpus: tuple                 # the cores this process may run on (sched_getaffinity)

    @property
    def master_addr(self):
        """The first node of the list: where rendezvous() looks for the store."""
        return self.nodelist[0]

    @property
    def cuda_visible_devices(self):
        """The CUDA_VISIBLE_DEVICES value that confines CUDA to this task's GPUs (CUDA then
        numbers them 0..len(gpus)-1), or None when SLURM named no GPUs."""
        return ",".join(self.gpus) if self.gpu_source else None


def _int_var(env, *names, default=None):
    for name in names:
        v = env.get(name)
        if v is None or v == "":
            continue
        try:
            return int(v)
        except ValueError:
            raise _error("EINVAL", "%s=%r is not an integer" % (name, v)) from None
    if default is None:
        raise _error("EINVAL", "%s is not set (is this a SLURM step? run under srun)" % names[0])
    return default


def _gpu_list(value):
    return tuple(g.strip() for g in value.split(",") if g.strip())


def slurm_env(environ=None):
    """Parses the SLURM environment of this task (default os.environ) into a SlurmEnv, or
    returns None when SLURM_JOB_ID is unset (not running under SLURM). Raises
    InvalidArgumentError naming the variable that is malformed.

    GPUs: SLURM confines a step's GPUs by setting CUDA_VISIBLE_DEVICES (gres/gpu) and names them
    in SLURM_STEP_GPUS / SLURM_JOB_GPUS; the first of those that is set wins, so a
    CUDA_VISIBLE_DEVICES narrowed by SLURM (or by the user) is always respected."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    raw_list = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    nodelist = tuple(_core.hostlist_expand(raw_list)) if raw_list else ()
    nodename = env.get("SLURMD_NODENAME") or socket.gethostname()
    if not nodelist:
        nodelist = (nodename,)
    nnodes = _int_var(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=len(nodelist))
    if nnodes != len(nodelist):
        raise _error("EINVAL", "SLURM_NNODES=%d but SLURM_JOB_NODELIST=%r names %d nodes"
                     % (nnodes, raw_list, len(nodelist)))
    rank = _int_var(env, "SLURM_PROCID")
    node_rank = _int_var(env, "SLURM_NODEID", default=rank)
    ntasks = _int_var(env, "SLURM_NTASKS", "SLURM_NPROCS", default=nnodes)
    local_rank = _int_var(env, "SLURM_LOCALID", default=0)
    if not 0 <= node_rank < nnodes:
        raise _error("EINVAL", "SLURM_NODEID=%d is outside the %d nodes of SLURM_JOB_NODELIST"
                     % (node_rank, nnodes))
    gpus, source = (), ""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(var) is not None:
            gpus, source = _gpu_list(env[var]), var
            break
    cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
    return SlurmEnv(job_id=str(job_id), step_id=env.get("SLURM_STEP_ID", ""), rank=rank,
                    node_rank=node_rank, ntasks=ntasks, nnodes=nnodes, local_rank=local_rank,
                    nodelist=nodelist, nodename=nodename, gpus=gpus, gpu_source=source, cpus=cpus)


# ---------------------------------------------------------------------------------------------
# The job secret and the store's port
# ---------------------------------------------------------------------------------------------

PORT_BASE = 21000   # store ports are PORT_BASE + crc32(job key) % PORT_SPAN ...
PORT_SPAN = 8000    # ... below Linux's ephemeral range (32768-60999)
PORT_TRIES = 8      # node 0 takes the first free of this many consecutive ports
MIN_TOKEN_CHARS = 16


def new_job_token():
    """A fresh random job token (64 hex digits) for THREADLOOM_JOB_TOKEN."""
    return secrets.token_hex(32)


def job_secret(token, job_key):
    """The 32-byte key every connection to the store must prove it knows: HMAC-SHA256 of the
    job key (job id and step) under the per-job random token. Raises InvalidArgumentError when
    the token is missing or too short to be random."""
    if not token:
        raise _error("EINVAL", "no job token: set %s to a random value shared by every node of "
                     "the job, e.g. `export %s=$(python3 -c 'import secrets; "
                     "print(secrets.token_hex(32))')` in the batch script before srun"
                     % (TOKEN_VAR, TOKEN_VAR))
    if len(token) < MIN_TOKEN_CHARS:
        raise _error("EINVAL", "%s is %d characters; use at least %d random characters"
                     % (TOKEN_VAR, len(token), MIN_TOKEN_CHARS))
    return hmac.new(token.encode(), b"threadloom-rendezvous-v1|" + job_key.encode(),
                    hashlib.sha256).digest()


def store_ports(job_key, tries=PORT_TRIES):
    """The ports node 0 tries, in order, for the job `job_key`: deterministic, so every node
    computes the same list and looks for its store on each of them."""
    first = PORT_BASE + zlib.crc32(job_key.encode()) % PORT_SPAN
    return [PORT_BASE + (first - PORT_BASE + i) % PORT_SPAN for i in range(tries)]


# ---------------------------------------------------------------------------------------------
# Wire protocol
#
# Handshake (fixed sizes, so garbage is rejected without parsing):
#   server -> client  b"TLRV" 0x01 snonce[16]
#   client -> server  cnonce[16] HMAC(secret, b"C" snonce cnonce)
#   server -> client  0x01 HMAC(secret, b"S" cnonce snonce)   (or 0x00 and close: wrong secret)
# Then frames, both ways: u32 big-endian length, then that many bytes (at most max_frame):
#   request   op u8, key length u16, key (UTF-8), data
#   response  status u8, data
# ---------------------------------------------------------------------------------------------

MAGIC = b"TLRV\x01"
NONCE = 16
MAC = 32
MAX_FRAME = 1 << 20      # default cap on one frame's length
MAX_KEY = 1024
MAX_STORE = 64 << 20     # cap on the bytes of keys and values a store holds

OP_SET, OP_GET, OP_WAIT, OP_ADD = 1, 2, 3, 4
ST_OK, ST_NOTFOUND, ST_TIMEOUT, ST_ERROR = 0, 1, 2, 3


class _ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _ProtocolError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def _send_frame(sock, payload):
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_frame(sock, max_frame):
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > max_frame:
        raise _ProtocolError("frame of %d bytes over the limit of %d" % (n, max_frame))
    return _recv_exact(sock, n)


def _mac(secret, tag, a, b):
    return hmac.new(secret, tag + a + b, hashlib.sha256).digest()


# ---------------------------------------------------------------------------------------------
# The store server (node 0)
# ---------------------------------------------------------------------------------------------

class StoreServer:
    """A key-value store on TCP for one job's rendezvous: set/get/wait/add on byte values.

    Threads: one accept thread and one thread per connection. Invariants: `_data`, `_bytes` and
    `_closed` are guarded by `_cond`; `_conns` and the counters in `_stats` by `_lock`; `_cond`
    is never taken while holding `_lock` or the other way round. A connection that fails the
    handshake, sends a malformed or oversized frame or an unknown op is closed; the store keeps
    serving the others."""

    def __init__(self, secret, ports, bind="", max_frame=MAX_FRAME, handshake_timeout=10.0):
        self._secret = secret
        self._max_frame = max_frame
        self._handshake_timeout = handshake_timeout
        self._data = {}
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._conns = set()
        self._stats = {"connections": 0, "authenticated": 0, "rejected_auth": 0,
                       "rejected_frames": 0}
        self._sock, self.port = self._bind(bind, list(ports))
        self.address = bind or "0.0.0.0"
        self._thread = threading.Thread(target=self._accept_loop, name="threadloom-store-accept",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _bind(bind, ports):
        last = None
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind, port))
                s.listen(128)
                return s, s.getsockname()[1]
            except OSError as e:
                s.close()
                last = e
        raise _error("EAGAIN", "no free port for the rendezvous store among %s on %r (last: %s)"
                     % (_ports_text(ports), bind or "0.0.0.0", last))

    def stats(self):
        """Counters: connections, authenticated, rejected_auth, rejected_frames."""
        with self._lock:
            return dict(self._stats)

    def _count(self, key):
        with self._lock:
            self._stats[key] += 1

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                self._stats["connections"] += 1
            threading.Thread(target=self._serve, args=(conn,), name="threadloom-store-conn",
                             daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(self._handshake_timeout)
            snonce = secrets.token_bytes(NONCE)
            conn.sendall(MAGIC + snonce)
            reply = _recv_exact(conn, NONCE + MAC)
            cnonce, proof = reply[:NONCE], reply[NONCE:]
            if not hmac.compare_digest(proof, _mac(self._secret, b"C", snonce, cnonce)):
                self._count("rejected_auth")
                conn.sendall(b"\x00")
                return
            conn.sendall(b"\x01" + _mac(self._secret, b"S", cnonce, snonce))
            self._count("authenticated")
            conn.settimeout(None)
            while True:
                req = _recv_frame(conn, self._max_frame)
                _send_frame(conn, self._handle(req))
        except _ProtocolError:
            self._count("rejected_frames")
        except (OSError, ValueError):
            pass  # peer went away, timed out in the handshake, or the store closed
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, req):
        if len(req) < 3:
            raise _ProtocolError("request of %d bytes is shorter than its header" % len(req))
        op, klen = req[0], struct.unpack(">H", req[1:3])[0]
        if klen > MAX_KEY or 3 + klen > len(req):
            raise _ProtocolError("bad key length %d" % klen)
        key, data = req[3:3 + klen], req[3 + klen:]
        if op == OP_SET:
            with self._cond:
                grow = len(key) + len(data) - (len(key) + len(self._data[key]) if key in self._data else 0)
                if self._bytes + grow > MAX_STORE:
                    return bytes([ST_ERROR]) + b"store full"
                self._data[key] = data
                self._bytes += grow
                self._cond.notify_all()
            return bytes([ST_OK])
        if op == OP_GET:
            with self._cond:
                v = self._data.get(key)
            return bytes([ST_OK]) + v if v is not None else bytes([ST_NOTFOUND])
        if op == OP_WAIT:
            if len(data) != 4:
                raise _ProtocolError("wait needs a 4-byte timeout")
            (ms,) = struct.unpack(">I", data)
            with self._cond:
                self._cond.wait_for(lambda: key in self._data or self._closed, ms / 1000.0)
                v = self._data.get(key)
            return bytes([ST_OK]) + v if v is not None else bytes([ST_TIMEOUT])
        if op == OP_ADD:
            if len(data) != 8:
                raise _ProtocolError("add needs an 8-byte delta")
            (delta,) = struct.unpack(">q", data)
            with self._cond:
                old = self._data.get(key, b"0")
                try:
                    new = int(old) + delta
                except ValueError:
                    return bytes([ST_ERROR]) + b"value is not an integer"
                enc = str(new).encode()
                grow = len(enc) - len(old) + (0 if key in self._data else len(key))
                self._data[key] = enc
                self._bytes += grow
                self._cond.notify_all()
            return bytes([ST_OK]) + struct.pack(">q", new)
        raise _ProtocolError("unknown op %d" % op)

    def close(self):
        """Stops serving: closes the listening socket and every connection. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with self._lock:
            conns = list(self._conns)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ports_text(ports):
    return str(ports[0]) if len(ports) == 1 else "%d-%d" % (ports[0], ports[-1]) \
        if ports == list(range(ports[0], ports[0] + len(ports))) else ",".join(map(str, ports))


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------

class StoreClient:
    """One authenticated connection to a job's store. Thread-safe: requests are serialised."""

    def __init__(self, sock, host, port, max_frame=MAX_FRAME):
        self._sock = sock
        self._lock = threading.Lock()
        self._max_frame = max_frame
        self.host, self.port = host, port

    @classmethod
    def connect(cls, host, ports, secret, timeout=60.0, io_timeout=None):
        """Connects to the store of the job whose secret is `secret` on host, trying each of
        `ports` in order and starting over with growing pauses until `timeout` seconds have
        passed; then raises TimedOutError naming the host, the ports and why each failed. A
        store that rejects the secret (another job's, or a different token) is skipped.
        io_timeout: seconds one request may take before the connection counts as lost (an
        InputOutputError); None waits forever. It must exceed the 5 s a wait() is chunked to."""
        deadline = time.monotonic() + timeout
        ports = list(ports)
        why = {}
        pause = 0.02
        while True:
            for port in ports:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    sock = socket.create_connection((host, port), timeout=min(left, 5.0))
                except OSError as e:
                    why[port] = e.strerror or str(e)
                    continue
                try:
                    sock.settimeout(min(max(deadline - time.monotonic(), 0.1), 10.0))
                    hello = _recv_exact(sock, len(MAGIC) + NONCE)
                    if hello[:len(MAGIC)] != MAGIC:
                        raise _ProtocolError("not a threadloom store")
                    snonce = hello[len(MAGIC):]
                    cnonce = secrets.token_bytes(NONCE)
                    sock.sendall(cnonce + _mac(secret, b"C", snonce, cnonce))
                    verdict = _recv_exact(sock, 1)
                    if verdict != b"\x01":
                        raise _ProtocolError("a store that rejected this job's secret (another "
                                             "job's, or %s differs between nodes)" % TOKEN_VAR)
                    if not hmac.compare_digest(_recv_exact(sock, MAC), _mac(secret, b"S", cnonce, snonce)):
                        raise _ProtocolError("a store that could not prove it knows the secret")
                    sock.settimeout(io_timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return cls(sock, host, port)
                except (OSError, _ProtocolError) as e:
                    why[port] = str(e) or type(e).__name__
                    sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                reasons = "; ".join("%d: %s" % (p, why.get(p, "not tried")) for p in ports)
                raise _error("ETIMEDOUT", "no rendezvous store of this job answered at %s port %s "
                             "within %.1fs (%s). Is node 0 running, is %s reachable from this node, "
                             "and do all nodes share %s?"
                             % (host, _ports_text(ports), timeout, reasons, host, TOKEN_VAR))
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)

    def _call(self, op, key, data=b""):
        k = key.encode() if isinstance(key, str) else bytes(key)
        if len(k) > MAX_KEY:
            raise _error("EINVAL", "key of %d bytes is over the limit of %d" % (len(k), MAX_KEY))
        payload = bytes([op]) + struct.pack(">H", len(k)) + k + bytes(data)
        if len(payload) > self._max_frame:
            raise _error("EINVAL", "value of %d bytes is over the frame limit of %d"
                         % (len(data), self._max_frame))
        with self._lock:
            try:
                _send_frame(self._sock, payload)
                resp = _recv_frame(self._sock, self._max_frame)
            except (OSError, _ProtocolError) as e:
                raise _error("EIO", "rendezvous store at %s:%d: %s (did node 0 exit, or was the "
                             "request over the store's frame limit?)" % (self.host, self.port, e)) from None
        if not resp:
            raise _error("EIO", "rendezvous store at %s:%d sent an empty response"
                         % (self.host, self.port))
        if resp[0] == ST_ERROR:
            raise _error("EIO", "rendezvous store at %s:%d: %s"
                         % (self.host, self.port, resp[1:].decode(errors="replace")))
        return resp[0], resp[1:]

    def set(self, key, value):
        """Stores value (bytes-like, or str as UTF-8) under key."""
        self._call(OP_SET, key, value.encode() if isinstance(value, str) else value)

    def get(self, key):
        """The value of key, or None when unset."""
        st, data = self._call(OP_GET, key)
        return data if st == ST_OK else None

    def wait(self, key, timeout=60.0):
        """Waits until key is set and returns its value; TimedOutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            # Waits are chunked so that a store that dies is noticed within a few seconds.
            ms = int(max(0.0, min(left, 5.0)) * 1000)
            st, data = self._call(OP_WAIT, key, struct.pack(">I", ms))
            if st == ST_OK:
                return data
            if deadline - time.monotonic() <= 0:
                raise _error("ETIMEDOUT", "key %r was not set in the rendezvous store at %s:%d "
                             "within %.1fs" % (key, self.host, self.port, timeout))

    def add(self, key, delta=1):
        """Adds delta to the integer under key (0 when unset) and returns the new value."""
        st, data = self._call(OP_ADD, key, struct.pack(">q", delta))
        return struct.unpack(">q", data)[0]

    def interrupt(self):
        """Ends the request another thread has in flight on this connection (it raises
        InputOutputError), and every later one: for stopping a thread that waits here."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        try:
            self._sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Rendezvous
# ---------------------------------------------------------------------------------------------

def _free_port(bind=""):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((bind, 0))
        return s.getsockname()[1]
    finally:
        s.close()


@dataclasses.dataclass
class Rendezvous:
    """The result of rendezvous(): this node's place in the job, and the job's store."""
    rank: int                 # this node's rank (0 runs the store)
    world_size: int           # number of nodes
    master_addr: str          # node 0's address as the nodes reach it
    master_port: int          # a free port on node 0 for torch.distributed's own store
    store_port: int           # the port of threadloom's store on node 0
    hosts: tuple              # every node's host name, by rank
    store: StoreClient        # this node's connection to the store (for later bootstrap steps)
    server: object = None     # the StoreServer on node 0, None elsewhere
    job_key: str = ""         # the job key the secret is derived from ("slurm:<job>.<step>")
    watchdog: object = None   # the cluster_runtime.Watchdog watching this job, if one runs
    _secret: bytes = dataclasses.field(default=b"", repr=False)   # the job secret
    _connect: tuple = dataclasses.field(default=(), repr=False)   # (host, port) to reach the store
    _nccl_gen: int = dataclasses.field(default=0, repr=False)     # nccl_bootstrap() calls so far
    _lock: object = dataclasses.field(default_factory=threading.Lock, repr=False)
    _launcher: bool = dataclasses.field(default=False, repr=False)  # made by `threadloom run`:
                              # it leaves the job at exit; the user's close() is a no-op

    local_rank = 0            # one process per node
    local_world_size = 1

    def connect(self, timeout=60.0, io_timeout=None):
        """A new connection to this job's store (the caller closes it): for a thread that must
        not queue behind `store`'s requests, e.g. the watchdog's heartbeats."""
        host, port = self._connect
        client = StoreClient.connect(host, [port], self._secret, timeout=timeout,
                                     io_timeout=io_timeout)
        client.host = self.master_addr
        return client

    def abort(self, reason, store=None):
        """Tells every node of the job to abort: publishes `reason` under the store's abort key
        (the first reason published wins) for every node's watchdog. Returns the reason in the
        store. `store`: the connection to use (default this node's)."""
        store = store or self.store
        if store.add(ABORT_KEY + "/count") == 1:
            store.set(ABORT_KEY, json.dumps({"rank": self.rank, "host": self.hosts[self.rank],
                                             "reason": reason}))
        return json.loads(store.wait(ABORT_KEY, 30.0))["reason"]

    def nccl_bootstrap(self, gpus_per_node, timeout=300.0, *, unique_id=None):
        """Shares one NCCL unique id with every node for a world of nnodes x gpus_per_node ranks
        (one per GPU thread) and returns an NcclBootstrap: unique_id, world_size,
        rank_of(local_gpu), init_comm(local_gpu). Every node calls it, in the same order as
        its other nccl_bootstrap() calls; each call makes a new id.

        Node 0 makes the id (`unique_id`, a callable returning 128 bytes; default
        threadloom._core.nccl_unique_id, i.e. ncclGetUniqueId) and publishes it in the store;
        every node publishes its GPU count and waits, until `timeout` seconds have passed, for
        the id and for every other node's count. On any failure (NCCL missing, a node with a
        different GPU count, a node that does not arrive in time) this node publishes the abort
        key, so every node's watchdog aborts, and raises the error (TimedOutError naming the
        missing nodes, InvalidArgumentError naming the node whose count differs, ...)."""
        if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) \
                or gpus_per_node < 1:
            raise _error("EINVAL", "gpus_per_node must be an int >= 1, not %r" % (gpus_per_node,))
        with self._lock:
            gen = self._nccl_gen
            self._nccl_gen += 1
        prefix = "nccl/%d/" % gen
        deadline = time.monotonic() + timeout
        try:
            self.store.set(prefix + "gpus/%d" % self.rank, str(gpus_per_node))
            if self.rank == 0:
                uid = bytes((unique_id or _core.nccl_unique_id)())
                if len(uid) != NCCL_ID_BYTES:
                    raise _error("EINVAL", "the NCCL unique id has %d bytes, not %d"
                                 % (len(uid), NCCL_ID_BYTES))
                self.store.set(prefix + "id", uid)
            for r in range(self.world_size):
                try:
                    n = int(self.store.wait(prefix + "gpus/%d" % r,
                                            max(deadline - time.monotonic(), 0.0)))
                except _core.TimedOutError:
                    missing = [q for q in range(self.world_size)
                               if self.store.get(prefix + "gpus/%d" % q) is None]
                    raise _error("ETIMEDOUT", "NCCL bootstrap #%d: node(s) %s did not arrive "
                                 "within %.1fs" % (gen, ", ".join(map(str, missing)),
                                                   timeout)) from None
                if n != gpus_per_node:
                    raise _error("EINVAL", "NCCL bootstrap #%d: node %d (%s) drives %d GPUs, node "
                                 "%d drives %d: every node must drive the same number"
                                 % (gen, r, self.hosts[r], n, self.rank, gpus_per_node))
            try:
                uid = self.store.wait(prefix + "id", max(deadline - time.monotonic(), 0.0))
            except _core.TimedOutError:
                raise _error("ETIMEDOUT", "NCCL bootstrap #%d: node 0 (%s) published no unique "
                             "id within %.1fs" % (gen, self.hosts[0], timeout)) from None
        except BaseException as e:
            try:
                self.abort("node %d (%s) failed in the NCCL bootstrap: %s"
                           % (self.rank, self.hosts[self.rank], _one_line(e)))
            except _core.Error:
                pass  # the store is gone: the other nodes' watchdogs see that themselves
            raise
        return NcclBootstrap(unique_id=uid, world_size=self.world_size * gpus_per_node,
                             nnodes=self.world_size, gpus_per_node=gpus_per_node,
                             node_rank=self.rank, generation=gen, _owner=self)

    def abort_comms(self):
        """Aborts every NcclComm made through this rendezvous' bootstraps that is still open
        (ncclCommAbort). Returns how many. Thread-safe; the watchdog aborts them, with the
        rest of the process's abortable objects, through _runtime.abort_all()."""
        return _runtime.abort_all("Rendezvous.abort_comms()", owner=self)

    def torchrun_env(self):
        """MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, ... as a dict of strings."""
        return launch_env.torchrun_env(rank=self.rank, world_size=self.world_size,
                                       master_addr=self.master_addr, master_port=self.master_port)

    def apply_torchrun_env(self, environ=None):
        """Sets the torchrun variables that `environ` (default os.environ) lacks; returns them."""
        return launch_env.apply_torchrun_env(environ, rank=self.rank, world_size=self.world_size,
                                             master_addr=self.master_addr,
                                             master_port=self.master_port)

    def close(self, timeout=60.0):
        """Leaves the job: tells the store, and on node 0 waits (up to `timeout` s) for every
        node to leave before stopping the store, so no node loses it while still reading. The
        watchdog, if any, is stopped first on other nodes, and on node 0 once all have left (it
        keeps watching them while node 0 waits). On the Rendezvous the launcher made
        (cluster.current()) this does nothing: the launcher leaves the job when the program
        exits, so a `with cluster.rendezvous() as rv:` block in the program is harmless."""
        if not self._launcher:
            self._leave(timeout)

    def _leave(self, timeout):
        try:
            if self.server is None and self.watchdog is not None:
                self.watchdog.stop()
            self.store.set("left/%d" % self.rank, b"1")
            if self.server is not None:
                deadline = time.monotonic() + timeout
                for r in range(self.world_size):
                    self.store.wait("left/%d" % r, max(0.0, deadline - time.monotonic()))
        except _core.Error:
            if self.server is None:
                raise
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.store.close()
            if self.server is not None:
                self.server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _parse_master(master):
    host, sep, port = master.rpartition(":")
    if sep and port.isdigit() and host:
        return host.strip("[]"), int(port)
    return master, None


def rendezvous(nnodes=None, node_rank=None, master=None, *, token=None, job_id=None,
               timeout=300.0, bind="", environ=None, port_tries=PORT_TRIES):
    """Meets the other nodes of the job and returns a Rendezvous.

    Under SLURM, nnodes, node_rank and master default to SLURM_NNODES, SLURM_NODEID and the
    first node of SLURM_JOB_NODELIST; without SLURM, give all three (`master` is "host" or
    "host:port"). Node 0 starts the store (on `bind`, default all interfaces) on the first free
    port of store_ports(job key) unless `master` names a port; every node connects, proves it
    knows the job secret (from `token`, default $THREADLOOM_JOB_TOKEN, and the job key: SLURM
    job and step id, else `job_id` or $THREADLOOM_JOB_ID), registers and waits for all nodes.
    Raises TimedOutError when the store is not reached or some node does not arrive within
    `timeout` seconds (naming the missing ranks), InvalidArgumentError for a bad setup (no
    token, a rank claimed twice, several tasks per node).

    Under `threadloom run` in cluster mode the launcher has already met the other nodes: then
    (environ not given) this returns that Rendezvous, cluster.current(), instead of meeting
    twice; nnodes/node_rank, if given, must agree with it."""
    cur = _current
    if cur is not None and environ is None:
        if (nnodes is not None and nnodes != cur.world_size) or \
                (node_rank is not None and node_rank != cur.rank):
            raise _error("EINVAL", "the launcher already met the other nodes as node %d of %d; "
                         "rendezvous(nnodes=%r, node_rank=%r) disagrees: drop the arguments "
                         "or use cluster.current()" % (cur.rank, cur.world_size, nnodes,
                                                        node_rank))
        return cur
    env = os.environ if environ is None else environ
    se = slurm_env(env)
    if se is not None and se.ntasks != se.nnodes:
        raise _error("EINVAL", "this step runs %d tasks on %d nodes; threadloom runs one process "
                     "per node: use srun --ntasks-per-node=1" % (se.ntasks, se.nnodes))
    if nnodes is None or node_rank is None or master is None:
        if se is None:
            raise _error("EINVAL", "not under SLURM (SLURM_JOB_ID unset): give nnodes, node_rank "
                         "and master (--nnodes/--node-rank/--master)")
        nnodes = se.nnodes if nnodes is None else nnodes
        node_rank = se.node_rank if node_rank is None else node_rank
        master = se.master_addr if master is None else master
    if not (isinstance(nnodes, int) and nnodes >= 1 and isinstance(node_rank, int)
            and 0 <= node_rank < nnodes):
        raise _error("EINVAL", "need 0 <= node_rank < nnodes, got node_rank=%r nnodes=%r"
                     % (node_rank, nnodes))
    if se is not None:
        job_key = "slurm:%s.%s" % (se.job_id, se.step_id)
    else:
        job_key = "manual:%s" % (job_id or env.get("THREADLOOM_JOB_ID") or "default")
    secret = job_secret(token if token is not None else env.get(TOKEN_VAR), job_key)
    host, port = _parse_master(master)
    ports = [port] if port else store_ports(job_key, port_tries)

    deadline = time.monotonic() + timeout
    if node_rank == 0:
        # Node 0 keeps the store a little longer than the others wait, so that they time out
        # first and can still ask it which ranks are missing.
        deadline += min(max(1.0, 0.1 * timeout), 10.0)
    server = StoreServer(secret, ports, bind=bind) if node_rank == 0 else None
    try:
        if server is not None:
            ports = [server.port]
            connect_host = bind if bind not in ("", "0.0.0.0") else "127.0.0.1"
        else:
            connect_host = host
        store = StoreClient.connect(connect_host, ports, secret, timeout=timeout)
        store.host = host
        try:
            if store.add("claim/%d" % node_rank) != 1:
                raise _error("EINVAL", "node rank %d was claimed by two nodes (check --node-rank "
                             "or SLURM_NODEID)" % node_rank)
            me = {"host": (se.nodename if se else socket.gethostname()), "pid": os.getpid()}
            store.set("rank/%d" % node_rank, json.dumps(me))
            if node_rank == 0:
                store.set("torch_port", str(_free_port(bind)))
            hosts = []
            for r in range(nnodes):
                left = deadline - time.monotonic()
                try:
                    hosts.append(json.loads(store.wait("rank/%d" % r, max(left, 0.0)))["host"])
                except _core.TimedOutError:
                    missing = [q for q in range(nnodes) if store.get("rank/%d" % q) is None]
                    raise _error("ETIMEDOUT", "rank(s) %s of %d did not arrive at the rendezvous "
                                 "store at %s:%d within %.1fs; look at those nodes' logs"
                                 % (", ".join(map(str, missing)), nnodes, host, store.port,
                                    timeout)) from None
            torch_port = int(store.wait("torch_port", max(deadline - time.monotonic(), 0.0)))
        except BaseException:
            store.close()
            raise
    except BaseException:
        if server is not None:
            server.close()
        raise
    return Rendezvous(rank=node_rank, world_size=nnodes, master_addr=host,
                      master_port=torch_port, store_port=store.port, hosts=tuple(hosts),
                      store=store, server=server, job_key=job_key, _secret=secret,
                      _connect=(connect_host, store.port))


def torchrun_env(rank=0, world_size=1, master_addr="127.0.0.1", master_port=29500):
    """launch_env.torchrun_env, re-exported: the torchrun variables for one process per node."""
    return launch_env.torchrun_env(rank=rank, world_size=world_size, master_addr=master_addr,
                                   master_port=master_port)


# ---------------------------------------------------------------------------------------------
# NCCL bootstrap result
# ---------------------------------------------------------------------------------------------

ABORT_KEY = "abort"       # the store key whose value tells every node to abort (JSON)
NCCL_ID_BYTES = 128       # sizeof(ncclUniqueId)


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0] if text else "")


@dataclasses.dataclass(frozen=True)
class NcclBootstrap:
    """What Rendezvous.nccl_bootstrap() returns: one NCCL world over every GPU of every node.
    Global ranks are node-major: node n's local GPU g is rank n * gpus_per_node + g."""
    unique_id: bytes          # the ncclUniqueId node 0 made (128 bytes)
    world_size: int           # nnodes * gpus_per_node
    nnodes: int
    gpus_per_node: int
    node_rank: int            # this node's rank
    generation: int           # which nccl_bootstrap() call of the job made it (0, 1, ...)
    _owner: object = dataclasses.field(default=None, repr=False, compare=False)

    def rank_of(self, local_gpu):
        """The global NCCL rank of this node's GPU thread `local_gpu` (0..gpus_per_node-1)."""
        if isinstance(local_gpu, bool) or not isinstance(local_gpu, int) \
                or not 0 <= local_gpu < self.gpus_per_node:
            raise _error("EINVAL", "local_gpu must be in 0..%d (this node drives %d GPUs), not %r"
                         % (self.gpus_per_node - 1, self.gpus_per_node, local_gpu))
        return self.node_rank * self.gpus_per_node + local_gpu

    @property
    def ranks(self):
        """This node's global ranks, by local GPU."""
        first = self.node_rank * self.gpus_per_node
        return range(first, first + self.gpus_per_node)

    def init_comm(self, local_gpu, device=None, timeout=300.0):
        """Makes the NCCL communicator of `local_gpu` on the calling thread (ncclCommInitRank on
        CUDA device `device`, default local_gpu; blocks until every rank has joined, at most
        `timeout` seconds, then aborts it and raises TimedOutError, a TimeoutError; None: no
        limit) and registers it so that the watchdog aborts it when the job aborts. The caller
        closes it.
        Raises LibraryNotFoundError, NoDriverError/NoDeviceError, NcclError, TimeoutError."""
        comm = NcclComm(self.unique_id, self.world_size, self.rank_of(local_gpu),
                        local_gpu if device is None else device, timeout=timeout)
        _runtime.register(comm, abort=nccl.abort, owner=self._owner)
        return comm


# ---------------------------------------------------------------------------------------------
# The launcher's rendezvous, and the runtime (watchdog, preemption) in cluster_runtime.py
# ---------------------------------------------------------------------------------------------

_current = None           # the Rendezvous `threadloom run --nnodes ...` made, or None


def current():
    """The Rendezvous the launcher made before user code ran (`threadloom run` under a
    multi-node SLURM step or with --nnodes/--node-rank/--master), or None."""
    return _current


def _set_current(rv):
    global _current
    if rv is not None:
        rv._launcher = True
    _current = rv


_RUNTIME_NAMES = ("Watchdog", "SlurmCommands", "on_preempt", "Preemption", "PREEMPT_EXIT",
                  "ABORT_EXIT")


def __getattr__(name):
    # The runtime lives in its own module (it imports this one); its public names are here too.
    if name in _RUNTIME_NAMES:
        from threadloom import cluster_runtime
        return getattr(cluster_runtime, name)
    raise AttributeError("module 'threadloom.cluster' has no attribute %r" % name)
