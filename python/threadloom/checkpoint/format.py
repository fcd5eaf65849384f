"""The checkpoint format (docs/checkpoint-format.md), its writer's and its reader's side next to
each other: the safetensors files' header, manifest.json, the state tree in it, and the error
a checkpoint that does not read back as written raises.

A checkpoint directory holds safetensors files (an 8-byte little-endian header length, the
JSON header with each tensor's dtype, shape and data_offsets and a ``__metadata__`` entry, then
the data section, 8-byte aligned) and manifest.json: every tensor's file, offsets, bytes and
xxh3_64, every file's size and header xxh3_64, and the state's tree, whose nodes are
{"tensor": key}, {"dict": [[k, node], ...]}, {"list": [...]}, {"tuple": [...]},
{"value": JSON value} or {"pickle": base64}. Since version 2 the manifest opens with its own
xxh3_64, so every byte that decides what a checkpoint means is verified before it is used.
"""

import base64
import binascii
import json
import math
import os
import pickle
import re
import struct
import time

from threadloom import _core, errors
from threadloom.checkpoint.device import leaf as tensor_leaf
from threadloom.checkpoint.leaves import DTYPE_SIZES, Tensor

FORMAT = "threadloom-checkpoint"
VERSION = 2               # what this threadloom writes
READABLE = (1, 2)         # what it reads (version 1: no checksum over the manifest, headers)
MANIFEST = "manifest.json"
_MAX_HEADER = 100 << 20   # a longer safetensors header is not read (a corrupt length)
# manifest.json (version 2) opens with its own checksum: XXH3-64 of every byte after this line.
_SUM_RE = re.compile(rb'^\{\n "manifest_xxh3_64": "([0-9a-f]{16})",')
_FILE_RE = re.compile(r"shard-\d{5}-of-\d{5}\.safetensors")   # (fullmatch) no path in it
_HEX16_RE = re.compile(r"[0-9a-f]{16}")


# ---------------------------------------------------------------------------------------------
# Verification failures
# ---------------------------------------------------------------------------------------------

class CorruptCheckpointError(_core.InputOutputError):
    """A checkpoint failed verification: a checksum mismatch, a truncated or unparsable file.
    Attributes: step, path (the checkpoint directory), file and key (the tensor; None when the
    problem is not one tensor's), and those of every threadloom error (TL_EIO)."""

    step = path = file = key = None


def corrupt(message, *, step=None, path=None, file=None, key=None):
    """The CorruptCheckpointError for `message` (made like every threadloom error, by
    _core.make_error)."""
    e = errors.error("EIO", message, what="checkpoint failed verification",
                     hint="load an older checkpoint (load(..., fallback=True) does it for you) "
                          "and check the disk", cls=CorruptCheckpointError)
    e.step, e.path, e.file, e.key = step, path, file, key
    return e


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------

def file_metadata(step, version=VERSION):
    """The ``__metadata__`` of every safetensors file of a save."""
    return {"format": FORMAT, "format_version": str(version), "step": str(step)}


def safetensors_header(tensors, metadata):
    """The bytes before a file's data section: the header's length and the header, padded
    with spaces so the data section starts 8-byte aligned."""
    header = {"__metadata__": metadata}
    for t in tensors:
        header[t.key] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [t.begin, t.end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # 8-byte alignment of the data section
    return struct.pack("<Q", len(raw)) + raw


def read_exact(fd, offset, n):
    """n bytes of `fd` at `offset` as a bytearray, or None when the file ends first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            return None
        got += k
    return buf


def read_safetensors_header(fd, entry, step, version, corrupt):
    """(header dict, offset of the data section) of the open safetensors file `fd`, whose
    manifest entry is `entry`; raises corrupt(message, file) when the file's size differs from
    the manifest's, when the header is truncated, fails its xxh3_64 (version 2) or does not
    parse, or when its ``__metadata__`` is not this checkpoint's."""
    fname = entry["name"]
    size = os.fstat(fd).st_size
    if size != entry["bytes"]:
        raise corrupt("%s is %d bytes, manifest.json says %d (truncated or overwritten)"
                      % (fname, size, entry["bytes"]), fname)
    head = read_exact(fd, 0, 8)
    if head is None:
        raise corrupt("%s is truncated (no header)" % fname, fname)
    (hlen,) = struct.unpack("<Q", head)
    raw = read_exact(fd, 8, hlen) if 8 + hlen <= min(size, _MAX_HEADER) else None
    if raw is None:
        raise corrupt("%s: the header length %d runs past the file" % (fname, hlen), fname)
    if version >= 2:
        got = "%016x" % _core.xxh3_64(bytes(head) + bytes(raw))
        if 8 + hlen != entry["header_bytes"] or got != entry["header_xxh3_64"]:
            raise corrupt("%s: the safetensors header fails its checksum (manifest xxh3_64 %s "
                          "of %d bytes, file %s of %d)" % (fname, entry["header_xxh3_64"],
                                                           entry["header_bytes"], got, 8 + hlen),
                          fname)
    try:
        header = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise corrupt("%s: the safetensors header does not parse" % fname, fname)
    if header.get("__metadata__") != file_metadata(step, version):
        raise corrupt("%s: the header's __metadata__ is not this checkpoint's (%r)"
                      % (fname, header.get("__metadata__")), fname)
    return header, 8 + hlen


# ---------------------------------------------------------------------------------------------
# manifest.json
# ---------------------------------------------------------------------------------------------

def manifest(step, files, tensors, tree, metadata):
    """manifest.json's content for a save whose files and tensors are written and hashed
    (manifest_bytes() gives the file)."""
    entries = {}
    for t in tensors:
        entries[t.key] = {
            "file": t.file.name, "path": t.path, "dtype": t.dtype, "shape": t.shape,
            "data_offsets": [t.begin, t.end], "bytes": t.nbytes, "source": t.source,
            "xxh3_64": "%016x" % t.checksum}
    now = time.time()
    return {
        "format": FORMAT, "format_version": VERSION, "step": step, "time": now,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "checksum": "xxh3_64", "threadloom": _core.__version__,
        "files": [{"name": f.name, "bytes": f.size, "tensors": len(f.tensors),
                   "header_bytes": len(f.header),
                   "header_xxh3_64": "%016x" % _core.xxh3_64(f.header)} for f in files],
        "tensors": entries, "tree": tree, "metadata": metadata}


def manifest_bytes(m):
    """manifest.json's bytes for the manifest `m`: indented JSON whose first member,
    manifest_xxh3_64, is the XXH3-64 of every byte after its line."""
    body = json.dumps(m, indent=1).encode("utf-8")   # b'{\n "format": ...}'
    rest = body[1:]
    return b'{\n "manifest_xxh3_64": "%016x",' % _core.xxh3_64(rest) + rest


def read_manifest(path, step, corrupt):
    """The manifest of the checkpoint directory `path` (of step `step`), verified: its
    checksum (version 2), then its structure (every version: check_manifest). Raises
    corrupt(message, file) for any disagreement, so a damaged manifest never surfaces as a
    KeyError or a changed state."""
    with open(os.path.join(path, MANIFEST), "rb") as f:
        raw = f.read()
    summed = _SUM_RE.match(raw)
    if summed:
        got = "%016x" % _core.xxh3_64(raw[summed.end():])
        if got != summed.group(1).decode("ascii"):
            raise corrupt("manifest.json of %s fails its checksum (stored xxh3_64 %s, content "
                          "%s)" % (path, summed.group(1).decode("ascii"), got), MANIFEST)
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt("manifest.json of %s does not parse: %s" % (path, e), MANIFEST) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise corrupt("%s is not a threadloom checkpoint (manifest.json has no format %r)"
                      % (path, FORMAT), MANIFEST)
    version = m.get("format_version")
    if type(version) is not int or version not in READABLE:
        raise corrupt("%s: format version %r is not one this threadloom reads (%s)"
                      % (path, version, ", ".join(map(str, READABLE))), MANIFEST)
    if version >= 2 and not summed:
        raise corrupt("manifest.json of %s (format version %d) does not open with its checksum"
                      % (path, version), MANIFEST)
    check_manifest(m, step, corrupt)
    return m


def check_manifest(m, step, corrupt):
    """Raises corrupt(message, MANIFEST) unless `m` is a well-formed manifest of step `step`:
    every file and tensor entry has its fields of the right types, each tensor's size agrees
    with its dtype, shape and offsets and its file is listed, and the tree refers to each
    tensor exactly once, at the key path the tensor's entry records. For version 1, which has
    no checksum, this is what is verified of the manifest; for version 2 it catches a writer
    that disagrees with this reader."""
    def need(ok, what):
        if not ok:
            raise corrupt("manifest.json of step-%d: %s" % (step, what), MANIFEST)

    def is_int(v):
        return type(v) is int and v >= 0

    version = m["format_version"]
    need(m.get("step") == step and is_int(m.get("step")),
         "step %r, but the directory is step-%d" % (m.get("step"), step))
    need(m.get("checksum") == "xxh3_64", "tensor checksum %r is not xxh3_64"
         % (m.get("checksum"),))
    files, tensors = m.get("files"), m.get("tensors")
    need(isinstance(files, list) and files, "no list of files")
    need(isinstance(tensors, dict), "no table of tensors")
    counts = {}
    for f in files:
        need(isinstance(f, dict) and isinstance(f.get("name"), str)
             and _FILE_RE.fullmatch(f["name"]) and is_int(f.get("bytes")) and f["bytes"] >= 8
             and is_int(f.get("tensors")) and f["name"] not in counts,
             "bad file entry %r" % (f,))
        if version >= 2:
            need(is_int(f.get("header_bytes")) and isinstance(f.get("header_xxh3_64"), str)
                 and _HEX16_RE.fullmatch(f["header_xxh3_64"]), "bad file entry %r" % (f,))
        counts[f["name"]] = 0
    for key, t in tensors.items():
        need(key != "__metadata__" and isinstance(t, dict) and t.get("file") in counts
             and t.get("dtype") in DTYPE_SIZES and isinstance(t.get("shape"), list)
             and all(is_int(d) for d in t["shape"]) and isinstance(t.get("data_offsets"), list)
             and len(t["data_offsets"]) == 2 and all(is_int(o) for o in t["data_offsets"])
             and isinstance(t.get("xxh3_64"), str) and _HEX16_RE.fullmatch(t["xxh3_64"])
             and isinstance(t.get("path"), list), "bad tensor entry %r: %r" % (key, t))
        b, e = t["data_offsets"]
        need(b <= e and e - b == math.prod(t["shape"]) * DTYPE_SIZES[t["dtype"]]
             and t.get("bytes", e - b) == e - b,
             "tensor %r: %d bytes at %r do not hold a %s tensor of shape %r"
             % (key, e - b, t["data_offsets"], t["dtype"], t["shape"]))
        counts[t["file"]] += 1
    for f in files:
        need(f["tensors"] == counts[f["name"]], "%s holds %d tensors, its entry says %d"
             % (f["name"], counts[f["name"]], f["tensors"]))
    seen = set()
    _check_tree(m.get("tree"), [], tensors, seen, need)
    need(len(seen) == len(tensors), "tensors the tree does not refer to: %s"
         % sorted(set(tensors) - seen)[:5])


_NODE_KINDS = ("tensor", "dict", "list", "tuple", "value", "pickle")


def _check_tree(node, path, tensors, seen, need):
    """check_manifest's walk of the tree: well-formed nodes, each tensor once, at its path."""
    need(isinstance(node, dict) and len(node) == 1 and next(iter(node)) in _NODE_KINDS,
         "bad tree node %r at %r" % (node, path))
    kind, v = next(iter(node.items()))
    if kind == "tensor":
        need(isinstance(v, str) and v in tensors and v not in seen
             and tensors[v]["path"] == path,
             "tree node %r at %r: not a tensor of the table, or not its path" % (node, path))
        seen.add(v)
    elif kind == "dict":
        need(isinstance(v, list), "bad dict node at %r" % (path,))
        for item in v:
            need(isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int),
                 "bad dict item %r at %r" % (item, path))
            _check_tree(item[1], path + [item[0]], tensors, seen, need)
    elif kind in ("list", "tuple"):
        need(isinstance(v, list), "bad %s node at %r" % (kind, path))
        for i, child in enumerate(v):
            _check_tree(child, path + [i], tensors, seen, need)
    elif kind == "pickle":
        need(isinstance(v, str), "bad pickle node at %r" % (path,))


# ---------------------------------------------------------------------------------------------
# The state tree: tensors out, everything else into the manifest
# ---------------------------------------------------------------------------------------------

def _key_of(path):
    return ".".join(str(p) for p in path) or "tensor"


def flatten(obj, path, tensors, keys):
    """The manifest node for `obj`, appending its tensors (leaves.Tensor) to `tensors`; `keys`
    holds the tensor names taken so far."""
    where = repr(_key_of(path)) if path else "(the whole state)"
    leaf = tensor_leaf(obj, where)
    if leaf is not None:
        source, flat, dtype, shape = leaf
        key, n = _key_of(path), 1
        while key in keys or key == "__metadata__":
            key, n = "%s#%d" % (_key_of(path), n), n + 1
        keys.add(key)
        tensors.append(Tensor(key, list(path), source, flat, dtype, shape))
        return {"tensor": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError("state dict keys must be str or int, not %r at %s"
                                % (type(k).__name__, where))
            items.append([k, flatten(v, path + [k], tensors, keys)])
        return {"dict": items}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        nodes = [flatten(v, path + [i], tensors, keys) for i, v in enumerate(obj)]
        return {"list" if type(obj) is list else "tuple": nodes}
    if obj is None or isinstance(obj, (bool, str)) or type(obj) is int or (
            type(obj) is float and math.isfinite(obj)):
        return {"value": obj}
    try:
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError("state leaf %s (%s) is neither a tensor nor picklable: %s"
                        % (where, type(obj).__name__, e)) from e
    return {"pickle": base64.b64encode(blob).decode("ascii")}


def build(node, values, allow_pickle, verified, corrupt):
    """The state of the tree `node` (checked by check_manifest), with each tensor's value from
    `values` (key -> value); raises pickle.UnpicklingError for a pickled leaf without
    allow_pickle. A pickled leaf that does not decode is corrupt(message, file); one that does
    not unpickle raises what pickle raised when the manifest was `verified` (its bytes are as
    written: a class that moved, say), and is corrupt otherwise (version 1: damage cannot be
    told from a missing class)."""
    kind, v = next(iter(node.items()))
    if kind == "tensor":
        return values[v]
    if kind == "dict":
        return {k: build(c, values, allow_pickle, verified, corrupt) for k, c in v}
    if kind == "list":
        return [build(c, values, allow_pickle, verified, corrupt) for c in v]
    if kind == "tuple":
        return tuple(build(c, values, allow_pickle, verified, corrupt) for c in v)
    if kind == "value":
        return v
    if not allow_pickle:
        raise pickle.UnpicklingError("the checkpoint holds pickled values and "
                                     "allow_pickle=False")
    try:
        blob = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise corrupt("manifest.json: a pickled leaf is not base64", MANIFEST) from None
    if verified:
        return pickle.loads(blob)
    try:
        return pickle.loads(blob)
    except Exception as e:
        raise corrupt("manifest.json: a pickled leaf does not unpickle (%s: %s); a version-1 "
                      "manifest has no checksum, so damage cannot be told from a class that "
                      "moved" % (type(e).__name__, e), MANIFEST) from e
