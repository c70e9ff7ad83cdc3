"""Seeding and the capture / restore of every global random generator a training run draws from.

A training step draws its noise, times and label dropout from torch's global generators (CPU, and the
current CUDA device), OT pairing from numpy's and anything else from python's. Checkpointing all four
(plus the data stream's position) makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and python."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """This process's generator states: torch CPU, numpy, python, and CUDA when device is a GPU."""
    device = torch.device(device)
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu", cuda_seed: int = 0) -> None:
    """Restore ``rng_state()``; a CUDA generator the state lacks (saved by a CPU run) is seeded with cuda_seed."""
    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda":
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            torch.cuda.manual_seed(cuda_seed)
