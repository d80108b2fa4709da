"""Files that are either entirely written or not there at all.

:func:`atomic_write` writes into a temporary file beside the target, flushes it, ``fsync``s it,
renames it over the target (``os.replace``, atomic on POSIX) and ``fsync``s the folder, so that a
process killed at any point leaves either the previous file or the new one, never a prefix of it.

The temporary file is named ``<target>.tmp.dk_detectron2.<host>.<pid>`` (:func:`temporary_path`):
unmistakably this package's, and carrying the host name, because a process id means something
only on its own machine (a folder shared by several machines, or containers with their own
process ids, holds writers whose ids this process cannot check). A write removes the temporary
files that killed writers left in its folder (any target) only when they are this package's, of
this host, and of a process id that no longer runs here (:func:`remove_stale_temporaries`);
another host's, or a user's file that merely ends in ``.tmp.<digits>``, is never touched.
"""
import glob
import os
import re
import socket
from typing import BinaryIO, Callable, List, Optional, Tuple

__all__ = ["atomic_write", "remove_stale_temporaries", "temporary_path"]

_MARK = ".tmp.dk_detectron2."
# <target>.tmp.dk_detectron2.<host>.<pid>: the host may hold dots, the process id is last
_TEMPORARY = re.compile(re.escape(_MARK) + r"(?P<host>[A-Za-z0-9._-]+)\.(?P<pid>\d+)$")


def _host() -> str:
    """This machine's name as temporary files carry it (characters outside [A-Za-z0-9._-] as
    ``_``, so that the name stays one file name)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown-host"


def temporary_path(path: str) -> str:
    """The temporary file of this process's :func:`atomic_write` of ``path``:
    ``<path>.tmp.dk_detectron2.<host>.<pid>``."""
    return f"{path}{_MARK}{_host()}.{os.getpid()}"


def _parse_temporary(path: str) -> Optional[Tuple[str, int]]:
    """(host, pid) of one of :func:`temporary_path`'s names, None for any other file."""
    match = _TEMPORARY.search(os.path.basename(path))
    return None if match is None else (match.group("host"), int(match.group("pid")))


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without folder descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str) -> List[str]:
    """Removes the temporary files of :func:`atomic_write` in ``folder`` that this host's killed
    writers left: named by :func:`temporary_path`, with this host's name and a process id that
    no longer runs (and is not this process). Returns their paths. Live writers' files, other
    hosts' files and files of any other name stay."""
    removed, host = [], _host()
    for candidate in glob.glob(os.path.join(glob.escape(folder), f"*{_MARK}*")):
        parsed = _parse_temporary(candidate)
        if parsed is None or parsed[0] != host:
            continue
        pid = parsed[1]
        if pid == os.getpid() or _running(pid):
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
    temporary = temporary_path(path)
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
