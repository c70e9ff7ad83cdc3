"""Improved MeanFlow (iMF): a velocity loss re-parameterised through the average velocity, the network's own velocity
as the JVP tangent, and the guidance scale as an input of the network.

Geng, Lu, Wu, Shechtman, Kolter, He, "Improved Mean Flows: On the Challenges of Fastforward Generative Models"
(arXiv 2512.02012, 2025). Written here in the project's time convention (``objectives/flow.py``: t = 0 noise, t = 1
data, x_t = t * x1 + (1 - t) * x0, conditional velocity x1 - x0); the paper puts noise at t = 1. MeanFlow's
derivation (``objectives/meanflow.py``) is the starting point.

Derivation. The MeanFlow identity u(x_s, s, t) = v(x_s, s) + (t - s) d/ds u(x_s, s, t), with d/ds u the total
derivative along the trajectory (the JVP of (x, s, t) -> u with tangent (v, 1, 0)), read the other way round says
what the instantaneous velocity is in terms of u:

    v(x_s, s) = u(x_s, s, t) - (t - s) d/ds u(x_s, s, t).

So a network u_theta defines a velocity estimate, the "compound" function

    V_theta(x_s, s, t) = u_theta(x_s, s, t) - (t - s) sg(D u_theta),   D u_theta = v_theta . du_theta/dx + du_theta/ds,

and iMF regresses it onto the per-sample velocity x1 - x0, an ordinary flow-matching regression. The tangent is the
network's own estimate of the marginal velocity, v_theta(x_s, s) = u_theta(x_s, s, s) (sg), not the noisy x1 - x0:
then V_theta is a function of (x_s, s, t) alone, the target holds neither the network nor the sample's velocity
twice, and the minimiser of E |V_theta - (x1 - x0)|^2 is V_theta = E[x1 - x0 | x_s] = v, which with the tangent v
is the identity: (t - s) u is then the integral of v from s to t (its s-derivative is -v and it is 0 at s = t), so
u_theta is the true average velocity. The paper's form V = u + (t - r) du/dt (noise at 1, r < t) is this one after
tau -> 1 - tau, which flips the signs of v and u. Only u_theta(x_s, s, t) carries a gradient (the derivative is under
stop-gradient): the gradient is MeanFlow's with the target v + (t - s) D u; what changes the training is the tangent
(and the guided target below), not the algebra. At s = t, V_theta = u_theta(x_s, s, s): those rows are the
flow-matching term on the velocity estimate, weighted by ``imf_velocity_weight``.

Velocity estimate: u at a zero interval, not a second head. The paper adds an auxiliary v-head (8 more blocks)
with its own flow-matching loss; here the velocity is the same network at interval 0, which the identity
u(x, s, s) = v(x, s) makes the instantaneous velocity anyway. So the DiT keeps one output (no architecture change,
flow and MeanFlow networks pay nothing), every ODE solver samples the same function the tangent came from, and the
flow-matching rows train exactly the function used as the tangent. The price is one forward pass without a graph
over the rows with s < t before the JVP (the two-head form needs that pass too: the tangent must exist before the
JVP runs).

Guidance as an input (the paper's section 5). The network takes the scale w (``guidance_max`` of the DiT: a
TimestepEmbedder on w / w_max added to the conditioning) and learns the average velocity of the guided field
v^w = v_u + w (v_c - v_u), so one pass gives a one-step sample at any w chosen at sampling time. A fraction
``imf_guidance_fraction`` of each batch draws w from [1, w_max] (log-uniform: the paper's power distribution with
beta = 1, w = w_max ** U), the rest and every row whose label is dropped have w = 1. The per-sample target becomes

    v_target = (x1 - x0) + (1 - 1/w) (v_c - v_u),   v_c = sg(u_theta(x_s, s, s | y, w)),  v_u = sg(u_theta(x_s, s, s | null, 1)),

whose mean given x_s is v_y + (1 - 1/w)(v_c - v_u). At the fixed point v_c = that mean, so
v_c / w = v_y - (1 - 1/w) v_u and v_c = v_u + w (v_y - v_u): classifier-free guidance at scale w (MeanFlow's
training-time guidance with omega = 1, kappa = 1 - 1/w, per row). w = 1 is the plain target. The tangent of a row is
the network's velocity under that row's own conditioning: v_c for a guided row (the guided flow's velocity, whose
average velocity u(. | y, w) is), v_u for a row whose label is dropped. A guidance interval as a further network
input (the paper samples one per row and embeds it too) is not built.

- Times: both logit-normal (SD3-style, Esser et al. 2024) as in MeanFlow, s the smaller; the paper's (-0.4, 1.0)
  with noise at 1 is (+0.4, 1.0) here. A fraction ``imf_equal_fraction`` of each batch has s = t (the paper: 50%).
- Adaptive weight (MeanFlow's section 4.3, kept by iMF): loss_i = sg(w_i) mse_i, w_i = 1 / (|err_i|^2 + c)^p,
  the paper's p = 1, c = 0.01.

Engineering. The rows are laid out so that no row selection needs a host sync: the rows with s < t come first
(the JVP runs on them alone), and the guided rows are the first round(f * k) of those and the first
round(f * (n - k)) of the rest. One pass without a graph at interval 0 gives the tangents of the s < t rows (with
their own conditioning) and v_u of the guided rows; v_c of a guided s = t row is the prediction itself (the same
network at the same inputs), taken under stop-gradient, so it costs nothing. Then the JVP on the s < t rows and the
prediction through the model as given (DDP, torch.compile), as in MeanFlow, whose JVP helpers (math attention
kernel, finite-difference fallback) run here too. Passes per step against flow matching's forward and backward of
n: a forward of k + g rows and a JVP of k rows (k = rows with s < t, g = guided rows); the README has the timing.
All randomness comes from torch's global generator (noise, times, label dropout, guidance scales, in that order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from objectives.base import LossTerms
from objectives.meanflow import AverageVelocityObjective, _call, _expand
from utils.config import ConfigError, arg
from utils.device import unwrap_model


def guided_target(v: torch.Tensor, v_c: torch.Tensor, v_u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The guided per-sample velocity v + (1 - 1/w) (v_c - v_u) (N, C, H, W), for v, v_c, v_u (N, C, H, W) and
    scales w (N,) >= 1; w = 1 gives v."""
    return v + _expand(1 - 1 / w, v) * (v_c - v_u)


@dataclass(kw_only=True)
class ImprovedMeanFlow(AverageVelocityObjective):
    """Improved MeanFlow loss (Geng et al. 2025) in this project's convention (t = 0 noise, t = 1 data); see the
    module doc."""

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
        if not (self.imf_guidance_max >= 1.0 and math.isfinite(self.imf_guidance_max)):
            raise ConfigError(
                f"imf_guidance_max must be a finite number >= 1 (the range is [1, w_max]), got {self.imf_guidance_max}"
            )

    @property
    def equal_fraction(self) -> float:
        return self.imf_equal_fraction

    @property
    def guided(self) -> bool:
        """Whether the guidance scale is a network input (trained on [1, imf_guidance_max])."""
        return self.imf_guidance_max > 1.0 and self.imf_guidance_fraction > 0

    def network_options(self) -> dict[str, Any]:
        """MeanFlow's and, when guided, the guidance input."""
        return {**super().network_options(), "guidance_max": self.imf_guidance_max if self.guided else 0.0}

    def check_labels(self, plain: nn.Module, y: torch.Tensor | None) -> None:
        if self.guided and (y is None or not getattr(plain, "guidance_max", 1.0)):
            raise ValueError(
                "iMF with a guidance range (imf_guidance_max > 1) needs class labels y and a network "
                "with a guidance input (network_options())"
            )

    def num_guided(self, n: int, k: int) -> tuple[int, int]:
        """Guided rows among the first k (s < t) and among the other n - k rows: (the first gk, the first ge)."""
        f = self.imf_guidance_fraction if self.guided else 0.0
        return round(k * f), round((n - k) * f)

    def sample_guidance(self, n: int, k: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Guidance scales w (n,): log-uniform on [1, w_max] for rows [0, gk) and [k, k + ge) (``num_guided``), else 1."""
        gk, ge = self.num_guided(n, k)
        draw = self.imf_guidance_max ** torch.rand(gk + ge, device=device)
        one = torch.ones(n - gk - ge, device=device)
        return torch.cat([draw[:gk], one[: k - gk], draw[gk:], one[k - gk :]])

    def velocity(
        self,
        model: nn.Module,
        x: torch.Tensor,
        s: torch.Tensor,
        y: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's velocity estimate u(x, s, s | y, w) (N, C, H, W), no graph: the tangent and v_c, v_u."""
        with torch.no_grad():
            return _call(unwrap_model(model), x, s, y, torch.zeros_like(s), drop_mask, w)

    def velocity_estimate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The compound V = u(x, s, t) - (t - s) sg(D u) (N, C, H, W) with the network's own velocity as the tangent,
        the gradient through u; what ``loss`` regresses onto the (guided) per-sample velocity, row by row."""
        tangent = self.velocity(model, x, s, y, drop_mask, w)
        duds = self.total_derivative(model, x, s, t, tangent, y, drop_mask, w)
        u = _call(model, x, s, y, t - s, drop_mask, w)
        return u - _expand(t - s, u) * duds.to(u.dtype)

    def loss(
        self,
        model: nn.Module,
        x1: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        x0: torch.Tensor | None = None,
        s: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> LossTerms:
        """iMF loss for data x1 (N, C, H, W) with labels y (N,) (None for an unconditional model, unguided only).

        model may be wrapped by DDP and/or torch.compile: the prediction goes through it, the other passes through
        the plain module. x0 (noise) and the times s, t (N,) are drawn unless given (tests; given times are all
        treated as s < t rows). Returns LossTerms: the weighted loss, the raw per-sample squared error of the
        velocity estimate (N,) and the current time s (N,).
        """
        plain, x0, s, t, k, drop_mask = self.draw(model, x1, y, x0, s, t)
        n = x1.shape[0]
        gk, ge = self.num_guided(n, k)
        w = None
        if self.guided:  # a dropped label is unguided
            w = torch.where(drop_mask, 1.0, self.sample_guidance(n, k, device=x1.device))
        s, xs, v, _ = self.path.sample_path(x1, y, x0=x0, t=s)  # x_s = s x1 + (1 - s) x0, v = x1 - x0

        # One pass at interval 0 without a graph: the tangents of rows [0, k) under their own conditioning, then
        # v_u (null label, w = 1) of the guided rows [0, gk) and [k, k + ge).
        def pick(a: torch.Tensor) -> torch.Tensor:  # rows [0, k), then [0, gk) and [k, k + ge) again
            return torch.cat([a[:k], a[:gk], a[k : k + ge]])

        g = gk + ge
        tangent = v_u = None
        if k + g > 0:
            ones = torch.ones(g, device=x1.device)
            yy = None if y is None else pick(y)
            dd = None if drop_mask is None else torch.cat([drop_mask[:k], ones.bool()])
            ww = None if w is None else torch.cat([w[:k], ones])
            out = self.velocity(plain, pick(xs), pick(s), yy, dd, ww).to(v.dtype)
            tangent, v_u = out[:k], out[k:]
        pred = _call(model, xs, s, y, t - s, drop_mask, w)
        est = pred.float()
        if k > 0:
            head = [None if a is None else a[:k] for a in (y, drop_mask, w)]
            duds = self.total_derivative(plain, xs[:k], s[:k], t[:k], tangent, *head)
            est = torch.cat([est[:k] - _expand(t[:k] - s[:k], duds) * duds.float(), est[k:]])
        target = v.float()
        if g > 0:
            # v_c: the tangent of a guided s < t row; the prediction itself (no graph) of a guided s = t row.
            v_c = torch.cat([tangent[:gk], pred[k : k + ge].detach()]).float()
            w_g = torch.cat([w[:gk], w[k : k + ge]])
            guided = guided_target(torch.cat([v[:gk], v[k : k + ge]]).float(), v_c, v_u.float(), w_g)
            target = torch.cat([guided[:gk], target[gk:k], guided[gk:], target[k + ge :]])
        err = (est - target.detach()).square().flatten(1)  # (N, D)
        mse = err.mean(1)  # (N,)
        per_row = mse
        if self.imf_weight_power != 0:
            per_row = mse * (err.sum(1).detach() + self.imf_weight_eps).pow(-self.imf_weight_power)
        if self.imf_velocity_weight != 1.0 and k < n:
            per_row = torch.cat([per_row[:k], self.imf_velocity_weight * per_row[k:]])
        return LossTerms(per_row.mean(), mse.detach(), s)
