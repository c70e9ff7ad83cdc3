"""Sampling: integrate the flow ODE dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1).

Time convention (owned by ``objectives/flow.py``): t = 0 is pure noise, t = 1 is data, and the network predicts
the velocity dx/dt. A MeanFlow network (``objectives/meanflow.py``) also takes the length h of a jump and then
predicts the average velocity over [t, t + h]; the "mean" method jumps along it.

``Sampler`` wraps a network into such a velocity (guidance, precision, batching, seeds) and runs a solver on a
time grid. Its options (``SamplingOptions``) are the defaults of every ``sample`` call, which may override
them, and also the sampling flags of sampler.py and evaluate.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torchdiffeq import odeint
from tqdm import tqdm

from models.cost import count_params
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import Config, ConfigError, arg
from utils.device import PRECISIONS, autocast, module_device_dtype, resolve_device, resolve_precision, unwrap_model

SOLVERS = ("euler", "midpoint", "heun", "dopri5", "mean")
GRIDS = ("uniform", "shifted", "edm")
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0  # EDM noise levels (Karras et al. 2022)


@dataclass(kw_only=True)
class SamplingOptions(Config):
    """How ``Sampler.sample`` integrates: solver, grid, guidance, precision, batching. Also sampler.py's and
    evaluate.py's sampling flags."""

    steps: int = arg(50, "solver steps on the time grid (not dopri5)", min=1, group="sampling")
    method: str = arg("heun", "ODE solver; NFE: euler and mean steps, midpoint and heun 2*steps (heun corrects its "
                      "last step too); dopri5 is adaptive; mean jumps along a MeanFlow model's average velocity",
                      choices=SOLVERS)  # fmt: skip
    grid: str = arg("uniform", "time grid of the fixed-step solvers", choices=GRIDS)
    grid_shift: float = arg(3.0, "shift s of --grid shifted: s > 1 puts more steps near the data (t=1); this is "
                            "SD3/Flux's shift run the other way (their shift > 1 puts steps near the noise): s here is "
                            "their 1/shift", gt=0)  # fmt: skip
    cfg_scale: float = arg(1.0, "classifier-free guidance scale; 1 disables it")
    guidance_interval: tuple[float, float] = arg(
        (0.0, 1.0), "apply guidance only for t in [T_LO, T_HI] (Kynkäänniemi et al. 2024); t=0 noise, t=1 data",
        metavar=("T_LO", "T_HI"),
    )  # fmt: skip
    rtol: float = arg(1e-5, "dopri5 relative tolerance", gt=0)
    atol: float = arg(1e-5, "dopri5 absolute tolerance", gt=0)
    precision: str = arg("auto", "network precision: auto is bf16 autocast on CUDA, fp32 elsewhere; the ODE state "
                         "stays float32", choices=PRECISIONS)  # fmt: skip
    batch_size: int = arg(256, "samples per forward batch (bounds memory)", min=1)
    max_frames: int = arg(50, "at most this many trajectory frames (GIFs)", min=2)

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got ({lo}, {hi})")


#################################################################################
#                          Time grids, noise and labels                         #
#################################################################################


def time_grid(steps: int, grid: str = "uniform", shift: float = 3.0) -> torch.Tensor:
    """Increasing times (steps + 1,) in float64 from exactly 0 (noise) to exactly 1 (data).

    - "uniform": equal steps.
    - "shifted": t -> s t / (1 + (s - 1) t); s > 1 puts more, smaller steps near the data end (t = 1).
      This is the time shift of SD3 (Esser et al. 2024) applied to the noise level 1 - t with factor 1 / s,
      so it runs in the opposite direction of SD3's / Flux's ``shift`` parameter.
    - "edm": the EDM noise levels (Karras et al. 2022, rho = 7, sigma in [0.002, 80]) mapped to the linear
      path by t = 1 / (1 + sigma), with the first point moved to t = 0 so the run starts from pure noise.
    """
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if grid == "uniform":
        return u
    if grid == "shifted":
        t = shift * u / (1 + (shift - 1) * u)
    else:
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
        sigma = (hi + i / max(steps - 1, 1) * (lo - hi)) ** EDM_RHO  # (steps,) from sigma_max down
        t = torch.cat([1 / (1 + sigma), torch.ones(1, dtype=torch.float64)])
    t[0], t[-1] = 0.0, 1.0  # exact end points whatever the rounding
    return t


def seeded_noise(seed: int, indices: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Noise (len(indices), *shape) float32 on the CPU; sample i depends only on (seed, i).

    One generator per sample keeps a sample's noise independent of n and of the batch size; the spawn key
    keeps the streams of different (seed, i) apart (torch's CPU generator keeps only 32 seed bits).
    """
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for j, i in enumerate(indices):
        out[j] = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, i))).standard_normal(shape)
    return torch.from_numpy(out)


def seeded_labels(seed: int, n: int, num_classes: int) -> torch.Tensor:
    """Uniform random labels (n,) int64 from the seed alone."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    return torch.from_numpy(rng.integers(0, num_classes, size=n, dtype=np.int64))


#################################################################################
#                                    Solvers                                    #
#################################################################################

Velocity = Callable[..., torch.Tensor]  # f(x (N, ...), t) -> dx/dt (N, ...); f(x, t, h) for the mean method


def solver_step(f: Velocity, x: torch.Tensor, t0: float, t1: float, method: str) -> torch.Tensor:
    """One step of a fixed-grid method from time t0 to t1. NFE: euler and mean 1, midpoint and heun 2.

    Heun is the explicit trapezoid (Karras et al. 2022, Alg. 1 without the noise) and corrects the last step too:
    it ends at t = 1, where the velocity is finite (EDM's last step, to sigma = 0, is a plain Euler step).
    """
    h = t1 - t0
    if method == "euler":
        return x + h * f(x, t0)
    if method == "midpoint":
        return x + h * f(x + 0.5 * h * f(x, t0), t0 + 0.5 * h)
    if method == "heun":
        d0 = f(x, t0)
        return x + 0.5 * h * (d0 + f(x + h * d0, t1))
    return x + h * f(x, t0, h)  # mean: x_t1 = x_t0 + h u(x_t0, t0, h), exact for the true average velocity


def frame_indices(steps: int, max_frames: int) -> list[int]:
    """Up to max_frames state indices in [0, steps], evenly spread, always holding 0 and steps."""
    k = min(steps + 1, max_frames)
    return sorted({round(i * steps / (k - 1)) for i in range(k)})


#################################################################################
#                                    Sampler                                    #
#################################################################################


class Sampler:
    """ODE sampler for a DiT: classifier-free guidance with a guidance interval, fixed-grid and adaptive solvers.

    ``Sampler(model, steps=20, method="heun")``: keyword options are ``SamplingOptions`` fields, the defaults of
    every ``sample`` call. Works on any model with ``input_size``, ``in_channels`` and ``num_classes`` (0 for an
    unconditional model) that maps (x, t, y) to a velocity.

    NFE: ``last_nfe`` counts evaluations of the velocity field per sample path: one call on the whole batch counts
    once, a guided call (one pass of 2N) too. Euler and mean use ``steps``, midpoint and heun ``2 * steps``,
    dopri5 chooses its own. Over chunks of ``batch_size``, ``last_nfe`` is the largest count and
    ``last_nfe_per_chunk`` lists them. ``last_precision`` is what "auto" resolved to. The ODE state, the times and
    the velocity handed to the solver stay float32 (float64 for a float64 model) whatever the network runs in.
    The model is used unwrapped (no DDP / torch.compile wrapper), in eval mode; its mode is restored afterwards.
    """

    def __init__(self, model: nn.Module, **options: Any):
        self.model = unwrap_model(model)
        self.options = SamplingOptions(**options)
        self.input_size = int(self.model.input_size)
        self.in_channels = int(self.model.in_channels)
        self.num_classes = int(getattr(self.model, "num_classes", 0))
        self.device, self.model_dtype = module_device_dtype(self.model)
        self.state_dtype = torch.float64 if self.model_dtype == torch.float64 else torch.float32
        self.last_nfe, self.last_nfe_per_chunk = 0, []
        self.last_labels: torch.Tensor | None = None  # (n,) int64 on the CPU; None for an unconditional model
        self.last_seed: int | None = None
        self.last_precision: str | None = None
        self._nfe = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, ema: bool = True, device: str | torch.device = "auto",
                        **options: Any) -> Sampler:  # fmt: skip
        """A Sampler for the DiT of a training checkpoint, with its EMA (default) or raw weights, on device
        ("auto", "cpu", "cuda", "cuda:N" or "mps"; the file loads on any device whatever device saved it)."""
        device = resolve_device(str(device))
        return cls(model_from_checkpoint(load_checkpoint(path), ema=ema, device=device), **options)

    def __repr__(self) -> str:
        shape = f"{self.in_channels}x{self.input_size}x{self.input_size}"
        classes = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        kind = "MeanFlow " if getattr(self.model, "mean_flow", False) else ""
        o = self.options
        return (
            f"Sampler({type(self.model).__name__} {kind}{count_params(self.model) / 1e6:.2f}M params, {classes}, "
            f"{shape} images, {self.device}; {o.method} {o.steps} steps on a {o.grid} grid, cfg {o.cfg_scale:g}, "
            f"precision {o.precision}, batch {o.batch_size})"
        )

    def velocity(self, x: torch.Tensor, t: float, y: torch.Tensor | None = None, interval: float | None = None,
                 options: SamplingOptions | None = None) -> torch.Tensor:  # fmt: skip
        """Guided velocity (N, C, H, W) at states x (N, C, H, W) and one time t, in the state's dtype.

        Guidance v_u + s (v_c - v_u) runs through the model's ``forward_with_cfg`` only for t inside the guidance
        interval; elsewhere, and at scale 1, one conditional pass runs. ``interval``: a MeanFlow model's jump
        length (its average velocity over [t, t + interval]). Each call counts as one network evaluation.
        """
        o = options or self.options
        lo, hi = o.guidance_interval
        scale = o.cfg_scale if lo <= float(t) <= hi else 1.0
        n = x.shape[0]
        # t stays in the state's precision even for a bf16 network: bf16 would round 0.998 to 1.0.
        tt = torch.full((n,), float(t), device=x.device, dtype=x.dtype)
        extra = {} if interval is None else {"interval": torch.full_like(tt, float(interval))}
        with autocast(x.device, resolve_precision(o.precision, self.device)):
            if self.num_classes == 0:
                v = self.model(x.to(self.model_dtype), tt, **extra)
            else:
                v = self.model.forward_with_cfg(x.to(self.model_dtype), tt, y, scale, **extra)
        self._nfe += 1
        return v.to(x.dtype)  # the ODE state never drops to the network's bf16

    @torch.inference_mode()
    def sample(self, n: int, y: torch.Tensor | Sequence[int] | int | None = None, *, noise: torch.Tensor | None = None,
               seed: int | None = None, return_trajectory: bool = False, progress: bool = False,
               **options: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Generate n images (n, C, H, W) in [0, 1], float32 on the model's device.

        y: labels (n,), or one int for every sample; None draws uniform random classes for a conditional model
        (kept in ``last_labels``). noise: the state at t = 0, (n, C, H, W); with noise, seed only draws the random
        labels. seed: makes the call repeatable; sample i's noise depends only on (seed, i), so results do not
        depend on n or batch_size. Without noise and seed, a seed is drawn from torch's global generator (kept in
        ``last_seed``). ``options`` override the sampler's ``SamplingOptions`` for this call.

        With return_trajectory=True returns (images, trajectory): raw states (K, n, C, H, W), float32 on the
        CPU, K <= max_frames, the first frame the noise and the last the final state. On a fixed grid the frames
        are spread evenly over the steps; with dopri5 over time.
        """
        o = dataclasses.replace(self.options, **options) if options else self.options
        y, noise, seed = self._check(n, y, noise, seed, o)
        self.last_seed, self.last_labels = seed, y
        self.last_precision = resolve_precision(o.precision, self.device)
        shape = (self.in_channels, self.input_size, self.input_size)
        ts = time_grid(o.steps, o.grid, o.grid_shift).tolist()
        if not return_trajectory:
            frames = []
        elif o.method == "dopri5":
            frames = list(range(o.max_frames))
        else:
            frames = frame_indices(o.steps, o.max_frames)

        images, trajectory, self.last_nfe_per_chunk = [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(range(0, n, o.batch_size), desc="sampling", unit="batch", disable=not progress):
                stop = min(start + o.batch_size, n)
                x = noise[start:stop] if noise is not None else seeded_noise(seed, range(start, stop), shape)
                yb = y[start:stop].to(self.device) if y is not None else None
                self._nfe = 0
                x, kept = self._integrate(x.to(self.device, self.state_dtype), yb, ts, frames, o)
                self.last_nfe_per_chunk.append(self._nfe)
                images.append(((x.float() + 1) / 2).clamp_(0, 1))
                trajectory += [torch.stack(kept)] if frames else []  # (K, b, C, H, W)
        finally:
            self.model.train(was_training)
        self.last_nfe = max(self.last_nfe_per_chunk)
        out = torch.cat(images)
        return (out, torch.cat(trajectory, dim=1)) if return_trajectory else out

    def _integrate(self, x: torch.Tensor, y: torch.Tensor | None, ts: list[float], frames: list[int],
                   o: SamplingOptions) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """The final state from x (b, C, H, W) at t = 0, and the kept frames (float32, on the CPU)."""

        def f(x: torch.Tensor, t: float, h: float | None = None) -> torch.Tensor:
            return self.velocity(x, t, y, h, o)

        if o.method == "dopri5":  # dense output gives the frames without extra solver steps
            times = torch.linspace(0.0, 1.0, max(len(frames), 2), device=x.device, dtype=x.dtype)
            states = odeint(lambda t, s: f(s, t), x, times, rtol=o.rtol, atol=o.atol, method="dopri5")
            return states[-1], [s.float().cpu() for s in states] if frames else []
        kept = [x.float().cpu()] if 0 in frames else []
        for i in range(o.steps):
            x = solver_step(f, x, ts[i], ts[i + 1], o.method)
            if i + 1 in frames:
                kept.append(x.float().cpu())
        return x, kept

    def sample_each_class(self, n_per_class: int, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n_per_class samples of every class, class c in rows c * n_per_class ...: a grid with
        nrow=n_per_class shows one class per row. Keywords as for ``sample``."""
        if self.num_classes == 0:
            raise ValueError("sample_each_class needs a class-conditional model; this one is unconditional")
        if not isinstance(n_per_class, int) or n_per_class < 1:
            raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
        y = torch.arange(self.num_classes).repeat_interleave(n_per_class)
        return self.sample(len(y), y, **kwargs)

    def _check(self, n: int, y: Any, noise: torch.Tensor | None, seed: int | None,
               o: SamplingOptions) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None]:  # fmt: skip
        """One-line ValueErrors for arguments that cannot work; labels (n,) int64 on the CPU and the seed."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if o.method == "mean" and not getattr(self.model, "mean_flow", False):
            raise ValueError("method 'mean' needs a MeanFlow model (train.py --objective meanflow)")
        expected = (n, self.in_channels, self.input_size, self.input_size)
        if noise is not None and (tuple(noise.shape) != expected or not noise.is_floating_point()):
            raise ValueError(f"noise must be a float tensor of shape {expected}, got {tuple(noise.shape)}")
        if seed is None and noise is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        if self.num_classes == 0:
            if y is not None or o.cfg_scale != 1.0:
                raise ValueError("this model is unconditional (num_classes=0): sample without labels, at cfg_scale 1")
            return None, noise, seed
        if y is None:
            return seeded_labels(seed if seed is not None else int(torch.randint(0, 2**62, (1,))), n,
                                 self.num_classes), noise, seed  # fmt: skip
        y = torch.full((n,), y) if isinstance(y, int) and not isinstance(y, bool) else torch.as_tensor(y).cpu()
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"expected {n} labels y of shape ({n},), got shape {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got min {int(y.min())} max {int(y.max())}")
        return y.long(), noise, seed
