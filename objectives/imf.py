"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter, He, arXiv 2512.02012, 2025): the loss on a velocity
built from the average velocity, the network's own velocity as the JVP tangent, and the guidance scale as an input.
Convention and MeanFlow's derivation: objectives/meanflow.py.

The MeanFlow identity read the other way round gives the velocity in terms of u, the "compound" function

    V_theta(x_s, s, t) = u_theta(x_s, s, t) - (t - s) sg(D u_theta),   D u_theta = v_theta . du_theta/dx + du_theta/ds,

regressed onto x1 - x0 as in flow matching. The tangent is the network's own velocity v_theta(x_s, s) =
u_theta(x_s, s, s) (sg), not x1 - x0: V_theta is then a function of (x_s, s, t) alone, its minimiser is
E[x1 - x0 | x_s] = v, and with the tangent v that is the identity, so u_theta is the true average velocity. The
paper's V = u + (t - r) du/dt is this after tau -> 1 - tau. Rows with s = t are weighted by ``imf_velocity_weight``.
The velocity is u at interval 0, not the paper's second head (docs/one-step.md).

Guidance as an input (section 5): the DiT's ``guidance_max`` embeds w / w_max, and the network learns the average
velocity of v^w = v_u + w (v_c - v_u), so one pass samples at any w. ``imf_guidance_fraction`` of each batch draws
w = w_max ** U (log-uniform: the paper's power law, beta = 1); other rows and dropped labels have w = 1. The target

    v_target = (x1 - x0) + (1 - 1/w) (v_c - v_u),  v_c = sg(u_theta(x_s, s, s | y, w)),  v_u = sg(u_theta(. | null, 1))

has mean v_y + (1 - 1/w)(v_c - v_u) given x_s; at the fixed point v_c equals it, so v_c = v_u + w (v_y - v_u): CFG at
scale w (MeanFlow's guidance with omega = 1, kappa = 1 - 1/w). A row's tangent is its velocity under its own
conditioning. Times and the adaptive weight are MeanFlow's (the paper: 50% of rows with s = t; p = 1, c = 0.01).

No host sync: the s < t rows come first, the guided rows are the first round(f * k) of those and of the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from objectives.meanflow import UNCONDITIONAL, AverageVelocityObjective, Conditioning, _call, _expand, adaptive_loss
from utils.config import ConfigError, arg


def guided_target(v: Tensor, v_c: Tensor, v_u: Tensor, w: Tensor) -> Tensor:
    """The guided velocity v + (1 - 1/w) (v_c - v_u) (N, C, H, W) for scales w (N,) >= 1; w = 1 gives v."""
    return v + _expand(1 - 1 / w, v) * (v_c - v_u)


@dataclass(kw_only=True)
class ImprovedMeanFlow(AverageVelocityObjective):
    """Improved MeanFlow loss (Geng et al. 2025) in this project's convention; see the module docstring."""

    label = "iMF"

    imf_equal_fraction: float = arg(
        0.5, "fraction of each batch with equal times (the flow-matching rows)", min=0, max=1
    )
    imf_velocity_weight: float = arg(
        1.0, "weight of the flow-matching rows' loss (the velocity term) against the rows with s < t", min=0
    )
    imf_weight_power: float = arg(1.0, "adaptive loss weight 1 / (|err|^2 + c)^p, this p (0: plain MSE)", min=0)
    imf_weight_eps: float = arg(0.01, "the c of the adaptive weight", gt=0)
    imf_guidance_max: float = arg(
        8.0,
        "top w_max of the guidance scales trained on, [1, w_max], log-uniform (1: no "
        "guidance input; the network then samples with ordinary CFG)",
    )
    imf_guidance_fraction: float = arg(
        1.0, "fraction of each batch whose guidance scale is drawn from [1, w_max] (the rest: w = 1)", min=0, max=1
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.imf_guidance_max < 1.0:  # Config rejects inf and nan
            raise ConfigError(
                f"--imf-guidance-max must be a finite number >= 1 (the range is [1, w_max]), got {self.imf_guidance_max}"
            )

    @property
    def equal_fraction(self) -> float:
        return self.imf_equal_fraction

    @property
    def guided(self) -> bool:
        """Whether the guidance scale is a network input (trained on [1, imf_guidance_max])."""
        return self.imf_guidance_max > 1.0 and self.imf_guidance_fraction > 0

    def network_options(self) -> dict[str, Any]:
        return {**super().network_options(), "guidance_max": self.imf_guidance_max if self.guided else 0.0}

    def num_guided(self, n: int, k: int) -> tuple[int, int]:
        """Guided rows among the first k (s < t) and among the other n - k rows: (the first gk, the first ge)."""
        f = self.imf_guidance_fraction if self.guided else 0.0
        return round(k * f), round((n - k) * f)

    def sample_guidance(self, n: int, k: int, device: str | torch.device = "cpu") -> Tensor:
        """Scales w (n,): log-uniform on [1, w_max] for rows [0, gk) and [k, k + ge) (``num_guided``), else 1."""
        gk, ge = self.num_guided(n, k)
        draw = self.imf_guidance_max ** torch.rand(gk + ge, device=device)
        one = torch.ones(n - gk - ge, device=device)
        return torch.cat([draw[:gk], one[: k - gk], draw[gk:], one[k - gk :]])

    def conditioning(self, plain: nn.Module, y: Tensor | None, k: int) -> Conditioning:
        if not self.guided:
            return super().conditioning(plain, y, k)
        if y is None or not getattr(plain, "guidance_max", 1.0):
            raise ValueError(
                "iMF with a guidance range (imf_guidance_max > 1) needs class labels y and a network "
                "with a guidance input (network_options())"
            )
        cond = super().conditioning(plain, y, k)
        w = self.sample_guidance(y.shape[0], k, device=y.device)
        return cond._replace(w=torch.where(cond.drop_mask, 1.0, w))  # a dropped label is unguided

    def velocity_estimate(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, cond: Conditioning = UNCONDITIONAL
    ) -> Tensor:
        """V = u(x, s, t) - (t - s) sg(D u) (N, C, H, W), its own velocity as the tangent, a graph through u."""
        tangent = self.velocity(model, x, s, cond)
        duds = self.total_derivative(model, x, s, t, tangent, cond)
        u = _call(model, x, s, t - s, cond)
        return u - _expand(t - s, u) * duds.to(u.dtype)

    def row_losses(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, cond: Conditioning, k: int
    ) -> tuple[Tensor, Tensor]:
        """V (rows [0, k); the rest: u(x_s, s, s)) regressed on the guided velocity; given times count as s < t."""
        gk, ge = self.num_guided(x.shape[0], k)
        g = gk + ge

        # One pass at interval 0 without a graph: the tangents of rows [0, k), then v_u (null label, w = 1).
        def pick(a: Tensor) -> Tensor:  # rows [0, k), then [0, gk) and [k, k + ge) again
            return torch.cat([a[:k], a[:gk], a[k : k + ge]])

        y, drop_mask, w = cond
        tangent = v_u = None
        if k + g > 0:
            ones = torch.ones(g, device=x.device)
            yy = None if y is None else pick(y)
            dd = None if drop_mask is None else torch.cat([drop_mask[:k], ones.bool()])
            ww = None if w is None else torch.cat([w[:k], ones])
            out = self.velocity(model, pick(x), pick(s), Conditioning(yy, dd, ww)).to(v.dtype)
            tangent, v_u = out[:k], out[k:]
        pred = _call(model, x, s, t - s, cond)
        est = pred.float()
        if k > 0:
            duds = self.total_derivative(model, x[:k], s[:k], t[:k], tangent, cond.head(k))
            est = torch.cat([est[:k] - _expand(t[:k] - s[:k], duds) * duds.float(), est[k:]])
        target = v.float()
        if g > 0:
            # v_c: the tangent of a guided s < t row; the prediction itself (no graph) of a guided s = t row.
            v_c = torch.cat([tangent[:gk], pred[k : k + ge].detach()]).float()
            w_g = torch.cat([w[:gk], w[k : k + ge]])
            guided = guided_target(torch.cat([v[:gk], v[k : k + ge]]).float(), v_c, v_u.float(), w_g)
            target = torch.cat([guided[:gk], target[gk:k], guided[gk:], target[k + ge :]])
        per_row, mse = adaptive_loss(est, target.detach(), self.imf_weight_power, self.imf_weight_eps)
        return torch.cat([per_row[:k], self.imf_velocity_weight * per_row[k:]]), mse
