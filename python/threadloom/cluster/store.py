"""The job's rendezvous store: a small key-value store over TCP that node 0 serves and every
node (node 0 included) connects to, after proving it knows the job secret.

Python on the free-threaded interpreter gives one real thread per connection, and the
standard library's hmac/hashlib/secrets a reviewed SHA-256 HMAC and nonce source; the store
is a handful of operations at job start (the rendezvous, the NCCL unique id) and the
watchdog's heartbeats, so its cost is round trips, not CPU. docs/design.md ("Cluster") gives
the protocol, the secret and how the port is chosen.
"""

import collections
import errno
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import time
import zlib

from threadloom import errors
from threadloom.cluster.env import TOKEN_VAR

log = logging.getLogger("threadloom.cluster")


def _error(name, detail):
    """The threadloom exception for TL_E<name> with `detail` (see threadloom.errors)."""
    return errors.error(name, detail)


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
HANDSHAKE_TIMEOUT = 10.0  # seconds from accept() to the end of the handshake, in all
FRAME_TIMEOUT = 30.0     # seconds from a frame's first byte to its last (and to send a response)
MAX_UNAUTHENTICATED = 64  # connections still in the handshake; more shed the oldest
MAX_CONNECTIONS = 4096   # connections in all (a thread each); more are refused

OP_SET, OP_GET, OP_WAIT, OP_ADD = 1, 2, 3, 4
ST_OK, ST_NOTFOUND, ST_TIMEOUT, ST_ERROR = 0, 1, 2, 3


class _ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


def _recv_exact(sock, n, deadline=None):
    """n bytes from sock. deadline (time.monotonic()): for all of them together, not per
    recv, so a peer that trickles one byte at a time still runs out of time (TimeoutError);
    None: the socket's own timeout, per recv."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("%d of %d bytes in time" % (len(buf), n))
            sock.settimeout(left)
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

class _Conn:
    """One accepted connection, owned by its thread (which alone closes `sock`)."""

    __slots__ = ("sock", "authenticated", "shed")

    def __init__(self, sock):
        self.sock = sock
        self.authenticated = False   # past the handshake
        self.shed = False            # shut down by the store to make room; its thread ends


class StoreServer:
    """A key-value store on TCP for one job's rendezvous: set/get/wait/add on byte values.

    Threads: one accept thread and one thread per connection, so the limits on connections
    bound the threads too. Invariants: `_data`, `_bytes` and `_closed` are guarded by `_cond`;
    `_shutting`, `_conns`, `_pending`, `_open` and `_stats` by `_lock`; `_cond` is never taken
    while holding `_lock` or the other way round. `_conns` holds every connection whose thread
    has not ended; `_pending` those still in the handshake and not shed, oldest first; `_open`
    counts the ones not shed. A socket is closed only by its own thread, after it left
    `_conns` (under `_lock`); others shut it down under `_lock`, so never a reused descriptor.

    What a peer can hold, and for how long: a connection in the handshake, at most
    `handshake_timeout` seconds in all (not per recv); at most `max_unauthenticated` of them
    (a new one sheds the oldest, so a flood of idle connections cannot lock nodes out); at
    most `max_connections` in all (a further one is closed at once, unless an unauthenticated
    one can be shed for it). An authenticated peer may idle between requests as long as it
    likes, but a frame, once begun, must arrive within `frame_timeout` seconds, and so must
    the response leave. When accept() fails for lack of descriptors (EMFILE, ENFILE) or
    memory, the store sheds the oldest unauthenticated connection, backs off (10 ms doubling
    to 0.5 s) and keeps accepting. A connection that fails the handshake, sends a malformed
    or oversized frame or an unknown op is closed; the store keeps serving the others."""

    def __init__(self, secret, ports, bind="", max_frame=MAX_FRAME,
                 handshake_timeout=HANDSHAKE_TIMEOUT, frame_timeout=FRAME_TIMEOUT,
                 max_unauthenticated=MAX_UNAUTHENTICATED, max_connections=MAX_CONNECTIONS):
        if max_unauthenticated < 1 or max_connections < 1:
            raise _error("EINVAL", "max_unauthenticated and max_connections must be >= 1, got "
                         "%r and %r" % (max_unauthenticated, max_connections))
        self._secret = secret
        self._max_frame = max_frame
        self._handshake_timeout = handshake_timeout
        self._frame_timeout = frame_timeout
        self._max_unauthenticated = min(max_unauthenticated, max_connections)
        self._max_connections = max_connections
        self._data = {}
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._stop = threading.Event()   # set by close(): ends the accept loop's back-off
        self._shutting = False           # close() has begun: admit nothing more
        self._conns = set()
        self._pending = collections.OrderedDict()
        self._open = 0
        self._stats = {"connections": 0, "authenticated": 0, "rejected_auth": 0,
                       "rejected_frames": 0, "timed_out": 0, "shed": 0, "refused": 0,
                       "accept_errors": 0}
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
        """Counters: connections (accepted), authenticated, rejected_auth, rejected_frames,
        timed_out (handshakes past their deadline), shed (unauthenticated connections closed
        to make room), refused (closed at once: every slot held by authenticated peers),
        accept_errors (accept() failures survived, e.g. EMFILE); and now: unauthenticated
        and authenticated_open (connections open)."""
        with self._lock:
            out = dict(self._stats)
            out["unauthenticated"] = len(self._pending)
            out["authenticated_open"] = self._open - len(self._pending)
        return out

    def _count(self, key):
        with self._lock:
            self._stats[key] += 1

    def _shed_oldest(self):
        """Shuts down the oldest connection still in the handshake (under _lock); False when
        there is none."""
        if not self._pending:
            return False
        c, _ = self._pending.popitem(last=False)
        c.shed = True
        self._open -= 1
        self._stats["shed"] += 1
        try:
            c.sock.shutdown(socket.SHUT_RDWR)   # its thread sees the end and closes it
        except OSError:
            pass
        return True

    def _admit(self, sock):
        """The _Conn for a new connection, or None when it must be refused (under _lock)."""
        if len(self._pending) >= self._max_unauthenticated:
            self._shed_oldest()
        if self._open >= self._max_connections and not self._shed_oldest():
            return None
        c = _Conn(sock)
        self._conns.add(c)
        self._pending[c] = None
        self._open += 1
        self._stats["connections"] += 1
        return c

    def _accept_loop(self):
        pause = None     # the back-off after a failed accept(); None: the last one succeeded
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError as e:
                if self._stop.is_set():
                    return  # closed
                with self._lock:
                    self._stats["accept_errors"] += 1
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._shed_oldest()
                if pause is None:
                    log.warning("rendezvous store on port %d: accept() failed (%s); shedding "
                                "unauthenticated connections and retrying", self.port, e)
                pause = min(pause * 2, 0.5) if pause else 0.01
                self._stop.wait(pause)
                continue
            pause = None
            with self._lock:
                shutting = self._shutting
                c = None if shutting else self._admit(sock)
                if c is None and not shutting:
                    self._stats["refused"] += 1
            if c is None:
                sock.close()
                if shutting:
                    return
                continue
            try:
                threading.Thread(target=self._serve, args=(c,), name="threadloom-store-conn",
                                 daemon=True).start()
            except RuntimeError:   # no thread for it: as if refused
                self._ended(c)
                sock.close()
                self._count("refused")

    def _ended(self, c):
        with self._lock:
            self._conns.discard(c)
            if not c.shed:
                self._open -= 1
                self._pending.pop(c, None)

    def _serve(self, c):
        conn = c.sock
        try:
            deadline = time.monotonic() + self._handshake_timeout
            conn.settimeout(self._handshake_timeout)
            snonce = secrets.token_bytes(NONCE)
            conn.sendall(MAGIC + snonce)
            reply = _recv_exact(conn, NONCE + MAC, deadline)
            cnonce, proof = reply[:NONCE], reply[NONCE:]
            if not hmac.compare_digest(proof, _mac(self._secret, b"C", snonce, cnonce)):
                self._count("rejected_auth")
                conn.sendall(b"\x00")
                return
            with self._lock:
                if c.shed:
                    return
                del self._pending[c]
                c.authenticated = True
                self._stats["authenticated"] += 1
            conn.sendall(b"\x01" + _mac(self._secret, b"S", cnonce, snonce))
            while True:
                req = self._recv_request(conn)
                if req is None:
                    return
                conn.settimeout(self._frame_timeout)
                _send_frame(conn, self._handle(req))
        except (_ProtocolError, TimeoutError) as e:
            if not c.shed:   # a shed connection was counted when it was shed
                self._count("rejected_frames" if c.authenticated else "timed_out"
                            if isinstance(e, TimeoutError) else "rejected_auth")
        except (OSError, ValueError):
            pass  # peer went away, or the store closed it
        finally:
            self._ended(c)
            conn.close()

    def _recv_request(self, conn):
        """The next request frame, or None when the peer closed the connection between frames.
        Waits for a frame's first bytes as long as the peer likes; the rest must come within
        frame_timeout (a TimeoutError otherwise)."""
        conn.settimeout(None)
        first = conn.recv(4)
        if not first:
            return None
        deadline = time.monotonic() + self._frame_timeout
        (n,) = struct.unpack(">I", first + _recv_exact(conn, 4 - len(first), deadline))
        if n > self._max_frame:
            raise _ProtocolError("frame of %d bytes over the limit of %d" % (n, self._max_frame))
        return _recv_exact(conn, n, deadline)

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
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:   # under the lock: no connection's thread closes its socket meanwhile
            self._shutting = True
            for c in self._conns:
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
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
