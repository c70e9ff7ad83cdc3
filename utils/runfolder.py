"""One run per folder: the lock on OUT (``fcntl.flock``, dropped by the OS however the process ends), the check that a
fresh run finds no other run there, and the clean-up of what killed writes left (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.checkpoint import CheckpointError, load_checkpoint, newest_readable
from utils.config import ConfigError
from utils.distributed import PeerError, all_ok
from utils.runlog import warn

LOCK_NAME = ".lock"
LAST_CHECKPOINT = Path("checkpoints", "last.pt")  # what --resume continues from, relative to OUT
RUN_FILES = ("config.json", "metrics.jsonl", "config-resume-*.json")  # glob patterns
RUN_FOLDERS = ("checkpoints", "samples", "wandb")  # a run's when they hold any file
# What a killed utils.io.atomic_write and last.pt's hard-linking leave in the folders train.py writes.
TEMPORARY = re.compile(r"\..+\.tmp|\.last\.pt\.\d+\.link")
TEMPORARY_FOLDERS = (".", "checkpoints", "samples")

_held_fds: set[int] = set()


def _close_in_child() -> None:
    """A forked child (a loader worker) must not keep the lock alive after its parent is killed."""
    for fd in _held_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunFolderError(ConfigError):
    """The run folder is in use by another process, or holds a run that a fresh run would overwrite."""


class FolderLock:
    """An exclusive lock on ``out``/.lock until ``release``; RunFolderError naming the holder's host and pid."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / LOCK_NAME
        self.created = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunFolderError(
                    f"{out} is in use by {holder} (it holds {self.path}); wait for that run to "
                    "end, or choose another --out"
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                warn(f"cannot lock {self.path} ({e.strerror}): a second run on {out} would not be refused")
                return
            try:  # the holder may have removed the file between our open and our lock: lock the file now there
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        _held_fds.add(self.fd)
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        except BaseException:  # e.g. a full disk: let go of the lock here, as no caller holds this object yet
            self.release()
            raise

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks a file about to vanish) and unlock."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            _held_fds.discard(self.fd)
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # deepest first; only those still empty
            with contextlib.suppress(OSError):
                folder.rmdir()


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files of killed writes (holding the lock: no live writer owns them); returns them."""
    folders = [out / sub for sub in TEMPORARY_FOLDERS if (out / sub).is_dir()]
    removed = [p for folder in folders for p in sorted(folder.iterdir()) if TEMPORARY.fullmatch(p.name) and p.is_file()]
    size = sum(p.stat().st_size for p in removed)
    for path in removed:
        path.unlink()
    if removed:
        names, mib = ", ".join(str(p.relative_to(out)) for p in removed), f"{size / 2**20:.1f} MiB"
        print(f"removed {len(removed)} temporary file(s) of writes that a killed run left ({mib}): {names}", flush=True)
    return removed


def run_files(out: Path) -> list[str]:
    """The names of the files and folders in out that belong to a run."""
    if not out.is_dir():
        return []
    found = [p.name for pattern in RUN_FILES for p in sorted(out.glob(pattern))]
    found += [f"{name}/" for name in RUN_FOLDERS if (out / name).is_dir() and any((out / name).rglob("*"))]
    return found


def check_holds_no_run(out: Path, why: str) -> None:
    """RunFolderError ending in ``why`` when out holds a run, which a fresh run would overwrite."""
    if found := run_files(out):
        raise RunFolderError(f"{out} already holds a run ({', '.join(found)}); {why}")


@contextlib.contextmanager
def hold_run_folder(out: Path, is_main: bool) -> Iterator[FolderLock | None]:
    """Lock out for the block on rank 0 and clean its stale temporaries; when rank 0 is refused every process raises."""
    lock, error = None, None
    if is_main:
        try:
            lock = FolderLock(out)
            remove_stale_temporaries(out)
        except (RunFolderError, OSError) as e:
            error = e
    try:
        if not all_ok(error is None):
            raise error or PeerError(f"rank 0 could not take the run folder {out}")
        yield lock
    finally:
        if lock is not None:
            lock.release()


def outside(path: Path, out: Path) -> bool:
    """Whether a checkpoint lies outside the run folder out: continuing from it starts a new run there."""
    return not path.resolve().is_relative_to(out.resolve())


def resume_state(out: Path, resume: str) -> tuple[dict[str, Any] | None, Path | None]:
    """(checkpoint, path) --resume continues from, or (None, None) for a fresh run, which must find no run in out."""
    last = out / LAST_CHECKPOINT
    if resume in ("no", "yes", "auto"):
        path = last if resume == "yes" or (resume == "auto" and last.is_file()) else None
    else:
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file")
    if path is None and any(last.parent.glob("*.pt")):
        check_holds_no_run(out, "pass --resume to continue it, or choose another --out")
    elif path is None:  # e.g. its checkpoints deleted to save space: the logs are still its
        check_holds_no_run(out, "it has no checkpoint to continue from: choose another --out, or move those away")
    elif outside(path, out):
        check_holds_no_run(out, f"--resume {path} continues into a folder that holds no run: choose another --out")
    if path is None:
        return None, None
    try:
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        return load_checkpoint(path), path
    except CheckpointError as e:
        if path.resolve() != last.resolve():
            raise
        found = newest_readable(last.parent) if last.parent.is_dir() else None
        hint = (
            f"the newest readable checkpoint is {found[0]} (step {found[1]}): continue from it with the same "
            f"command and --resume {found[0]}"
            if found
            else f"no readable numbered checkpoint in {last.parent}"
        )
        raise CheckpointError(f"{e}; {hint}") from None
