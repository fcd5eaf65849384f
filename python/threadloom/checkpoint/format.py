"""The checkpoint format (docs/checkpoint-format.md), its writer's and its reader's side next to
each other: the safetensors files' header, manifest.json, the state tree in it, and the error
a checkpoint that does not read back as written raises.

A checkpoint directory holds safetensors files (an 8-byte little-endian header length, the
JSON header with each tensor's dtype, shape and data_offsets and a ``__metadata__`` entry, then
the data section, 8-byte aligned) and manifest.json: every tensor's file, offsets, bytes and
xxh3_64, and the state's tree, whose nodes are {"tensor": key}, {"dict": [[k, node], ...]},
{"list": [...]}, {"tuple": [...]}, {"value": JSON value} or {"pickle": base64}.
"""

import base64
import json
import math
import os
import pickle
import struct
import time

from threadloom import _core, errors
from threadloom.checkpoint.leaves import Tensor, tensor_leaf

FORMAT = "threadloom-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_MAX_HEADER = 100 << 20   # a longer safetensors header is not read (a corrupt length)


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

def file_metadata(step):
    """The ``__metadata__`` of every safetensors file of a save."""
    return {"format": FORMAT, "format_version": str(VERSION), "step": str(step)}


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


def read_safetensors_header(fd, fname, corrupt):
    """(header dict, offset of the data section) of the open safetensors file `fd`; raises
    corrupt(message, file) when it is truncated or does not parse."""
    head = read_exact(fd, 0, 8)
    if head is None:
        raise corrupt("%s is truncated (no header)" % fname, fname)
    (hlen,) = struct.unpack("<Q", head)
    raw = read_exact(fd, 8, hlen) if hlen < _MAX_HEADER else None
    try:
        header = json.loads(bytes(raw))
    except (TypeError, ValueError, UnicodeDecodeError):
        raise corrupt("%s: the safetensors header does not parse" % fname, fname) from None
    return header, 8 + hlen


# ---------------------------------------------------------------------------------------------
# manifest.json
# ---------------------------------------------------------------------------------------------

def manifest(step, files, tensors, tree, metadata):
    """manifest.json's content for a save whose files and tensors are written and hashed."""
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
        "files": [{"name": f.name, "bytes": f.size, "tensors": len(f.tensors)} for f in files],
        "tensors": entries, "tree": tree, "metadata": metadata}


def read_manifest(path, corrupt):
    """The manifest of the checkpoint directory `path`; raises corrupt(message, file) when it
    does not parse or is not of this format's version."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            m = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt("manifest.json of %s does not parse: %s" % (path, e), MANIFEST) from e
    if m.get("format") != FORMAT or m.get("format_version") != VERSION:
        raise corrupt("%s is not a threadloom checkpoint of format version %d"
                      % (path, VERSION), MANIFEST)
    return m


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


def build(node, values, allow_pickle, corrupt):
    """The state of the tree `node`, with each tensor's value from `values` (key -> value);
    raises pickle.UnpicklingError for a pickled leaf without allow_pickle, corrupt(message,
    file) for a node of no known kind."""
    if "tensor" in node:
        return values[node["tensor"]]
    if "dict" in node:
        return {k: build(v, values, allow_pickle, corrupt) for k, v in node["dict"]}
    if "list" in node:
        return [build(v, values, allow_pickle, corrupt) for v in node["list"]]
    if "tuple" in node:
        return tuple(build(v, values, allow_pickle, corrupt) for v in node["tuple"])
    if "value" in node:
        return node["value"]
    if "pickle" in node:
        if not allow_pickle:
            raise pickle.UnpicklingError("the checkpoint holds pickled values and "
                                         "allow_pickle=False")
        return pickle.loads(base64.b64decode(node["pickle"]))
    raise corrupt("manifest.json: unknown node %r" % sorted(node), MANIFEST)
