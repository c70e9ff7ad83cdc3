"""Checkpoints: atomic saving, safe loading on any device, and rebuilding a DiT from one.

A training checkpoint is a dict with at least:
    "model_config": the DiT constructor arguments (``model.config``),
    "model": the raw weights, "ema": the EMA weights (optional),
    "step": the number of optimizer steps taken, "config": the resolved run config (a dict).
train.py adds "optimizer", "rng", "data_state" and "ema_num_updates" (``utils.ema.EMA.state_dict`` owns
the "ema" / "ema_num_updates" pair) for exact resume. This module is the one place that writes and reads
that format; train.py, sampler.py, evaluate.py and the tests all go through it.

Loading is safe: ``torch.load(weights_only=True)`` everywhere, so a file that holds pickled python objects
(which could run code when unpickled) is refused with a CheckpointError. Checkpoints therefore hold only
tensors and plain python values; ``utils/rng.py`` stores the generator states that way.

Format versions (``"format_version"`` in every file; a file newer than this code is refused):
    1: RNG states pickled as numpy arrays and tuples (refused by the safe loader).
    2: RNG states as tensors and lists; loadable with weights_only=True.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.dit import DiT
from utils.io import atomic_write

FORMAT_VERSION = 2
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
    """Write state to path atomically (``utils.io.atomic_write``), with this code's format version.

    A process killed while writing leaves the previous file at path intact.
    """
    state = {"format_version": FORMAT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, whatever device saved it; CheckpointError if it is not one.

    weights_only=True: a file holding pickled python objects is refused, never unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # a well-formed pickle with objects the safe loader will not build
            raise CheckpointError(
                f"refusing to load {path}: it holds a pickled python object ({found.group(1)}) that could run code "
                "when loaded; checkpoints of this project hold only tensors and plain values"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))  # skip torch's advice to unpickle
        detail = detail.group(1) if detail else _first_line(e)
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid checkpoint file ({detail})") from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project (needs keys {', '.join(REQUIRED_KEYS)})")
    version = state.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}, newer than this code reads ({FORMAT_VERSION}); "
            "update the code"
        )
    return state


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else ""


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
