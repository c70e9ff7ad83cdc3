"""Checkpoint files: written atomically, read with ``weights_only=True`` (pickled code is refused), damage said in
words. What a training checkpoint holds is built and restored in training/resume.py."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from utils.io import atomic_write

# The keys of a full training state, what --resume needs (training/resume.py builds it).
TRAINING_KEYS = ("model_config", "model", "ema", "ema_num_updates", "optimizer", "step", "skipped_steps", "config")
TRAINING_KEYS += ("rng", "data_state", "world_size", "wandb_id")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a checkpoint of this project."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write state to path atomically; a failed write raises its OSError naming path, not torch's zip-writer error."""

    def write(f: BinaryIO) -> None:
        out = _WriteErrors(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None

    atomic_write(path, write)


class _WriteErrors:
    """A binary file that remembers the OSError of a failed write (torch.save's writer swallows it)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, whatever device saved it; CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or holding pickled objects the safe loader refuses to build
        raise CheckpointError(f"cannot read checkpoint {path}: {damage(path, e)}") from None
    if not isinstance(state, dict) or not {"model_config", "model"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project (needs keys model_config, model)")
    return state


def damage(path: Path, error: Exception) -> str:
    """What is wrong with a checkpoint file that torch.load refused, in words (torch's does not say "cut short")."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        return "the file is empty (0 bytes)"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # torch.save writes a zip; its index is at the end
        return f"the file is truncated ({size} bytes, the end of the archive is missing)"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return "not a file of tensors and plain values (it holds pickled objects, which are never loaded)"
    return f"not a file of tensors and plain values, or damaged ({type(error).__name__}, {size} bytes)"


NUMBERED = re.compile(r"(\d{7,})\.pt")  # f"{step:07d}.pt"


def newest_readable(ckpt_dir: Path) -> tuple[Path, int] | None:
    """(path, step) of the newest numbered checkpoint that loads as a full training state, or None."""
    numbered = sorted(
        ((int(m.group(1)), p) for p in ckpt_dir.glob("*.pt") if (m := NUMBERED.fullmatch(p.name))), reverse=True
    )
    for _, path in numbered:
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            continue
        if all(k in state for k in TRAINING_KEYS):
            return path, int(state["step"])
    return None


def save_training_checkpoint(state: dict[str, Any], ckpt_dir: Path, keep: int) -> Path:
    """Write ckpt_dir/STEP.pt, hard-link last.pt to it atomically and prune to ``keep``; returns last.pt's path."""
    numbered, last = ckpt_dir / f"{state['step']:07d}.pt", ckpt_dir / "last.pt"
    save_checkpoint(state, numbered)
    tmp = ckpt_dir / f".last.pt.{os.getpid()}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(numbered, tmp)
        os.replace(tmp, last)
    except OSError:  # a file system without hard links: a second copy, written atomically as well
        save_checkpoint(state, last)
    prune_checkpoints(ckpt_dir, keep, state["step"])
    return last


def prune_checkpoints(ckpt_dir: Path, keep: int, step: int) -> list[Path]:
    """Delete numbered checkpoints of steps <= step but the ``keep`` newest (0: none) and last.pt's; returns them."""
    if keep <= 0:
        return []
    last = ckpt_dir / "last.pt"
    numbered = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := NUMBERED.fullmatch(p.name)))
    removed = []
    for _, path in [(n, p) for n, p in numbered if n <= step][:-keep]:
        if last.exists() and os.path.samefile(path, last):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
