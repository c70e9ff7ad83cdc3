"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models").

A power-function EMA of exponent gamma averages the weights theta(tau) of training time tau in [0, t] with the
profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1); its width relative to t (the standard deviation of tau / t)
is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), at most sqrt(1/12) (gamma = 0, the plain mean).
Tracked step by step with beta_t = (1 - 1/t)^(gamma + 1), the weight of theta_j (the weights after step j) at step t
is (j^(gamma+1) - (j-1)^(gamma+1)) / t^(gamma+1): exactly the profile's mass on [j - 1, j], so a snapshot is the
integral of p_t against the piecewise-constant trajectory, with no approximation. A profile of any other
(t, gamma) is then reconstructed as the combination of snapshots whose profiles best fit it in L2: solve
A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target> (closed form below, EDM2 eq. 151), in float64.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.config import ConfigError
from utils.io import atomic_write

EDM2_SIGMA_RELS = (0.05, 0.10)
SIGMA_REL_MAX = 12**-0.5  # gamma = 0
# The largest relative residual of a reconstruction accepted: on weight noise that is independent from step to step,
# the mismatch adds noise of this fraction of the noise the target EMA itself keeps.
MAX_RESIDUAL = 0.25


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of a relative width: the largest root of g^3 + 7g^2 + (16 - s^-2) g + 12 - s^-2 (EDM2 Alg. 2)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel {sigma_rel:g} is outside (0, {SIGMA_REL_MAX:.4f}), a power EMA's widths")
    s = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the profile of exponent gamma."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_beta(gamma: float, step: int) -> float:
    """The decay of update number step (1-based): (1 - 1/step)^(gamma + 1); 0 at step 1."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def overlap(t_a: Any, g_a: Any, t_b: Any, g_b: Any) -> np.ndarray:
    """<p_a, p_b> (broadcast) = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) hi) (lo / hi)^g, lo and hi the earlier and
    later end, g the later's exponent."""
    t_a, g_a, t_b, g_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b)))
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g = np.where(t_a < t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * hi) * (lo / hi) ** g


def solve(
    steps: Sequence[int], sigma_rels: Sequence[float], step: int, targets: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (n_snapshots, n_targets), summing to 1, combining snapshots (steps[i], sigma_rels[i]) into the
    targets' power EMAs at step, and each target's relative L2 residual (0: exact; near 1: not representable)."""
    t, g = np.asarray(steps, np.float64), np.array([sigma_rel_to_gamma(s) for s in sigma_rels])
    g_out = np.array([sigma_rel_to_gamma(s) for s in targets])
    a = overlap(t[:, None], g[:, None], t[None, :], g[None, :])
    b = overlap(t[:, None], g[:, None], float(step), g_out[None, :])
    x = np.linalg.solve(a, b)
    x /= x.sum(0, keepdims=True)
    c = overlap(step, g_out, step, g_out)
    err2 = np.einsum("io,ij,jo->o", x, a, x) - 2 * np.einsum("io,io->o", x, b) + c
    return x, np.sqrt(np.clip(err2, 0, None) / c)


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per sigma_rel, updated on the device (foreach, no host sync);
    ``meta`` (plain values: the model and run config) goes into every snapshot."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float], meta: dict[str, Any] | None = None):
        self.model, self.sigma_rels, self.meta = model, tuple(float(s) for s in sigma_rels), meta or {}
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names, params = zip(*model.named_parameters(), strict=True)
        self.emas = [[p.detach().clone() for p in params] for _ in self.sigma_rels]
        self.run_id = uuid.uuid4().hex  # tells this run's snapshots from another's; kept by a resume

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the model's weights after update number step (1-based, skipped updates included)."""
        params = [p.detach() for p in self.model.parameters()]
        for gamma, ema in zip(self.gammas, self.emas, strict=True):
            torch._foreach_lerp_(ema, params, 1.0 - power_beta(gamma, step))  # a Python-float weight: no sync

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        """Profile k as a state dict of the model (its buffers the model's)."""
        return {**self.model.state_dict(), **dict(zip(self.names, self.emas[k], strict=True))}

    def save_snapshot(self, folder: str | Path, step: int) -> Path:
        """Write folder/STEP.pt atomically: every profile's weights (training dtype), the step, run id and meta."""
        snap = {"step": step, "sigma_rels": list(self.sigma_rels), "run_id": self.run_id, **self.meta}
        snap["ema"] = [self.weights(k) for k in range(len(self.emas))]
        return atomic_write(Path(folder) / f"{step:07d}.pt", lambda f: torch.save(snap, f))

    def plan(self, steps: int, every: int, folder: Path) -> str:
        """The start-up line: the profiles' memory, and their snapshots' count and size by the last step."""
        mib, n = sum(p.numel() * p.element_size() for e in self.emas for p in e) / 2**20, -(-steps // every)
        return (
            f"phema: sigma_rel {' '.join(map(str, self.sigma_rels))}: {mib:.1f} MiB of weights tracked; a snapshot "
            f"every {every} steps and at the last: {n} of {mib:.1f} MiB ({n * mib:.1f} MiB) by step {steps} in {folder}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rels": list(self.sigma_rels), "run_id": self.run_id, "ema": self.emas}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue the profiles of a checkpoint (train.py refuses other lengths); ConfigError if it tracked none."""
        if state is None:
            raise ConfigError("--phema: the checkpoint's run tracked no power EMA, and one cannot start mid-run")
        for ema, saved in zip(self.emas, state["ema"], strict=True):
            torch._foreach_copy_(ema, [s.to(e.device) for e, s in zip(ema, saved, strict=True)])
        self.run_id = state["run_id"]


class SigmaRels(argparse.Action):
    """``--phema`` alone: EDM2's pair; with values: those."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, tuple(values) or EDM2_SIGMA_RELS)
