"""MeanFlow: a network that predicts the average velocity over an interval, for one- and few-step sampling.

Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling" (2025). Written here in the project's
time convention (``objectives/flow.py``: t = 0 noise, t = 1 data, x_t = t * x1 + (1 - t) * x0, conditional velocity
x1 - x0); the paper puts noise at t = 1.

Derivation. Let v(x, tau) = E[x1 - x0 | x_tau = x] be the marginal velocity and x_tau the solution of
dx/dtau = v(x, tau) through x_s at time s. The average velocity from s to t is

    u(x_s, s, t) = 1 / (t - s) * integral_s^t v(x_tau, tau) dtau,     so that     x_t = x_s + (t - s) u(x_s, s, t),

and u(x, s, s) = v(x, s): at a zero interval it is the instantaneous velocity, so a MeanFlow network is also a
flow model for every ODE solver. Multiply by (t - s) and differentiate in s along the trajectory, t fixed
(moving s moves the start point x_s at rate v):

    d/ds [(t - s) u(x_s, s, t)] = d/ds integral_s^t v(x_tau, tau) dtau = -v(x_s, s)
    -u(x_s, s, t) + (t - s) d/ds u(x_s, s, t) = -v(x_s, s)
    u(x_s, s, t) = v(x_s, s) + (t - s) d/ds u(x_s, s, t)                                    (MeanFlow identity)

with the total derivative d/ds u = v . du/dx + du/ds (t is held fixed, so du/dt does not enter): the
Jacobian-vector product of (x, s, t) -> u(x, s, t) with the tangent (v, 1, 0). The paper's identity
u = v - (t - r) du/dt (noise at 1, r < t) is this one after tau -> 1 - tau, which flips the signs of v and u.
The DiT is called as model(x_s, s, y, interval=t - s): the JVP goes through a function of (x, s, t) that forms
the interval itself, so the chain rule (tangent (v, 1, -1) on (x, s, interval)) is left to autograd.

Training (the paper's Algorithm 1). Draw x0 ~ N(0, I), times s <= t, x_s on the straight path, and regress
    u_theta(x_s, s, t)  onto  sg( v + (t - s) * JVP(u_theta; (x_s, s, t); (v, 1, 0)) ),   v = x1 - x0,
the per-sample conditional velocity in both places. The target is affine in v, so its mean given x_s is the
identity's right-hand side with the marginal v, and the minimiser of the squared error is the true average
velocity (the argument that makes per-sample targets work in flow matching). With s = t the target is x1 - x0
and the loss is the flow-matching loss.
- Times (SD3-style logit-normal, Esser et al. 2024, both times): two draws sigmoid(mean + std * n), s the smaller,
  t the larger; a fraction ``equal_fraction`` of each batch gets t = s (the paper's best: 75%; 100% is flow
  matching, which fails at one step). The paper's ImageNet setting, logit-normal (-0.4, 1.0) with noise at 1,
  is (+0.4, 1.0) here: logit(1 - tau) = -logit(tau).
- Adaptive weight (the paper's section 4.3): loss = mean_i sg(w_i) * mse_i, w_i = 1 / (||err_i||^2 + c)^p with
  ||.||^2 the squared L2 norm over the sample's elements; p = 0 is the plain mean squared error.
- Training-time guidance (the paper's section 4.2): the velocity becomes
    v~ = omega * v + kappa * u(x_s, s, s | y) + (1 - omega - kappa) * u(x_s, s, s | null)
  (network terms under stop-gradient), used both as the target's v and as the JVP tangent; rows whose label is
  dropped keep v. At the fixed point the network's conditional velocity is CFG at scale omega / (1 - kappa), so
  one-step samples come guided without a second pass. omega = 1, kappa = 0 is off.

Engineering. The target is computed on the plain module (``unwrap_model``) under no_grad, and the prediction by
an ordinary forward through the model as given, so DDP gradient sync, torch.compile and flash attention keep
working for the pass that is differentiated. Forward-mode AD through attention: the flash and memory-efficient
kernels of scaled_dot_product_attention have no forward derivative, so the JVP pass runs under
``sdpa_kernel(SDPBackend.MATH)``. It runs under whatever autocast the caller set (bf16 on GPU). Rows with s = t
need no JVP (the target is v), so only the 1 - equal_fraction of the batch with s < t goes through it; its cost
against a flow-matching step is measured in the README. Should forward-mode AD fail for some operator, the
derivative falls back, with one warning, to a central finite difference in float32.
The network is built with an interval input and with t embedded unscaled (``network_options``): the target
contains the network's own derivative in time, which sinusoids of t * 1000 would make large.
All randomness comes from torch's global generator, which train.py checkpoints; nothing here syncs with the host.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from objectives.base import LossTerms, Objective
from objectives.flow import FlowMatching, sample_t
from utils.config import ConfigError, arg
from utils.device import unwrap_model


def _expand(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (N,) shaped to broadcast against x (N, ...)."""
    return a.reshape(-1, *([1] * (x.ndim - 1)))


def _call(model: nn.Module, x, s, y, interval, drop_mask, guidance=None) -> torch.Tensor:
    """model(x, s, y, interval=..., drop_mask=..., guidance=...), leaving drop_mask and guidance out when there are
    none (stand-in models, networks without a guidance input)."""
    extra = {} if guidance is None else {"guidance": guidance}
    if drop_mask is not None:
        extra["drop_mask"] = drop_mask
    return model(x, s, y, interval=interval, **extra)


def average_velocity_jvp(
    model: nn.Module,
    x: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor | None = None,
    drop_mask: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u(x, s, t) and its total derivative d/ds u = v . du/dx + du/ds (both (N, C, H, W), no graph).

    The forward-mode JVP of (x, s, t) -> model(x, s, y, interval=t - s) with tangent (v, 1, 0), on the plain
    module, under no_grad and on the math attention kernel (the only one with a forward derivative).
    x, v (N, C, H, W); s, t (N,); y, drop_mask (N,) or None. A conditional network in train mode needs drop_mask:
    without it every call draws its own label dropout. guidance (N,): the scale input of a network that takes one.
    """
    plain = unwrap_model(model)

    def u_fn(x_, s_, t_):
        return _call(plain, x_, s_, y, t_ - s_, drop_mask, guidance)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # torch loads its forward-AD decompositions through the deprecated torch.jit.script on first use
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.func.jvp(u_fn, (x, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))


def total_derivative_fd(
    model: nn.Module,
    x: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor | None = None,
    drop_mask: torch.Tensor | None = None,
    eps: float = 5e-3,
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """d/ds u of ``average_velocity_jvp`` by a central finite difference along (v, 1, 0), in float32 (autocast
    off): the fallback where forward-mode AD fails. Two ordinary forwards; error O(eps^2) plus float32 rounding
    over eps (about 1e-4 relative at eps 5e-3)."""
    plain = unwrap_model(model)
    h = _expand(torch.full_like(s, eps), x)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        up = _call(plain, x + h * v, s + eps, y, t - s - eps, drop_mask, guidance)
        um = _call(plain, x - h * v, s - eps, y, t - s + eps, drop_mask, guidance)
    return (up - um) / (2 * eps)


def interval_times(
    n: int, t_mean: float, t_std: float, equal_fraction: float, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Current times s (n,) and end times t (n,), s <= t, both logit-normal; the last round(n * equal_fraction)
    rows have t = s exactly (the rows with s < t come first, so the JVP can skip the rest without a sync)."""
    a = sample_t(n, "logit-normal", t_mean, t_std, device=device)
    b = sample_t(n, "logit-normal", t_mean, t_std, device=device)
    s, t = torch.minimum(a, b), torch.maximum(a, b)
    k = n - round(n * equal_fraction)
    return s, torch.cat([t[:k], s[k:]])


@dataclass(kw_only=True)
class AverageVelocityObjective(Objective):
    """What MeanFlow and iMF share: the two logit-normal times, the JVP with its finite-difference fallback, and the
    draws of a batch (``draw``)."""

    sample_method = "mean"  # jumps along the average velocity (sampling/solvers.py)
    label: ClassVar[str] = ""  # the objective's name in messages

    t_mean: float = arg(
        0.4,
        "logit-normal location m of both times, t = sigmoid(m + s n) (the paper's -0.4 with "
        "noise at t=1 is +0.4 here, t=1 data)",
        group="objective",
    )
    t_std: float = arg(1.0, "logit-normal scale s of both times", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.path = FlowMatching()  # builds x_s on the straight path: objectives/flow.py owns the convention
        self._use_fd = False  # set, with one warning, if forward-mode AD fails

    @property
    def equal_fraction(self) -> float:
        """The fraction of each batch with s = t (the subclass's flag)."""
        raise NotImplementedError

    def network_options(self) -> dict[str, Any]:
        """An interval input, and t embedded unscaled (the module docstring says why)."""
        return {"average_velocity": True, "time_scale": 1.0}

    def sample_times(self, n: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``interval_times`` with this objective's times and fraction of rows with s = t."""
        return interval_times(n, self.t_mean, self.t_std, self.equal_fraction, device)

    def num_unequal(self, n: int) -> int:
        """Rows with s < t in a batch of n drawn by ``sample_times``."""
        return n - round(n * self.equal_fraction)

    def check_labels(self, plain: nn.Module, y: torch.Tensor | None) -> None:
        """Raise ValueError when this objective's guidance cannot work with these labels and this network."""

    def draw(
        self,
        model: nn.Module,
        x1: torch.Tensor,
        y: torch.Tensor | None,
        x0: torch.Tensor | None,
        s: torch.Tensor | None,
        t: torch.Tensor | None,
    ) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """The checks, then the draws of a batch in this order: noise x0, times s <= t (N,), label dropout.

        Returns the plain module, x0, s, t, k (rows [0, k) have s < t; given times all count) and the drop mask (N,)
        (None without labels), drawn once so that every pass over the batch drops the same labels."""
        plain = unwrap_model(model)
        if getattr(plain, "average_velocity", None) is False:
            raise ValueError(f"the {self.label} objective needs a network with an interval input (network_options())")
        self.check_labels(plain, y)
        if (s is None) != (t is None):
            raise ValueError("give both times s and t, or neither")
        n = x1.shape[0]
        if x0 is None:
            x0 = torch.randn_like(x1)
        if s is None:
            s, t = self.sample_times(n, device=x1.device)
            k = self.num_unequal(n)
        else:
            k = n  # given times: no row is known to have s = t without a host sync
        drop_mask = None if y is None else plain.label_drop_mask(y)
        return plain, x0, s, t, k, drop_mask

    def total_derivative(
        self,
        model: nn.Module,
        x: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        tangent: torch.Tensor,
        y: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """D u = tangent . du/dx + du/ds of u(x, s, t | y, w) (N, C, H, W), no graph: a forward-mode JVP, or a
        finite difference from the first time that fails (one warning)."""
        if not self._use_fd:
            try:
                return average_velocity_jvp(model, x, s, t, tangent, y, drop_mask, guidance=w)[1]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # NotImplementedError included: an operator without a forward derivative
                self._use_fd = True
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                warnings.warn(
                    f"{self.label}: forward-mode AD failed ({first}); using a finite-difference derivative from now on",
                    stacklevel=2,
                )
        return total_derivative_fd(model, x, s, t, tangent, y, drop_mask, guidance=w)


@dataclass(kw_only=True)
class MeanFlow(AverageVelocityObjective):
    """MeanFlow loss (Geng et al. 2025) in this project's convention (t = 0 noise, t = 1 data); see the module doc."""

    label = "MeanFlow"

    mf_equal_fraction: float = arg(0.75, "fraction of each batch with equal times (flow matching rows)", min=0, max=1)
    mf_weight_power: float = arg(1.0, "adaptive loss weight 1 / (|err|^2 + c)^p, this p (0: plain MSE)", min=0)
    mf_weight_eps: float = arg(1e-3, "the c of the adaptive weight", gt=0)
    mf_omega: float = arg(1.0, "training-time guidance scale omega (1: off)", gt=0)
    mf_kappa: float = arg(0.0, "training-time guidance kappa (0: off)", min=0, lt=1)
    mf_guidance_interval: tuple[float, float] = arg(
        (0.0, 1.0), "apply training-time guidance only for s in [LO, HI]", metavar=("LO", "HI")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.mf_guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"mf_guidance_interval must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")

    @property
    def equal_fraction(self) -> float:
        return self.mf_equal_fraction

    @property
    def guided(self) -> bool:
        """Whether training-time guidance is on."""
        return self.mf_omega != 1.0 or self.mf_kappa != 0.0

    def check_labels(self, plain: nn.Module, y: torch.Tensor | None) -> None:
        if self.guided and y is None:
            raise ValueError("training-time guidance (omega != 1 or kappa != 0) needs class labels y")

    def guided_velocity(
        self,
        model: nn.Module,
        x: torch.Tensor,
        s: torch.Tensor,
        v: torch.Tensor,
        y: torch.Tensor,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v~ = omega v + kappa u(x, s, s | y) + (1 - omega - kappa) u(x, s, s | null) (N, C, H, W), no graph.

        Rows with a dropped label (drop_mask) or s outside mf_guidance_interval keep v. Needs a class-conditional
        model that takes drop_mask (the DiT); the network runs on the plain module, one pass of N or 2N.
        """
        plain = unwrap_model(model)
        omega, kappa = self.mf_omega, self.mf_kappa
        zero = torch.zeros_like(s)
        null = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        with torch.no_grad():
            if kappa == 0.0:
                u_null = plain(x, s, y, interval=zero, drop_mask=null)
                mixed = omega * v + (1 - omega) * u_null.to(v.dtype)
            else:
                two = lambda a: torch.cat([a, a])
                out = plain(two(x), two(s), two(y), interval=two(zero), drop_mask=torch.cat([~null, null]))  # (2N, ...)
                u_cond, u_null = out.to(v.dtype).chunk(2)
                mixed = omega * v + kappa * u_cond + (1 - omega - kappa) * u_null
        lo, hi = self.mf_guidance_interval
        active = (s >= lo) & (s <= hi)
        if drop_mask is not None:
            active = active & ~drop_mask
        return torch.where(_expand(active, v), mixed, v)

    def target(
        self,
        model: nn.Module,
        x: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        v: torch.Tensor,
        y: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The regression target sg(v + (t - s) d/ds u(x, s, t)) (N, C, H, W) at points x (N, C, H, W) of time s (N,).

        v (N, C, H, W) is the velocity at (x, s): the per-sample x1 - x0 (or its guided v~) in training, or the
        marginal velocity, for which the true average velocity makes the target equal to itself.
        """
        duds = self.total_derivative(model, x, s, t, v, y, drop_mask)
        return (v + _expand(t - s, v) * duds.to(v.dtype)).detach()

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
        """MeanFlow loss for data x1 (N, C, H, W) with labels y (N,) (None for an unconditional model).

        model may be wrapped by DDP and/or torch.compile: the prediction goes through it, the target through the
        plain module. x0 (noise) and the times s, t (N,) are drawn unless given (tests). Returns LossTerms: the
        weighted loss, the raw per-sample mean squared error (N,) and the current time s (N,).
        """
        plain, x0, s, t, k, drop_mask = self.draw(model, x1, y, x0, s, t)
        s, xs, v, _ = self.path.sample_path(x1, y, x0=x0, t=s)  # x_s = s x1 + (1 - s) x0, v = x1 - x0
        if self.guided:
            v = self.guided_velocity(plain, xs, s, v, y, drop_mask)
        target = v
        if k > 0:
            y_k, mask_k = (None if a is None else a[:k] for a in (y, drop_mask))
            head = self.target(plain, xs[:k], s[:k], t[:k], v[:k], y_k, mask_k)
            target = torch.cat([head, v[k:]]) if k < len(v) else head
        pred = _call(model, xs, s, y, t - s, drop_mask)
        err = (pred.float() - target.float()).square().flatten(1)  # (N, D)
        mse = err.mean(1)  # (N,)
        if self.mf_weight_power == 0:
            loss = mse.mean()
        else:
            weight = (err.sum(1).detach() + self.mf_weight_eps).pow(-self.mf_weight_power)
            loss = (weight * mse).mean()
        return LossTerms(loss, mse.detach(), s)
