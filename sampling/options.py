"""``SamplingOptions``, ``Samples``, and the seeded noise and labels that make sample i depend only on (seed, i)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from sampling import solvers
from sampling.solvers import ADAPTIVE, GRIDS, METHODS, SOLVERS
from utils.config import Config, ConfigError, arg
from utils.device import PRECISIONS

DEFAULT_METHOD = "heun"  # for a network without a checkpoint (whose objective names its own)

FIXED_GRID = "; ".join(f"{name} {s.nfe_per_step} ({s.about})" for name, s in SOLVERS.items())
METHOD_HELP = (
    "sampling method (default: the sample_method of the checkpoint's objective; heun for a bare network). "
    f"Fixed-grid, NFE = steps x: {FIXED_GRID}; {', '.join(ADAPTIVE)}: adaptive ODE solver (rtol, atol), NFE its own"
)


@dataclass(kw_only=True)
class SamplingOptions(Config):
    """How ``Sampler.generate`` samples, and sampler.py's and evaluate.py's sampling flags; ``method`` None: default."""

    steps: int = arg(50, "steps on the time grid (not dopri5)", min=1, group="sampling")
    method: str | None = arg(None, METHOD_HELP, choices=METHODS)
    grid: str = arg("uniform", "time grid of the fixed-grid methods", choices=GRIDS)
    grid_shift: float = arg(
        3.0, "shift s of --grid shifted: s > 1 puts more steps near the data (t=1); SD3/Flux's shift is 1/s", gt=0
    )
    cfg_scale: float = arg(1.0, "classifier-free guidance scale; 1 disables it")
    guidance_interval: tuple[float, float] = arg(
        (0.0, 1.0),
        "apply guidance only for t in [T_LO, T_HI] (Kynkäänniemi et al. 2024); t=0 noise, t=1 data",
        metavar=("T_LO", "T_HI"),
    )
    guidance_channels: int | None = arg(None, "guide the first K channels only (SiT: 3); default: the network's", min=1)
    sde_diffusion: str = arg("sigma", "sde: w(t) 2 (1 - t) (sigma) or 2 (1 - t) / t", choices=solvers.SDE_DIFFUSIONS)
    sde_norm: float = arg(1.0, "sde: scale of w(t) (0: Euler on the same grid)", min=0.0)
    last_step: str = arg("mean", "sde: noise-free last step along the drift or v", choices=solvers.LAST_STEPS)
    last_step_size: float = arg(0.04, "sde: the last step's size", gt=0.0, lt=1.0)
    rtol: float = arg(1e-5, "dopri5 relative tolerance", gt=0)
    atol: float = arg(1e-5, "dopri5 absolute tolerance", gt=0)
    precision: str = arg(
        "auto",
        "network precision: auto is bf16 autocast on CUDA, fp32 elsewhere; the ODE state stays float32",
        choices=PRECISIONS,
    )
    batch_size: int = arg(256, "samples per forward batch (bounds memory)", min=1)
    max_frames: int = arg(50, "at most this many trajectory frames (GIFs)", min=2)
    decode: bool = arg(True, "latent models: decode samples to images with the checkpoint VAE (--no-decode: latents)")

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got ({lo}, {hi})")


def sampling_options(cfg: SamplingOptions) -> dict[str, Any]:
    """The ``SamplingOptions`` fields of cfg (a script's config that extends them), as ``Sampler`` keywords."""
    return {f.name: getattr(cfg, f.name) for f in fields(SamplingOptions)}


class SamplingStopped(Exception):
    """A ``should_stop`` callback asked to stop: the call returns nothing, so no partial result passes as whole."""


@dataclass(frozen=True)
class Samples:
    """What one ``Sampler.generate`` call made; None where nothing was asked for or drawn."""

    images: torch.Tensor  # (n, C, H, W) float32 in [0, 1] on the model's device (decode off: raw latents)
    labels: torch.Tensor | None  # (n,) int64 on the CPU; None for an unconditional model
    trajectory: torch.Tensor | None  # (K, n, C, H, W) float32 on the CPU, K <= max_frames, noise first
    nfe: int  # network evaluations per sample path, the largest over the chunks
    nfe_per_chunk: list[int]
    seed: int | None
    precision: str  # "auto" resolved


def seeded_noise(seed: int, indices: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Noise (len(indices), *shape) float32 on the CPU; sample i depends only on (seed, i), not on n or batch size.
    The spawn key keeps the streams of different (seed, i) apart (torch's CPU generator keeps only 32 seed bits)."""
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for j, i in enumerate(indices):
        out[j] = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, i))).standard_normal(shape)
    return torch.from_numpy(out)


def step_noise(x0: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Each call draws the next SDE step's noise (b, C, H, W) float32; a sample's draws are seeded by a hash of its
    own x0's float32 bytes, whatever the batch."""
    keys = [np.frombuffer(hashlib.sha256(z.numpy().tobytes()).digest(), np.uint32) for z in x0.float().cpu()]
    rngs = [np.random.default_rng(key) for key in keys]
    return lambda: torch.from_numpy(np.stack([r.standard_normal(x0.shape[1:], dtype=np.float32) for r in rngs]))


def seeded_labels(seed: int, n: int, num_classes: int) -> torch.Tensor:
    """Uniform random labels (n,) int64 from the seed alone."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    return torch.from_numpy(rng.integers(0, num_classes, size=n, dtype=np.int64))
