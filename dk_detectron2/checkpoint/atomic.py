"""Files that are either entirely written or not there at all.

:func:`atomic_write` writes into a temporary file beside the target (``<name>.tmp.<pid>``),
flushes it, ``fsync``s it, renames it over the target (``os.replace``, atomic on POSIX) and
``fsync``s the folder, so that a process killed at any point leaves either the previous file or
the new one, never a prefix of it. Temporary files left in the folder by killed processes (any
target; the process id in the name no longer runs) are removed by the next write into it.
"""
import glob
import os
import re
from typing import BinaryIO, Callable, List

__all__ = ["atomic_write", "remove_stale_temporaries"]


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without folder descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"\.tmp\.(\d+)$")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str) -> List[str]:
    """Removes ``*.tmp.<pid>`` files of :func:`atomic_write` in ``folder`` whose process no
    longer runs (a writer killed mid-write); returns their paths. Files of live writers stay."""
    removed = []
    for candidate in glob.glob(os.path.join(glob.escape(folder), "*.tmp.*")):
        match = _TEMPORARY.search(candidate)
        if match is None or int(match.group(1)) == os.getpid() or _running(int(match.group(1))):
            continue
        try:
            os.remove(candidate)
            removed.append(candidate)
        except OSError:
            pass
    return removed


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(f)`` on a binary file that becomes ``path`` only once complete and on disk.

    Args:
        path: the target file on the local file system; its folder must exist.
        write: writes the whole content into the open binary file it is given.
    """
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder)
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
