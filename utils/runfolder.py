"""One run per folder: the lock on OUT, the check that a fresh run finds no other run there, and the clean-up of
temporary files that a killed run left behind.

The lock is an OS file lock (``fcntl.flock``) on OUT/.lock, taken before anything is written and held for the
life of the run. The operating system drops it when the process ends in any way (SIGKILL, a node that reboots
its job), so a stale lock never blocks a requeue and there is no pid file to clean by hand; the file records
the holder's host and pid only to name it in the refusal. Under DDP rank 0 holds it, and the other processes
learn of a refusal through a collective. A file system without locks (some parallel file systems are mounted
so) gets a warning and no lock.

Only the files a run writes count as "a run" (config*.json, metrics.jsonl, and samples/, checkpoints/ or wandb/
with files in them): a Slurm log or notes written into OUT beforehand do not.
"""

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
RUN_FILES = ("config.json", "metrics.jsonl")
RUN_FILE_PATTERNS = ("config-resume-*.json",)
RUN_FOLDERS = ("checkpoints", "samples", "wandb")  # a run's when they hold any file
# What utils.io.atomic_write leaves when killed mid-write (".NAME.RANDOM.tmp") and the hard link that points
# last.pt at a numbered checkpoint (".last.pt.PID.link"), in the folders train.py writes.
TEMPORARY = re.compile(r"\..+\.tmp|\.last\.pt\.\d+\.link")
TEMPORARY_FOLDERS = (".", "checkpoints", "samples")

_held_fds: set[int] = set()


def _close_in_child() -> None:
    """A forked child (a data-loader worker) must not keep the lock alive after its parent is killed."""
    for fd in _held_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunFolderError(ConfigError):
    """The run folder is in use by another process, or holds a run that a fresh run would overwrite."""


class FolderLock:
    """An exclusive lock on ``out``/.lock, held until ``release`` (or the end of the process).

    RunFolderError when another process holds it, naming that process. Folders it had to create are removed
    again on release if they are still empty (a run refused at set-up leaves nothing behind)."""

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
    """Delete the temporary files of killed writes in the run folder (call it holding the lock: no live writer
    can own them then); prints one line when there were any. Returns the deleted paths."""
    removed, size = [], 0
    for sub in TEMPORARY_FOLDERS:
        folder = out / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if TEMPORARY.fullmatch(path.name) and path.is_file():
                size += path.stat().st_size
                path.unlink()
                removed.append(path)
    if removed:
        names = ", ".join(str(p.relative_to(out)) for p in removed)
        print(
            f"removed {len(removed)} temporary file(s) of writes that a killed run left ({size / 2**20:.1f} MiB): "
            f"{names}",
            flush=True,
        )
    return removed


def run_files(out: Path) -> list[str]:
    """The files and folders in out that belong to a run (empty when out holds no run), as names for a message."""
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += sorted(p.name for pattern in RUN_FILE_PATTERNS for p in out.glob(pattern))
    found += [f"{name}/" for name in RUN_FOLDERS if (out / name).is_dir() and any((out / name).rglob("*"))]
    return found


def check_holds_no_run(out: Path, why: str) -> None:
    """RunFolderError unless out holds no run: a fresh run (or one continuing another folder's checkpoint) would
    overwrite its files. ``why`` ends the message: what the user can do instead."""
    if found := run_files(out):
        raise RunFolderError(f"{out} already holds a run ({', '.join(found)}); {why}")


@contextlib.contextmanager
def hold_run_folder(out: Path, is_main: bool) -> Iterator[FolderLock | None]:
    """Lock out for the block (rank 0) and clean its stale temporary files; every process takes part, and all of
    them raise when rank 0 is refused (RunFolderError there, PeerError on the others)."""
    lock, error = None, None
    if is_main:
        try:
            lock = FolderLock(out)
            remove_stale_temporaries(out)
        except (RunFolderError, OSError) as e:
            error = e
    if not all_ok(error is None):
        if lock is not None:
            lock.release()
        raise error or PeerError(f"rank 0 could not take the run folder {out}")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def outside(path: Path, out: Path) -> bool:
    """Whether a checkpoint lies outside the run folder out: continuing from it starts a new run there."""
    return not path.resolve().is_relative_to(out.resolve())


def resume_state(out: Path, resume: str) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to continue from and its path (--resume, --resume auto when last.pt exists, --resume PATH),
    or (None, None) for a fresh run, which must find no run in OUT (nor must a PATH from another folder). A missing
    or unreadable last.pt names the newest readable numbered checkpoint instead of switching to it unasked."""
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
