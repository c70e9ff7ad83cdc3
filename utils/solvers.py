"""Numerics of the flow ODE sampler: solver, grid and precision names, time grids and the integrators.

Time convention (owned by ``utils/flow.py``): t = 0 is pure noise, t = 1 is data; the integrators below
run from t = 0 to t = 1 on a velocity f(x, t) = dx/dt. ``sampler.Sampler`` wraps a network into such an f
(guidance, precision, batching); the names here also feed the ``choices`` of ``utils.cli.add_sampling_args``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun", "dopri5")
FIXED_STEP_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun")
GRIDS: tuple[str, ...] = ("uniform", "shifted", "edm")
# "auto": bf16 autocast on a CUDA device with bf16 support, full precision elsewhere.
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")

# EDM noise levels (Karras et al. 2022): sigma from 80 down to 0.002 with rho = 7.
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # f(x (N, ...), t) -> dx/dt (N, ...)


def time_grid(steps: int, grid: str = "uniform", shift: float = 3.0) -> torch.Tensor:
    """Increasing times (steps + 1,) in float64 from exactly 0 (noise) to exactly 1 (data).

    - "uniform": equal steps.
    - "shifted": t -> s t / (1 + (s - 1) t); s > 1 puts more, smaller steps near the data end (t = 1).
      This is the time shift of SD3 (Esser et al. 2024) applied to the noise level 1 - t with factor 1 / s,
      so it runs in the opposite direction of SD3's / Flux's ``shift`` parameter, where shift > 1 puts the
      steps near the noise: s here equals their shift 1 / s.
    - "edm": the EDM noise levels (Karras et al. 2022, rho = 7, sigma in [0.002, 80]) mapped to the linear
      path by t = 1 / (1 + sigma), with the first point moved to t = 0 so the run starts from pure noise.
      Steps are fine at both ends and finest near the data.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if grid == "uniform":
        return u
    if grid == "shifted":
        if not shift > 0:
            raise ValueError(f"grid shift must be > 0, got {shift}")
        t = shift * u / (1 + (shift - 1) * u)
    else:
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
        sigma = (hi + i / max(steps - 1, 1) * (lo - hi)) ** EDM_RHO  # (steps,) from sigma_max down
        t = torch.cat([1 / (1 + sigma), torch.ones(1, dtype=torch.float64)])
    t[0], t[-1] = 0.0, 1.0  # exact end points whatever the rounding
    return t


def frame_indices(steps: int, max_frames: int) -> list[int]:
    """Up to max_frames state indices in [0, steps], evenly spread, always holding 0 and steps."""
    k = min(steps + 1, max_frames)
    return sorted({round(i * steps / (k - 1)) for i in range(k)})


def solve_fixed(
    f: Velocity, x: torch.Tensor, ts: list[float], method: str, frames: Sequence[int] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate dx/dt = f(x, t) on the grid ts from x (N, ...) at ts[0]; returns the state at ts[-1] and the
    states whose step index is in frames (float32, on the CPU).

    NFE per step: euler 1, midpoint 2, heun 2. Heun corrects every step, the last one included, so it costs
    2 * steps evaluations; EDM (Karras et al. 2022, Alg. 1) takes an Euler step for its final step to sigma = 0
    (2 * steps - 1). Here the last step ends at t = 1, where the velocity is finite, so it keeps its corrector.
    """
    if method not in FIXED_STEP_SOLVERS:
        raise ValueError(f"unknown fixed-step method {method!r}; choose from {', '.join(FIXED_STEP_SOLVERS)}")
    keep = set(frames)
    kept = [x.float().cpu()] if 0 in keep else []
    for i in range(len(ts) - 1):
        t0, t1 = ts[i], ts[i + 1]
        h = t1 - t0
        if method == "euler":
            x = x + h * f(x, t0)
        elif method == "midpoint":
            x = x + h * f(x + 0.5 * h * f(x, t0), t0 + 0.5 * h)
        else:  # heun: explicit trapezoid, second order (Karras et al. 2022, Alg. 1 without the noise)
            d0 = f(x, t0)
            x_pred = x + h * d0
            x = x + 0.5 * h * (d0 + f(x_pred, t1))
        if i + 1 in keep:
            kept.append(x.float().cpu())
    return x, kept


def solve_dopri5(
    f: Velocity, x: torch.Tensor, n_frames: int = 0, rtol: float = 1e-5, atol: float = 1e-5
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Adaptive Dormand-Prince (torchdiffeq) from x (N, ...) at t = 0 to t = 1; returns the final state and
    n_frames states at evenly spaced times (float32, on the CPU). The frames come from dense output, so they
    add no solver steps; n_frames = 0 keeps none."""
    from torchdiffeq import odeint

    times = torch.linspace(0.0, 1.0, max(n_frames, 2), device=x.device, dtype=x.dtype)
    states = odeint(lambda t, s: f(s, t), x, times, rtol=rtol, atol=atol, method="dopri5")
    return states[-1], [s.float().cpu() for s in states] if n_frames else []
