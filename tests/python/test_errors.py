"""threadloom's exceptions: one class per TL_E* code, carrying the name and what to do."""

import os

import pytest

import threadloom
from threadloom import _core
from conftest import TOPOLOGIES, gpu_count_or_reason

CODE = {cls: code for code, _, _, cls in _core.error_table()}


def test_every_code_has_its_own_class():
    table = _core.error_table()
    assert len(table) >= 20
    classes = set()
    for code, name, message, cls in table:
        assert code < 0
        assert name.startswith("TL_E")
        assert issubclass(cls, threadloom.Error)
        assert cls.__module__ == "threadloom"
        assert getattr(threadloom, cls.__name__) is cls
        assert name in cls.__doc__ and "What to do" in cls.__doc__
        classes.add(cls)
    assert len(classes) == len(table)


@pytest.mark.parametrize("code, name, message, cls", _core.error_table())
def test_raised_error_carries_name_hint_and_detail(code, name, message, cls):
    with pytest.raises(cls) as ei:
        _core._raise_error(code, "what failed")
    e = ei.value
    assert e.code == code
    assert e.name == name
    assert e.detail == "what failed"
    assert len(e.hint) > 10
    text = str(e)
    assert text.startswith(name + ": " + message)
    assert "(what failed)" in text
    assert "What to do: " + e.hint in text


def test_builtin_bases_still_catch():
    with pytest.raises(ValueError):
        _core._raise_error(CODE[threadloom.InvalidArgumentError])
    assert issubclass(threadloom.NotFoundError, FileNotFoundError)
    assert issubclass(threadloom.TimedOutError, TimeoutError)
    assert issubclass(threadloom.NoSpaceError, OSError)
    assert issubclass(threadloom.OutOfMemoryError, MemoryError)


def test_unknown_code_is_unknown_error():
    with pytest.raises(threadloom.UnknownError) as ei:
        _core._raise_error(-12345)
    assert ei.value.name == "TL_EUNKNOWN"


def test_real_failure_missing_topology_file(tmp_path):
    missing = str(tmp_path / "nope.xml")
    with pytest.raises(threadloom.NotFoundError) as ei:
        threadloom.topology(missing)
    assert missing in ei.value.detail
    assert "TL_ENOENT" in str(ei.value)


def test_real_failure_corrupt_topology_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<?xml version='1.0'?><nope>")
    with pytest.raises(threadloom.TopologyError) as ei:
        threadloom.topology(str(bad))
    assert "HWLOC_XMLFILE" in ei.value.hint


def test_no_driver_is_explained():
    n, why = gpu_count_or_reason()
    if n:
        pytest.skip("a GPU is present")
    with pytest.raises((threadloom.NoDriverError, threadloom.NoDeviceError, threadloom.NotBuiltError)) as ei:
        _core.cuda_device_count()
    assert "What to do" in str(ei.value)
    if _core.cuda_built():
        assert "cudaGetDeviceCount" in ei.value.detail or "cudaDriverGetVersion" in ei.value.detail


def test_bad_argument_types():
    with pytest.raises(TypeError):
        _core.cuda_device_info("zero")
    with pytest.raises(TypeError):
        threadloom.topology(42)
    with pytest.raises(TypeError):
        _core.topology(os.path.join(TOPOLOGIES, "nvidiaDGX2.xml"), "pack:1", "extra")


# -- errors made in one place: _core.make_error, for C and Python alike ------------------------

def test_make_error_builds_what_the_c_layer_raises():
    made = _core.make_error(CODE[threadloom.NoSpaceError], "what failed")
    with pytest.raises(threadloom.NoSpaceError) as ei:
        _core._raise_error(CODE[threadloom.NoSpaceError], "what failed")
    raised = ei.value
    assert type(made) is type(raised) and str(made) == str(raised)
    assert (made.code, made.name, made.hint, made.detail) == \
        (raised.code, raised.name, raised.hint, raised.detail)
    # threadloom.errors by name, with or without TL_
    e = threadloom.errors.error("ENOSPC", "what failed")
    assert str(e) == str(made) and threadloom.errors.error("TL_ENOSPC", "what failed").code == e.code


def test_make_error_with_its_own_message_hint_and_class():
    class Narrow(threadloom.InputOutputError):
        pass

    e = threadloom.errors.error("EIO", "shard 3", what="checkpoint failed verification",
                                hint="load an older one", cls=Narrow)
    assert type(e) is Narrow and isinstance(e, threadloom.InputOutputError)
    assert str(e) == ("TL_EIO: checkpoint failed verification (shard 3). What to do: load an "
                      "older one.")
    assert (e.name, e.detail, e.hint) == ("TL_EIO", "shard 3", "load an older one")
    assert "What to do: " + e.hint in str(e)
    assert str(threadloom.errors.error("EIO")).startswith("TL_EIO: input/output error. What to do")
    with pytest.raises(TypeError, match="cls must be InputOutputError or a subclass"):
        threadloom.errors.error("EIO", cls=threadloom.NoSpaceError)
    with pytest.raises(TypeError, match="cls must be"):
        threadloom.errors.error("EIO", cls=42)


def test_errno_is_translated_as_the_c_layer_translates_it():
    import errno
    want = {errno.ENOSPC: threadloom.NoSpaceError, errno.EDQUOT: threadloom.NoSpaceError,
            errno.EACCES: threadloom.AccessDeniedError, errno.EPERM: threadloom.NotPermittedError,
            errno.EROFS: threadloom.ReadOnlyFilesystemError, errno.ENOENT: threadloom.NotFoundError,
            errno.EIO: threadloom.InputOutputError, errno.EINVAL: threadloom.InvalidArgumentError,
            errno.EEXIST: threadloom.InputOutputError, -1: threadloom.InputOutputError}
    for e, cls in want.items():
        assert _core.errno_code(e) == CODE[cls], (e, cls)
        made = threadloom.errors.from_errno(e, "writing x")
        assert type(made) is cls and made.detail == "writing x"
