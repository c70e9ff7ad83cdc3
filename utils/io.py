"""Atomic file writes: a process killed at any point leaves the previous file or the complete new one."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


@functools.cache
def _file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask); mkstemp alone gives 0o600."""
    umask = os.umask(0)  # the only way to read the umask is to set it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """``write(f)`` fills a fsynced temporary file in path's folder that then replaces path; on any error path is left
    untouched, and an OSError that names no file (a full disk) is raised again naming path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    with contextlib.suppress(OSError):  # the rename itself made durable (POSIX; Windows cannot open folders)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write obj as indented JSON atomically."""
    text = json.dumps(obj, indent=2) + "\n"  # serialise first: an unserialisable obj creates no file
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
