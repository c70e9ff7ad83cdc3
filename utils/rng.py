"""Seeding, and capturing and restoring every global generator a run draws from, so a resumed run is bit-identical.
The state holds only tensors and plain values: it loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

STEP_SEED_STRIDE = 1_000_003  # a prime, so (seed, rank, step) triples of a run give different seeds


def training_seed(seed: int, rank: int, step: int) -> int:
    """The seed of process ``rank`` starting at ``step`` without states to restore (fresh, or another world size)."""
    return seed + rank + STEP_SEED_STRIDE * step


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """This process's generator states: "torch", "numpy", "python", and "cuda" when device is a GPU."""
    device = torch.device(device)
    s = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    key = torch.from_numpy(np.asarray(s["state"]["key"], dtype=np.int64))  # (624,) uint32 values
    gauss = {"has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}
    numpy_state = {"bit_generator": str(s["bit_generator"]), "key": key, "pos": int(s["state"]["pos"]), **gauss}
    version, internal, gauss_next = random.getstate()  # (3, 625 ints, None or float)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": [version, list(internal), gauss_next]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu", cuda_seed: int = 0) -> None:
    """Restore ``rng_state()``; a CUDA generator the state lacks (saved by a CPU run) is seeded with cuda_seed."""
    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    key = np.asarray(s["key"].numpy() if isinstance(s["key"], torch.Tensor) else s["key"]).astype(np.uint32)
    gauss = {"has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}
    np.random.set_state({"bit_generator": s["bit_generator"], "state": {"key": key, "pos": int(s["pos"])}, **gauss})
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    if device.type == "cuda":
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            torch.cuda.manual_seed(cuda_seed)


@contextlib.contextmanager
def isolated_rng(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block, then put every global generator back as it was, even when the block raises."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)
