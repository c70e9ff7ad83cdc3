"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025): u(x, s, t) predicts the average velocity over [s, t], for one- and
few-step sampling. In the project's convention (objectives/flow.py: t = 0 noise); the paper puts noise at t = 1, and
its u = v - (t - r) du/dt is the identity below after tau -> 1 - tau. With v the marginal velocity,

    u(x_s, s, t) = 1 / (t - s) * integral_s^t v(x_tau, tau) dtau,     so that     x_t = x_s + (t - s) u(x_s, s, t),

and u(x, s, s) = v(x, s), so every ODE solver still applies. Differentiating (t - s) u in s along the trajectory,
t fixed (moving s moves x_s at rate v):

    -u(x_s, s, t) + (t - s) d/ds u(x_s, s, t) = -v(x_s, s)
    u(x_s, s, t) = v(x_s, s) + (t - s) d/ds u(x_s, s, t)                                    (MeanFlow identity)

with d/ds u = v . du/dx + du/ds, the JVP of (x, s, t) -> u with tangent (v, 1, 0) (the DiT takes t - s: autograd
applies the chain rule). Training regresses u_theta(x_s, s, t) onto sg(v + (t - s) JVP(u_theta; (v, 1, 0))) with the
per-sample v = x1 - x0: the target is affine in v, so its mean given x_s uses the marginal v and the minimiser is the
true average velocity. At s = t the loss is flow matching's.
- Times: two logit-normal draws (SD3), s the smaller; ``mf_equal_fraction`` of each batch has t = s (paper: 75%).
- Adaptive weight (section 4.3): loss = mean_i sg(w_i) mse_i, w_i = 1 / (||err_i||^2 + c)^p; p = 0 is the plain MSE.
- Training-time guidance (section 4.2): v~ = omega v + kappa u(x_s, s, s | y) + (1 - omega - kappa) u(x_s, s, s | null)
  (under sg) is the target's v and the tangent, except where the label is dropped. At the fixed point the conditional
  velocity is CFG at scale omega / (1 - kappa), so one-step samples come guided.
The JVP (math attention kernel, s < t rows only) and the unscaled time embedding: docs/one-step.md."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from objectives.base import LossTerms, Objective
from objectives.flow import FlowMatching, sample_t
from utils.config import ConfigError, arg
from utils.device import unwrap_model


class Conditioning(NamedTuple):
    """A network call's labels y, label-drop mask and guidance scales w (iMF), each (N,) or None."""

    y: Tensor | None = None
    drop_mask: Tensor | None = None
    w: Tensor | None = None

    def head(self, k: int) -> Conditioning:
        """The conditioning of rows [0, k)."""
        return Conditioning(*(None if a is None else a[:k] for a in self))


UNCONDITIONAL = Conditioning()


def _expand(a: Tensor, x: Tensor) -> Tensor:
    """Per-sample scalars (N,) shaped to broadcast against x (N, ...)."""
    return a.reshape(-1, *([1] * (x.ndim - 1)))


def _call(model: nn.Module, x: Tensor, s: Tensor, interval: Tensor, cond: Conditioning) -> Tensor:
    """model(x, s, y, interval=...), passing drop_mask and guidance only when given (stand-ins lack them)."""
    extra = {k: v for k, v in (("drop_mask", cond.drop_mask), ("guidance", cond.w)) if v is not None}
    return model(x, s, cond.y, interval=interval, **extra)


def adaptive_loss(pred: Tensor, target: Tensor, power: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row losses sg(w) mse (N,), w = 1 / (||err||^2 + eps)^power (section 4.3), and the plain mse (N,)."""
    err = (pred.float() - target.float()).square().flatten(1)  # (N, D)
    mse = err.mean(1)  # (N,)
    return mse * (err.sum(1).detach() + eps).pow(-power), mse


def average_velocity_jvp(
    model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, cond: Conditioning = UNCONDITIONAL
) -> tuple[Tensor, Tensor]:
    """u(x, s, t) and d/ds u = v . du/dx + du/ds (no graph): forward-mode JVP with tangent (v, 1, 0)."""
    plain = unwrap_model(model)
    u_fn = lambda x_, s_, t_: _call(plain, x_, s_, t_ - s_, cond)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # torch loads its forward-AD decompositions through the deprecated torch.jit.script on first use
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.func.jvp(u_fn, (x, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))


def total_derivative_fd(
    model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, cond: Conditioning = UNCONDITIONAL, eps: float = 5e-3
) -> Tensor:
    """d/ds u by a float32 central difference where forward-mode AD fails (about 1e-4 relative at eps 5e-3)."""
    plain = unwrap_model(model)
    h = _expand(torch.full_like(s, eps), x)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        up = _call(plain, x + h * v, s + eps, t - s - eps, cond)
        um = _call(plain, x - h * v, s - eps, t - s + eps, cond)
    return (up - um) / (2 * eps)


@dataclass(kw_only=True)
class AverageVelocityObjective(Objective):
    """What MeanFlow and iMF share: the times, the JVP with its fallback, the loss but for ``row_losses``."""

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
        return {"average_velocity": True, "time_scale": 1.0}  # t unscaled: docs/one-step.md says why

    def num_unequal(self, n: int) -> int:
        """Rows with s < t in a batch of n drawn by ``sample_times``."""
        return n - round(n * self.equal_fraction)

    def sample_times(self, n: int, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """Times s <= t (n,), both logit-normal; the rows from ``num_unequal(n)`` on have t = s exactly."""
        a = sample_t(n, "logit-normal", self.t_mean, self.t_std, device=device)
        b = sample_t(n, "logit-normal", self.t_mean, self.t_std, device=device)
        s, t = torch.minimum(a, b), torch.maximum(a, b)
        k = self.num_unequal(n)
        return s, torch.cat([t[:k], s[k:]])

    def conditioning(self, plain: nn.Module, y: Tensor | None, k: int) -> Conditioning:
        """Labels y with one label-drop mask for every pass (iMF adds guidance scales); rows [0, k) have s < t.
        A subclass raises ValueError here where its guidance cannot work with these labels and this network."""
        return Conditioning(y, None if y is None else plain.label_drop_mask(y))

    def velocity(self, model: nn.Module, x: Tensor, s: Tensor, cond: Conditioning = UNCONDITIONAL) -> Tensor:
        """The network's velocity u(x, s, s | cond) (N, C, H, W), no graph."""
        with torch.no_grad():
            return _call(unwrap_model(model), x, s, torch.zeros_like(s), cond)

    def row_losses(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, cond: Conditioning, k: int
    ) -> tuple[Tensor, Tensor]:
        """Each row's loss and squared error (N,) at x_s (N, C, H, W) of times s <= t, s < t on rows [0, k)."""
        raise NotImplementedError

    def loss(
        self,
        model: nn.Module,
        x1: Tensor,
        y: Tensor | None = None,
        *,
        x0: Tensor | None = None,
        s: Tensor | None = None,
        t: Tensor | None = None,
    ) -> LossTerms:
        """The loss for data x1 (N, C, H, W) and labels y (N,) or None; given times count as s < t. The prediction
        goes through ``model`` as given, the passes without a graph through the plain module."""
        plain = unwrap_model(model)
        if getattr(plain, "average_velocity", None) is False:
            raise ValueError(f"the {self.label} objective needs a network with an interval input (network_options())")
        if (s is None) != (t is None):
            raise ValueError("give both times s and t, or neither")
        n = x1.shape[0]
        if x0 is None:
            x0 = torch.randn_like(x1)
        k = n  # given times: no row is known to have s = t without a host sync
        if s is None:
            s, t = self.sample_times(n, device=x1.device)
            k = self.num_unequal(n)
        cond = self.conditioning(plain, y, k)
        s, xs, v, _ = self.path.sample_path(x1, y, x0=x0, t=s)  # x_s = s x1 + (1 - s) x0, v = x1 - x0
        per_row, mse = self.row_losses(model, xs, s, t, v, cond, k)
        return LossTerms(per_row.mean(), mse.detach(), s)

    def total_derivative(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, tangent: Tensor, cond: Conditioning = UNCONDITIONAL
    ) -> Tensor:
        """D u = tangent . du/dx + du/ds (N, C, H, W), no graph: the JVP, or the finite difference once that fails."""
        if not self._use_fd:
            try:
                return average_velocity_jvp(model, x, s, t, tangent, cond)[1]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # NotImplementedError included: an operator without a forward derivative
                self._use_fd = True
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                warnings.warn(
                    f"{self.label}: forward-mode AD failed ({first}); using a finite-difference derivative from now on",
                    stacklevel=2,
                )
        return total_derivative_fd(model, x, s, t, tangent, cond)


@dataclass(kw_only=True)
class MeanFlow(AverageVelocityObjective):
    """MeanFlow loss (Geng et al. 2025) in this project's convention; see the module docstring."""

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

    def conditioning(self, plain: nn.Module, y: Tensor | None, k: int) -> Conditioning:
        if self.guided and y is None:
            raise ValueError("training-time guidance (omega != 1 or kappa != 0) needs class labels y")
        return super().conditioning(plain, y, k)

    def guided_velocity(self, model: nn.Module, x: Tensor, s: Tensor, v: Tensor, cond: Conditioning) -> Tensor:
        """v~ (N, C, H, W) without a graph; rows with a dropped label or s outside mf_guidance_interval keep v."""
        omega, kappa = self.mf_omega, self.mf_kappa
        null = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if kappa == 0.0:
            u_null = self.velocity(model, x, s, Conditioning(cond.y, null))
            mixed = omega * v + (1 - omega) * u_null.to(v.dtype)
        else:
            two = lambda a: torch.cat([a, a])
            out = self.velocity(model, two(x), two(s), Conditioning(two(cond.y), torch.cat([~null, null])))  # (2N, ...)
            u_cond, u_null = out.to(v.dtype).chunk(2)
            mixed = omega * v + kappa * u_cond + (1 - omega - kappa) * u_null
        lo, hi = self.mf_guidance_interval
        active = (s >= lo) & (s <= hi)
        if cond.drop_mask is not None:
            active = active & ~cond.drop_mask
        return torch.where(_expand(active, v), mixed, v)

    def target(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, cond: Conditioning = UNCONDITIONAL
    ) -> Tensor:
        """The target sg(v + (t - s) d/ds u(x, s, t)) at x of time s."""
        duds = self.total_derivative(model, x, s, t, v, cond)
        return (v + _expand(t - s, v) * duds.to(v.dtype)).detach()

    def row_losses(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, cond: Conditioning, k: int
    ) -> tuple[Tensor, Tensor]:
        """u(x_s, s, t) regressed on the (guided) target; on the rows with s = t that is v, flow matching's."""
        if self.guided:
            v = self.guided_velocity(model, x, s, v, cond)
        target = v
        if k > 0:
            target = torch.cat([self.target(model, x[:k], s[:k], t[:k], v[:k], cond.head(k)), v[k:]])
        pred = _call(model, x, s, t - s, cond)
        return adaptive_loss(pred, target, self.mf_weight_power, self.mf_weight_eps)
