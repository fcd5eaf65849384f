"""The file-system calls a save makes: the one table tests inject faults through."""

import os
import shutil

from threadloom import _core


class FileOps:
    """The file-system calls of a save. Subclass and pass ``Checkpointer(..., file_ops=...)`` to
    inject faults (ENOSPC after N bytes, EACCES on open, ...) through the path the real writes
    take. Methods raise OSError like the os functions they wrap; any thread may call them.

    A file handle is what open() returned: a threadloom._core.WFile in the save's io mode
    ("buffered": pwrite through the page cache; "direct" and "uring": O_DIRECT writes of the
    aligned part of each range, the rest through the page cache, falling back to buffered by
    itself where the file system refuses O_DIRECT; its stats() say which). The files are
    created (O_EXCL, 0644) and written detached from the interpreter, whatever the mode."""

    def mkdir(self, path):
        os.mkdir(path, 0o755)

    def open(self, path, io="buffered"):
        return _core.WFile(path, io)

    def pwrite(self, fd, data, offset):
        fd.write(data, offset)  # all of it, detached, retrying short writes

    def fsync(self, fd):
        fd.sync()

    def close(self, fd):
        fd.close()

    def fsync_dir(self, path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src, dst):
        os.rename(src, dst)

    def remove_tree(self, path):
        shutil.rmtree(path, ignore_errors=True)

    def remove_file(self, path):
        """Removes the file `path` if it exists."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def write_file(self, path, data):
        """Creates `path` with `data`, fsynced (not the directory)."""
        fd = self.open(path)
        try:
            self.pwrite(fd, data, 0)
            self.fsync(fd)
        finally:
            self.close(fd)
