"""Checkpoints: atomic saving, safe loading on any device, and rebuilding a DiT from one.

A training checkpoint is a dict with at least:
    "model_config": the DiT constructor arguments (``model.config``),
    "model": the raw weights, "ema": the EMA weights (optional),
    "step": the number of optimizer steps taken, "config": the resolved run config (a dict).
train.py adds "optimizer", "rng" and "data_state" for exact resume. This module is the one place that
writes and reads that format; train.py, sampler.py, evaluate.py and the tests all go through it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.dit import DiT

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_config", "model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a checkpoint of this project."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        else:
            return model


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write state to path atomically: a temporary file in the same folder, then a rename.

    A process killed while writing leaves the previous file at path intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, whatever device saved it; CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: checkpoints hold numpy RNG states and plain config dicts as well.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project (needs keys {', '.join(REQUIRED_KEYS)})")
    return state


def model_from_checkpoint(
    checkpoint: dict[str, Any] | str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
) -> DiT:
    """Build the DiT described by a checkpoint and load its EMA (default) or raw weights, in eval mode."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    model = DiT(**state["model_config"])
    key = "ema" if ema and state.get("ema") is not None else "model"
    if ema and key != "ema":
        raise CheckpointError("checkpoint holds no EMA weights; load the raw weights with ema=False")
    try:
        model.load_state_dict(state[key])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model config: {e}") from None
    return model.to(device).eval()
