"""The checkpoint directory: what its names mean, reading which checkpoints it holds, and
removing what a crash or retention leaves.

    step-<N>/              a complete checkpoint: it only ever appears by a rename (writer.py)
    latest                 "step-<N>\\n", the newest committed save (replaced by a rename)
    .tmp-step-<N>-<hex>/   a save being written
    .del-<name>-<hex>/     a checkpoint being deleted (renamed first, so never half there)
    .latest-<hex>          the next `latest`, before its rename
    .lock                  flock'ed by the one Checkpointer that writes into the directory

A Checkpointer removes the temporary names (.tmp-, .del-, .latest-) it finds when it opens the
directory: they are what an interrupted save or deletion left, and are never loaded.
"""

import logging
import os
import re
import secrets
import shutil

from threadloom import errors
from threadloom.checkpoint.format import MANIFEST

log = logging.getLogger("threadloom.checkpoint")

LATEST = "latest"
LOCK = ".lock"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIXES = (".tmp-step-", ".del-", ".latest-")


def directory(path):
    """The absolute path of the checkpoint directory `path` (str or os.PathLike). Refuses an
    empty one, which would silently be the current directory (InvalidArgumentError)."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError("the checkpoint directory must be a path (str or os.PathLike), not %r"
                        % (path,)) from None
    if p in ("", b""):
        raise errors.error("EINVAL", "the checkpoint directory is an empty string: give a path "
                           "such as 'ckpt/' ('.' if you mean the current directory)")
    return os.path.abspath(p)


def step_name(step):
    return "step-%d" % step


def tmp_dir(directory, step):
    """A fresh name for the directory a save of `step` is written into."""
    return os.path.join(directory, ".tmp-step-%d-%s" % (step, secrets.token_hex(4)))


def tomb(directory, name):
    """A fresh name to rename the entry `name` to before deleting it."""
    return os.path.join(directory, ".del-%s-%s" % (name, secrets.token_hex(4)))


def latest_tmp(directory):
    """A fresh name for the next `latest` before its rename."""
    return os.path.join(directory, ".latest-%s" % secrets.token_hex(4))


def complete_steps(directory):
    """{step: path} of the complete checkpoints (step-N directories with a manifest)."""
    out = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        m = _STEP_RE.match(name)
        path = os.path.join(directory, name)
        if m and os.path.isfile(os.path.join(path, MANIFEST)):
            out[int(m.group(1))] = path
    return out


def read_latest(directory):
    """The step `latest` names, or None (missing, or not a step name)."""
    try:
        with open(os.path.join(directory, LATEST), encoding="utf-8") as f:
            m = _STEP_RE.match(f.read().strip())
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(m.group(1)) if m else None


def clean_stale(directory):
    """Removes what interrupted saves and deletions left in `directory` (logged)."""
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(_TMP_PREFIXES):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            removed += 1
    if removed:
        log.info("removed %d leftover temporary entries from an interrupted save in %s",
                 removed, directory)


def retain(ops, directory, keep, newest):
    """Deletes the oldest complete checkpoints but `newest` until `keep` remain (0: keeps
    all), each renamed away first. A checkpoint that cannot be deleted is logged and kept."""
    if keep == 0:
        return
    steps = complete_steps(directory)
    older = sorted(s for s in steps if s != newest)
    drop = older[:max(0, len(older) - (keep - 1))]
    for s in drop:
        grave = tomb(directory, step_name(s))
        try:
            ops.rename(steps[s], grave)
            ops.remove_tree(grave)
        except OSError as e:
            log.warning("retention could not delete %s: %s", steps[s], e)
