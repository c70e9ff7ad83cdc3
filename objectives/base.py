"""A training objective: a config of its own flags whose ``loss(net, x1, y)`` returns ``LossTerms``;
``network_options()`` and ``sample_method`` tell the rest of the project what it needs, so nothing else names it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from utils.config import Config


class LossTerms(NamedTuple):
    """The scalar to minimise and, for logging, each sample's squared error (N,) and time (N,), on the device, and
    REPA's alignment term (0-d; None without REPA)."""

    loss: Tensor
    mse: Tensor
    t: Tensor
    align: Tensor | None = None


@dataclass(kw_only=True)
class Objective(Config):
    """Base of the training objectives; subclasses add their flags as ``utils.config.arg`` fields."""

    sample_method: ClassVar[str] = "heun"  # a fixed-grid solver of sampling/solvers.py

    def network_options(self) -> dict[str, Any]:
        """DiT constructor arguments this objective needs beyond the model flags (none by default)."""
        return {}

    def loss(self, net: Callable[..., Tensor], x1: Tensor, y: Tensor | None = None) -> LossTerms:
        """The loss for data x1 (N, C, H, W) with labels y (N,) (None: unconditional)."""
        raise NotImplementedError
