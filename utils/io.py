"""Atomic file writes: the one helper that checkpoints, cached FID statistics and JSON records go through.

A writer fills a temporary file in the target's own folder (same file system, so the rename is atomic),
flushes and fsyncs it, then ``os.replace`` puts it in place. A process killed at any point leaves either
the previous file or the complete new one at the path, never half a file, and an error removes the
temporary file. An OSError that names no file (a write, flush or fsync on a full disk: "[Errno 28] No space
left on device") is raised again naming the target, so the one line a script prints says which file failed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_UMASK: int | None = None


def _file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask); mkstemp alone gives 0o600."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)  # the only way to read the umask is to set it: put it straight back
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically: ``write(f)`` fills a binary temporary file that then replaces path.

    The parent folder is created if missing. Returns path as a Path. Any error in ``write`` (or a
    KeyboardInterrupt) removes the temporary file and leaves an existing file at path untouched.
    """
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
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write obj as indented JSON (with a final newline) atomically to path; returns path as a Path."""
    text = json.dumps(obj, indent=2) + "\n"  # serialise first: an unserialisable obj creates no file
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
