"""The flow-matching objective, and the project's one statement of its time convention: t = 0 is noise
x0 ~ N(0, I), t = 1 is data x1, on the linear path (rectified flow, Liu et al. 2023; conditional flow matching,
Lipman et al. 2023, Tong et al. 2024) of optional width sigma, as in torchcfm, which builds x_t and u_t:

    x_t = t * x1 + (1 - t) * x0 + sigma * eps,        eps ~ N(0, I)
    u_t = x1 - x0                                     (the regression target, dx_t/dt)

The network v(x_t, t, y) predicts u_t; sampling integrates dx/dt = v from t = 0 to t = 1. Logit-normal times (SD3,
Esser et al. 2024) put more training signal mid-path, where the velocity is hardest to predict. The velocity-direction
loss (LightningDiT) adds w (1 - cos(v_pred, u_t)), the right direction at every magnitude; its large gradient at the
untrained network's zero output is bounded by --grad-clip (on by default)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from objectives.base import LossTerms, Objective
from utils.config import arg


def sample_t(
    n: int, sampler: str = "logit-normal", mean: float = 0.0, std: float = 1.0, device: str | torch.device = "cpu"
) -> Tensor:
    """Training times t (n,) in (0, 1): logit-normal (SD3: sigmoid(mean + std * N(0, 1))) or uniform."""
    if sampler == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(mean + std * torch.randn(n, device=device))


@dataclass(kw_only=True)
class FlowMatching(Objective):
    """Conditional flow matching on torchcfm's linear path; ``ot`` (OT-CFM, Tong et al. 2024) re-pairs rows of x1."""

    sigma: float = arg(0.0, "Gaussian width of the probability path (0: straight lines)", min=0, group="objective")
    t_sampler: str = arg("logit-normal", "training time distribution", choices=("logit-normal", "uniform"))
    t_mean: float = arg(0.0, "logit-normal location m in t = sigmoid(m + s n) (SD3)")
    t_std: float = arg(1.0, "logit-normal scale s in t = sigmoid(m + s n) (SD3)", gt=0)
    ot: bool = arg(False, "exact minibatch OT pairing (OT-CFM)")
    # None: the value of train.py's --recipe (0 without one).
    cosine_loss_weight: float | None = arg(
        None,
        "weight w of the velocity-direction loss w (1 - cos(v_pred, u_t)) "
        "(LightningDiT); default: the recipe's (0 for dit)",
        min=0,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # torchcfm (and POT, scikit-learn under it) load here, not at import: ``train.py --help`` needs none of them.
        from torchcfm.conditional_flow_matching import (
            ConditionalFlowMatcher,
            ExactOptimalTransportConditionalFlowMatcher,
        )

        matcher = ExactOptimalTransportConditionalFlowMatcher if self.ot else ConditionalFlowMatcher
        self.matcher = matcher(sigma=self.sigma)

    def sample_path(
        self, x1: Tensor, y: Tensor | None = None, x0: Tensor | None = None, t: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """t (N,), x_t, u_t (N, C, H, W) and each row's labels (re-paired under OT); x0 and t drawn unless given."""
        if x0 is None:
            x0 = torch.randn_like(x1)
        if t is None:
            t = sample_t(x1.shape[0], self.t_sampler, self.t_mean, self.t_std, device=x1.device)
        if self.ot:
            # y0=None: the noise has no label; y1 follows its image through the OT resampling.
            t, xt, ut, _, y = self.matcher.guided_sample_location_and_conditional_flow(x0, x1, y0=None, y1=y, t=t)
        else:
            t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1, t=t)
        return t, xt, ut, y

    def loss(self, model: Callable[..., Tensor], x1: Tensor, y: Tensor | None = None) -> LossTerms:
        """MSE of model(x_t, t, y) against u_t in float32, plus the weighted velocity-direction loss (not logged)."""
        t, xt, ut, y = self.sample_path(x1, y)
        pred, target = model(xt, t, y).float().flatten(1), ut.float().flatten(1)  # (N, C * H * W)
        mse = (pred - target).square().mean(1)  # (N,)
        loss = mse.mean()
        if self.cosine_loss_weight:
            loss = loss + self.cosine_loss_weight * cosine_loss(pred, target).mean()
        return LossTerms(loss, mse.detach(), t)


def cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - cos(pred, target) (N,) per row of pred and target (N, D): 0 when aligned, 2 when opposite."""
    return 1 - F.cosine_similarity(pred, target, dim=1)
