"""Atomic file writes: checkpoints, cached FID statistics and JSON records all go through ``atomic_write``.

A temporary file in the target's folder is filled, fsynced and ``os.replace``d onto the path, so a process killed at
any point leaves the previous file or the complete new one, never half of one.
"""

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
    """``write(f)`` fills a binary temporary file that then replaces path (its folder created if missing). An error
    (or a KeyboardInterrupt) removes the temporary file and leaves path untouched; an OSError that names no file (a
    full disk) is raised again naming path."""
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
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write obj as indented JSON (with a final newline) atomically to path; returns path as a Path."""
    text = json.dumps(obj, indent=2) + "\n"  # serialise first: an unserialisable obj creates no file
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
