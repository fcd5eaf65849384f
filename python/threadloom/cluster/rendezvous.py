"""Meeting the other nodes of a job: rendezvous() and the Rendezvous it returns, the NCCL
unique id shared over the store (Rendezvous.nccl_bootstrap), and the Rendezvous the launcher
made before user code (current()).

Each node claims its rank in the store, registers its host and waits for every rank; node 0
also publishes a free port for torch.distributed's own store. A rank missing at the deadline
gives TimedOutError naming the missing ranks. See docs/design.md ("Cluster").
"""

import dataclasses
import json
import os
import socket
import threading
import time

from threadloom import _core, _runtime, errors
from threadloom.cluster import torchrun
from threadloom.cluster.env import TOKEN_VAR, slurm_env
from threadloom.cluster.store import PORT_TRIES, StoreClient, StoreServer, job_secret, store_ports
from threadloom.comm import nccl
from threadloom.comm.nccl import NcclComm


def _error(name, detail):
    """The threadloom exception for TL_E<name> with `detail` (see threadloom.errors)."""
    return errors.error(name, detail)


ABORT_KEY = "abort"       # the store key whose value tells every node to abort (JSON)
NCCL_ID_BYTES = 128       # sizeof(ncclUniqueId)


def _free_port(bind="", port=0):
    """A port free on `bind` (port 0: any; else `port`, checked). Raises EAGAIN when `port` is
    taken: torch.distributed's store, which binds it later, would fail with a less clear
    message."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as torch's TCPStore does
        s.bind((bind, port))
        return s.getsockname()[1]
    except OSError as e:
        if not port:
            raise
        raise _error("EAGAIN", "port %d on node 0 is in use (%s): torch.distributed's store "
                     "listens on the --master port (MASTER_PORT); give another port, or none "
                     "to let node 0 pick a free one" % (port, e.strerror or e)) from None
    finally:
        s.close()


@dataclasses.dataclass
class Rendezvous:
    """The result of rendezvous(): this node's place in the job, and the job's store."""
    rank: int                 # this node's rank (0 runs the store)
    world_size: int           # number of nodes
    master_addr: str          # node 0's address as the nodes reach it
    master_port: int          # torch.distributed's port on node 0 (MASTER_PORT): the one
                              # `master` named, else a free one node 0 picked
    store_port: int           # the port of threadloom's store on node 0
    hosts: tuple              # every node's host name, by rank
    store: StoreClient        # this node's connection to the store (for later bootstrap steps)
    server: object = None     # the StoreServer on node 0, None elsewhere
    job_key: str = ""         # the job key the secret is derived from ("slurm:<job>.<step>")
    watchdog: object = None   # the runtime.Watchdog watching this job, if one runs
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
        _publish_abort(store, self.rank, self.hosts[self.rank], reason)
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
        return torchrun.torchrun_env(rank=self.rank, world_size=self.world_size,
                                       master_addr=self.master_addr, master_port=self.master_port)

    def apply_torchrun_env(self, environ=None):
        """Sets the torchrun variables that `environ` (default os.environ) lacks; returns them."""
        return torchrun.apply_torchrun_env(environ, rank=self.rank, world_size=self.world_size,
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


def _publish_abort(store, rank, host, reason):
    """Publishes `reason` under the abort key unless another node's came first."""
    if store.add(ABORT_KEY + "/count") == 1:
        store.set(ABORT_KEY, json.dumps({"rank": rank, "host": host, "reason": reason}))


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
    "host:port"). The port, as torchrun's --master-port, is torch.distributed's: MASTER_PORT
    (every node must give the same; node 0 checks it is free); without one node 0 picks a free
    port. Node 0 starts threadloom's own store (on `bind`, default all interfaces) on the first
    free port of store_ports(job key) other than that one; every node connects, proves it
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
    host, port = _parse_master(master)   # port: torch.distributed's (MASTER_PORT), or None
    ports = [p for p in store_ports(job_key, port_tries + 1) if p != port][:port_tries]

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
                store.set("torch_port", str(_free_port(bind, port or 0)))
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
            if port and port != torch_port:
                e = _error("EINVAL", "node %d was given --master %s:%d, node 0 %s:%d: "
                           "torch.distributed's store (MASTER_PORT) is on node 0's port; give "
                           "every node the same --master" % (node_rank, host, port, host,
                                                             torch_port))
                _publish_abort(store, node_rank, me["host"], e.detail)   # the others stop too
                raise e
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


# ---------------------------------------------------------------------------------------------
# NCCL bootstrap result
# ---------------------------------------------------------------------------------------------

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
# The launcher's rendezvous
# ---------------------------------------------------------------------------------------------

_current = None     # the Rendezvous `threadloom run --nnodes ...` made, or None
_leaves = []        # the launcher's leave functions (one per launch.launch()); run once each


def current():
    """The Rendezvous the launcher made before user code ran (`threadloom run` under a
    multi-node SLURM step or with --nnodes/--node-rank/--master), or None."""
    return _current


def set_current(rv):
    """The launcher's: makes `rv` current() (its close() then does nothing: the launcher
    leaves the job when the program exits)."""
    global _current
    if rv is not None:
        rv._launcher = True
    _current = rv


def add_leave(leave):
    """The launcher's: records its leave(timeout), which leave_job() runs (once)."""
    _leaves.append(leave)


def leave_job(timeout=None):
    """Leaves the job now, as the launcher's atexit hook would, for exits by os._exit (a
    preemption's); node 0 waits up to `timeout` s (default: the rendezvous timeout) for the
    others to leave. Each leave runs once."""
    while _leaves:
        _leaves.pop()(timeout)
