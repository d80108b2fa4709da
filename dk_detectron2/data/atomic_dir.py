"""Making a folder of generated files so that no reader ever sees half of it."""
import os
import shutil
import tempfile
from typing import Callable

__all__ = ["build_dir_atomically"]


def build_dir_atomically(target_dir: str, build: Callable[[str], None], ready_file: str) -> None:
    """Calls ``build(path)`` to fill a new folder, then renames it to ``target_dir``.

    The folder is made in a temporary folder beside ``target_dir`` (same filesystem, so the rename
    is atomic). Several processes may call this at once (e.g. the workers of a multi-process run):
    the first rename wins and the others discard their copy. ``ready_file`` (a file ``build``
    writes, inside ``target_dir``) tells a lost race (it exists: fine) from a real error.
    """
    parent = os.path.dirname(os.path.abspath(target_dir))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.normpath(target_dir))
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp.", dir=parent)
    try:
        build(os.path.join(tmp_dir, name))
        try:
            os.rename(os.path.join(tmp_dir, name), target_dir)
        except OSError:
            if not os.path.exists(ready_file):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
