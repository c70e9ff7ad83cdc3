"""Time grids and the fixed-grid solver steps of the sampler (``SOLVERS``), from t = 0 (noise) to t = 1 (data); the
adaptive dopri5 (torchdiffeq, ``ADAPTIVE``) is run by the Sampler itself.

"sde" integrates an SDE with the ODE's marginals (SiT, Ma et al. 2024): on the linear path E[x0 | x_t] = x - t v, so
the score is s = (t v - x) / (1 - t), and dx = [v + (w/2) s] dt + sqrt(w) dW keeps every marginal for any w(t) >= 0.
SiT's "sigma" w = 2 (1 - t) gives the drift (1 + t) v - x; "SBDM" w = 2 (1 - t) / t, infinite at t = 0, starts at
1e-3. Both end with a noise-free step to t = 1 (SiT's "Mean"; "euler" steps along v). docs/published.md: the details."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

GRIDS = ("uniform", "shifted", "edm")
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0  # EDM noise levels (Karras et al. 2022)
ADAPTIVE = ("dopri5",)  # methods that choose their own steps (torchdiffeq), run by the Sampler


def time_grid(steps: int, grid: str = "uniform", shift: float = 3.0) -> torch.Tensor:
    """Increasing times (steps + 1,) float64 from exactly 0 to exactly 1. "shifted": t -> s t / (1 + (s - 1) t), s > 1
    refining near t = 1 (SD3's shift with 1 / s); "edm": EDM's sigmas at t = 1 / (1 + sigma), the first moved to 0."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
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


SDE_DIFFUSIONS, LAST_STEPS, SBDM_T0 = ("sigma", "SBDM"), ("mean", "euler"), 1e-3


def sde_grid(steps: int, last_step_size: float, diffusion: str = "sigma") -> torch.Tensor:
    """SiT's window (steps + 1,) float64: steps - 1 steps on [t0, 1 - last_step_size], then the last step to 1."""
    t0 = SBDM_T0 if diffusion == "SBDM" else 0.0
    return torch.cat([torch.linspace(t0, 1 - last_step_size, steps, dtype=torch.float64), torch.ones(1).double()])


def frame_indices(steps: int, max_frames: int) -> list[int]:
    """Up to max_frames state indices in [0, steps], evenly spread, always holding 0 and steps."""
    k = min(steps + 1, max_frames)
    return sorted({round(i * steps / (k - 1)) for i in range(k)})


# f(x (N, ...), t) -> dx/dt (N, ...); an average-velocity solver calls f(x, t, h) -> the average over [t, t + h]
Velocity = Callable[..., torch.Tensor]


def euler_step(f: Velocity, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    return x + (t1 - t0) * f(x, t0)


def midpoint_step(f: Velocity, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    h = t1 - t0
    return x + h * f(x + 0.5 * h * f(x, t0), t0 + 0.5 * h)


def heun_step(f: Velocity, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1 without noise), corrector included on the last step (v is finite)."""
    h = t1 - t0
    d0 = f(x, t0)
    return x + 0.5 * h * (d0 + f(x + h * d0, t1))


def mean_step(f: Velocity, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """x_t1 = x_t0 + h u(x_t0, t0, h), h = t1 - t0: exact for the true average velocity u."""
    h = t1 - t0
    return x + h * f(x, t0, h)


def sde_step(
    f: Velocity,
    x: torch.Tensor,
    t0: float,
    t1: float,
    noise: torch.Tensor | None = None,
    diffusion: str = "sigma",
    norm: float = 1.0,
    last_step: str = "mean",
) -> torch.Tensor:
    """Euler-Maruyama on the module docstring's SDE (w scaled by norm); noise None: the noise-free last step."""
    v, h = f(x, t0), t1 - t0
    if noise is None and last_step == "euler":
        return x + h * v
    k = norm / t0 if diffusion == "SBDM" else norm  # w / (2 (1 - t))
    x = x + h * (v + k * (t0 * v - x))
    return x if noise is None else x + math.sqrt(2 * k * (1 - t0) * h) * noise


Step = Callable[[Velocity, torch.Tensor, float, float], torch.Tensor]


@dataclass(frozen=True)
class Solver:
    step: Step
    nfe_per_step: int
    average_velocity: bool = False
    about: str = ""
    stochastic: bool = False  # takes noise= (the Sampler's: sampling.sampler.step_noise) and the sde_* options


SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler_step, 1, about="ODE solver, first order"),
    "midpoint": Solver(midpoint_step, 2, about="ODE solver, second order"),
    "heun": Solver(heun_step, 2, about="ODE solver, second order, corrects its last step too"),
    "mean": Solver(mean_step, 1, average_velocity=True, about="jumps along an average-velocity network's prediction"),
    "sde": Solver(sde_step, 1, about="Euler-Maruyama on SiT's SDE of the same marginals", stochastic=True),
}
FIXED_GRID_SOLVERS: tuple[str, ...] = tuple(SOLVERS)  # the fixed-grid method names, for flags' choices
METHODS: tuple[str, ...] = (*FIXED_GRID_SOLVERS, *ADAPTIVE)  # every method the Sampler runs


def get_solver(method: str) -> Solver:
    """The fixed-grid solver called method; a ValueError for any other name (dopri5 included: it has no grid)."""
    if method not in SOLVERS:
        raise ValueError(f"unknown fixed-grid method {method!r}; choose from {', '.join(FIXED_GRID_SOLVERS)}")
    return SOLVERS[method]
