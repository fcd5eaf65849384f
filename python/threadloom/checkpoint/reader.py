"""Reading checkpoints: threadloom.load, every byte that decides what the state is verified.

A checkpoint is read only from a complete step-<N> directory (layout.py). manifest.json must
match its own xxh3_64 (format version 2) and be well formed (format.read_manifest); each
safetensors file must have the manifest's size, its header the manifest's xxh3_64 (version 2),
this checkpoint's __metadata__, the manifest's tensors with their dtype, shape and offsets, and
each tensor's bytes their xxh3_64. Any disagreement, truncation or unparsable file raises
CorruptCheckpointError naming the tensor and the file, and load(..., fallback=True) then tries
the older checkpoints.
"""

import logging
import os

from threadloom import _core, errors
from threadloom.devices import api as devices
from threadloom.checkpoint import layout
from threadloom.checkpoint.device import to_device
from threadloom.checkpoint.format import (CorruptCheckpointError, build, corrupt, read_exact,
                                         read_manifest, read_safetensors_header)
from threadloom.checkpoint.leaves import as_loaded, as_torch

log = logging.getLogger("threadloom.checkpoint")

_FRAMEWORKS = (None, "torch")


def _load_dir(path, step, allow_pickle, framework=None, device=None):
    def bad(msg, file=None, key=None):
        return corrupt(msg, step=step, path=path, file=file, key=key)

    manifest = read_manifest(path, step, bad)   # verified: checksum (version 2), structure
    version = manifest["format_version"]
    by_file = {f["name"]: [] for f in manifest["files"]}
    for key, t in manifest["tensors"].items():
        by_file[t["file"]].append((key, t))
    values = {}
    for entry in manifest["files"]:
        fname = entry["name"]
        entries = by_file[fname]
        fpath = os.path.join(path, fname)
        try:
            fd = os.open(fpath, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise bad("%s is missing" % fname, fname) from None
        try:
            header, base = read_safetensors_header(fd, entry, step, version, bad)
            if set(header) - {"__metadata__"} != {key for key, _ in entries}:
                raise bad("the header of %s names other tensors than manifest.json" % fname,
                          fname)
            if base + max((t["data_offsets"][1] for _, t in entries), default=0) \
                    != entry["bytes"]:
                raise bad("the tensors of %s do not end where the file does" % fname, fname)
            for key, t in entries:
                h = header[key]
                if not isinstance(h, dict) or h.get("dtype") != t["dtype"] \
                        or h.get("shape") != t["shape"] \
                        or h.get("data_offsets") != t["data_offsets"]:
                    raise bad("tensor %r: the header of %s disagrees with manifest.json"
                              % (key, fname), fname, key)
                b, e = t["data_offsets"]
                buf = read_exact(fd, base + b, e - b)
                if buf is None:
                    raise bad("tensor %r in %s is truncated" % (key, fname), fname, key)
                got = "%016x" % _core.xxh3_64(buf)
                if got != t["xxh3_64"]:
                    raise bad("tensor %r in %s: checksum mismatch (manifest xxh3_64 %s, "
                              "data %s)" % (key, fname, t["xxh3_64"], got), fname, key)
                if device is not None:
                    values[key] = to_device(buf, t["dtype"], t["shape"], key, device, framework)
                elif framework == "torch":
                    values[key] = as_torch(buf, t["dtype"], t["shape"], key)
                else:
                    values[key] = as_loaded(buf, t["dtype"], t["shape"])
        finally:
            os.close(fd)
    return build(manifest["tree"], values, allow_pickle, version >= 2, bad), manifest


def load(directory, step=None, *, fallback=False, allow_pickle=True, with_info=False,
         framework=None, device=None):
    """Loads a checkpoint written by Checkpointer, verifying every tensor's xxh3_64.

    step: which one (default: the one `latest` names, or the newest complete one when `latest`
    is missing or dangling). fallback: when it fails verification or cannot be read, try the
    older complete checkpoints, newest first, logging which one was used. Tensors come back as
    memoryviews of their format and shape (uint8 1-D ones as bytearray; BF16 as raw bytes), or
    with framework="torch" as CPU torch tensors of their dtype and shape (writable, not sharing
    memory with anything else: model.load_state_dict(state["model"]) takes them). device
    ("cuda:N", "sim:N", a threadloom Device): every tensor goes onto that device after it was
    verified: as DeviceBuffers of its bytes (copied on the calling thread's current stream of
    the device, which later work there is ordered after), or with framework="torch" as tensors
    of its dtype and shape (cuda tensors; on sim CPU tensors over the sim device's memory).
    Pickled leaves are
    unpickled: load only checkpoints you trust, or pass allow_pickle=False. with_info: return
    (state, info) where info has step, path, metadata, manifest and skipped (the (step, error)
    pairs fallback passed over). Raises CorruptCheckpointError naming the tensor and file,
    NotFoundError when there is no such checkpoint."""
    if framework not in _FRAMEWORKS:
        raise ValueError("framework must be None (memoryviews) or 'torch', not %r" % (framework,))
    if device is not None:
        device = devices.device(device)
    if framework == "torch":
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError("load(..., framework='torch') needs torch, which does not import "
                              "here (%s); install it, or load without framework= to get "
                              "memoryviews" % e) from e
    directory = layout.directory(directory)
    steps = layout.complete_steps(directory)
    if step is None:
        first = layout.read_latest(directory)
        if first not in steps:
            first = max(steps) if steps else None
    else:
        first = step
    if first is None or first not in steps:
        raise errors.error("ENOENT", "no complete checkpoint %sin %s" % (
            "" if step is None else "step-%d " % step, directory))
    order = [first] + (sorted((s for s in steps if s < first), reverse=True) if fallback else [])
    skipped = []
    for s in order:
        try:
            state, manifest = _load_dir(steps[s], s, allow_pickle, framework, device)
        except (CorruptCheckpointError, OSError) as e:
            if not fallback:
                raise
            skipped.append((s, e))
            log.warning("checkpoint step-%d in %s failed to load: %s", s, directory, e)
            continue
        if skipped:
            log.warning("loaded step-%d from %s instead (fallback past %s)", s, directory,
                        ", ".join("step-%d" % k for k, _ in skipped))
        if with_info:
            return state, {"step": s, "path": steps[s], "metadata": manifest.get("metadata"),
                           "manifest": manifest, "skipped": skipped}
        return state
    raise corrupt("no checkpoint in %s loads: %s" % (
        directory, "; ".join("step-%d: %s" % (k, e.detail if hasattr(e, "detail") else e)
                             for k, e in skipped)), path=directory)
