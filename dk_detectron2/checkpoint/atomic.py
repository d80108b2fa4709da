"""Files that are either entirely written or not there at all.

:func:`atomic_write` writes into a temporary file beside the target (``<name>.tmp.<pid>``),
flushes it, ``fsync``s it, renames it over the target (``os.replace``, atomic on POSIX) and
``fsync``s the folder, so that a process killed at any point leaves either the previous file or
the new one, never a prefix of it. A temporary file left by a killed process is removed by the
next write of the same target.
"""
import glob
import os
from typing import BinaryIO, Callable

__all__ = ["atomic_write"]


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without folder descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(f)`` on a binary file that becomes ``path`` only once complete and on disk.

    Args:
        path: the target file on the local file system; its folder must exist.
        write: writes the whole content into the open binary file it is given.
    """
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):  # left by a killed writer
        try:
            os.remove(stale)
        except OSError:
            pass
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_folder(folder)
