"""Seeding and the capture / restore of every global random generator a training run draws from.

A training step draws its noise, times and label dropout from torch's global generators (CPU, and the
current CUDA device), OT pairing from numpy's and anything else from python's. Checkpointing all four
(plus the data stream's position) makes a resumed run bit-identical to an uninterrupted one, and
``isolated_rng`` keeps work done beside training (samples, FID) from moving any of them.

The captured state holds only tensors and plain python values (dict, list, int, float, str, None), so a
checkpoint that stores it loads with ``torch.load(weights_only=True)``: numpy's MT19937 key becomes an
int64 tensor and python's state tuple a list; ``set_rng_state`` converts them back.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

STEP_SEED_STRIDE = 1_000_003  # a prime, so (seed, rank, step) triples of a run give different seeds


def training_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the training randomness of process ``rank`` starting at ``step`` (fresh runs: step 0), where a
    run has no generator states to restore (a fresh run, or a resume on another number of processes)."""
    return seed + rank + STEP_SEED_STRIDE * step


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and python."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _numpy_state() -> dict[str, Any]:
    s = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    return {
        "bit_generator": str(s["bit_generator"]),
        "key": torch.from_numpy(np.asarray(s["state"]["key"], dtype=np.int64)),  # (624,) uint32 values
        "pos": int(s["state"]["pos"]),
        "has_gauss": int(s["has_gauss"]),
        "gauss": float(s["gauss"]),
    }


def _set_numpy_state(s: dict[str, Any]) -> None:
    key = np.asarray(s["key"].numpy() if isinstance(s["key"], torch.Tensor) else s["key"]).astype(np.uint32)
    np.random.set_state(
        {
            "bit_generator": s["bit_generator"],
            "state": {"key": key, "pos": int(s["pos"])},
            "has_gauss": int(s["has_gauss"]),
            "gauss": float(s["gauss"]),
        }
    )


def _python_state() -> list[Any]:
    version, internal, gauss_next = random.getstate()  # (3, 625 ints, None or float)
    return [version, list(internal), gauss_next]


def _set_python_state(s: list[Any]) -> None:
    version, internal, gauss_next = s
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """This process's generator states as tensors and plain python values (safe for weights_only loading).

    Keys: "torch" (uint8 tensor), "numpy" (dict, key an int64 tensor (624,)), "python" (list), and "cuda"
    (uint8 tensor) when device is a GPU.
    """
    device = torch.device(device)
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu", cuda_seed: int = 0) -> None:
    """Restore ``rng_state()``; a CUDA generator the state lacks (saved by a CPU run) is seeded with cuda_seed."""
    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    _set_python_state(state["python"])
    if device.type == "cuda":
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            torch.cuda.manual_seed(cuda_seed)


@contextlib.contextmanager
def isolated_rng(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block, then put every global generator back as it was before it, even when the block raises.

    Whatever the block draws (torch CPU and device, numpy, python) leaves no trace in the training randomness.
    """
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)
