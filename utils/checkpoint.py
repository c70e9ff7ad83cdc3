"""Checkpoints: the one module that writes and reads them (train.py, sampler.py, evaluate.py and the tests).

A training checkpoint is a dict of tensors and plain values:
    "model_config"     the DiT constructor arguments (``model.config``): DiT(**model_config) rebuilds the network
    "model"            the raw weights (a state dict)
    "ema"              the EMA weights (a state dict of the same network)
    "ema_num_updates"  EMA updates applied so far (int; sets the EMA warm-up)
    "optimizer"        the AdamW state dict
    "step"             optimizer steps taken (int)
    "skipped_steps"    steps whose update was skipped for a non-finite loss (int)
    "config"           the resolved run config (dict, as in OUT/config.json)
    "rng"              one ``utils.rng.rng_state`` per process, indexed by rank
    "data_state"       the data stream's position, {"epoch", "index", "num_samples"} (data.loader.BatchStream)
    "world_size"       how many processes wrote it
    "wandb_id"         the wandb run to continue (str or None)
Only "model_config" and "model" are needed to sample; a resume needs them all.

Loading is safe: ``torch.load(weights_only=True)``, so a file that holds pickled python objects (which could
run code when unpickled) is refused with a CheckpointError.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
import torch.nn as nn

from models import DiT, model_from_config
from utils.config import ConfigError
from utils.device import unwrap_model
from utils.io import atomic_write

TRAINING_KEYS = ("model_config", "model", "ema", "ema_num_updates", "optimizer", "step", "skipped_steps", "config",
                 "rng", "data_state", "world_size", "wandb_id")  # fmt: skip
# Settings a resumed run must share with its checkpoint: they define the weights and the data stream.
RESUME_MUST_MATCH = ("dataset", "image_size", "channels", "flip", "batch_size", "seed", "objective")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a checkpoint of this project."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write state to path atomically: a process killed while writing leaves the previous file intact.

    A write that fails (a full disk) raises its OSError naming path, not the RuntimeError torch's zip writer turns
    it into ("[enforce fail at inline_container.cc] unexpected pos"), which says neither what nor where."""

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
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a file of tensors and plain values ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or not {"model_config", "model"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project (needs keys model_config, model)")
    return state


def model_from_checkpoint(state: dict[str, Any] | str | os.PathLike, ema: bool = True,
                          device: str | torch.device = "cpu") -> DiT:  # fmt: skip
    """The DiT a checkpoint describes, with its EMA (default) or raw weights, in eval mode on device."""
    state = state if isinstance(state, dict) else load_checkpoint(state)
    if ema and state.get("ema") is None:
        raise CheckpointError("checkpoint holds no EMA weights; load the raw weights with ema=False")
    model = model_from_config(state["model_config"])
    try:
        model.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model config: {e}") from None
    return model.to(device).eval()


#################################################################################
#                          Training state: save and resume                      #
#################################################################################


def training_state(*, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer, stream: Any, step: int,
                   skipped_steps: int, config: dict[str, Any], rng: list[dict[str, Any]], world_size: int,
                   wandb_id: str | None) -> dict[str, Any]:  # fmt: skip
    """The checkpoint dict of a training run (the keys of the module docstring)."""
    model = unwrap_model(model)
    return {
        "model_config": model.config, "model": model.state_dict(), "ema": ema.model.state_dict(),
        "ema_num_updates": ema.num_updates, "optimizer": optimizer.state_dict(), "step": step,
        "skipped_steps": skipped_steps, "config": config, "rng": rng, "data_state": stream.state_dict(),
        "world_size": world_size, "wandb_id": wandb_id,
    }  # fmt: skip


def check_resume(state: dict[str, Any], config: dict[str, Any], model_config: dict[str, Any]) -> None:
    """CheckpointError unless state is a full training state; ConfigError unless it fits this run's settings."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"--resume: the checkpoint holds weights only, not a training state (no {missing[0]})")
    if state["model_config"] != model_config:
        raise ConfigError(f"--resume: the checkpoint's model {state['model_config']} differs from {model_config}")
    old = state["config"]
    bad = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {config.get(k)!r}" for k in RESUME_MUST_MATCH
           if old.get(k, config.get(k)) != config.get(k)]  # fmt: skip
    if bad:
        raise ConfigError(f"--resume: these settings differ from the checkpoint's: {'; '.join(bad)}")


class Resumed(NamedTuple):
    """What a resumed run continues from, besides the objects ``restore_training_state`` filled in."""

    step: int
    skipped_steps: int
    wandb_id: str | None
    rng: dict[str, Any] | None  # this process's generator states; None when the number of processes changed


def restore_training_state(state: dict[str, Any], *, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer,
                           stream: Any, rank: int, world_size: int) -> Resumed:  # fmt: skip
    """Load a checkpoint's weights, EMA, optimizer and data position into the run's objects.

    With another number of processes the epoch's split over them changes: the data stream starts the next epoch,
    and the generators are reseeded (``rng`` None)."""
    unwrap_model(model).load_state_dict(state["model"])
    ema.model.load_state_dict(state["ema"])
    ema.updates.fill_(state["ema_num_updates"])
    optimizer.load_state_dict(state["optimizer"])
    same_split = state["world_size"] == world_size
    data = state["data_state"]
    stream.load_state_dict(data if same_split else {"epoch": data["epoch"] + 1, "index": 0})
    rng = state["rng"][rank] if same_split else None
    return Resumed(state["step"], state["skipped_steps"], state["wandb_id"], rng)


NUMBERED = re.compile(r"(\d{7,})\.pt")  # f"{step:07d}.pt"


def save_training_checkpoint(state: dict[str, Any], ckpt_dir: Path, keep: int) -> Path:
    """Write ckpt_dir/STEP.pt, point ckpt_dir/last.pt at it (a hard link renamed into place: atomic, no copy) and
    delete the numbered files beyond the ``keep`` newest (0 keeps all). Returns last.pt's path."""
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
    """Delete numbered checkpoints of steps <= step except the ``keep`` newest; returns the deleted paths.

    keep=0 keeps all. Never deleted: the file last.pt is a hard link to (whatever its step), and files of later
    steps (left by a run rolled back to an earlier last.pt: not this run's to judge).
    """
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
