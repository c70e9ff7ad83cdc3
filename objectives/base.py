"""What every training objective is: a config of its own flags (``--objective NAME --help`` lists them) whose
``loss(net, x1, y)`` returns ``LossTerms``. Cross-field checks go in ``__post_init__``; ``network_options()`` (extra
DiT arguments) and ``sample_method`` (the default solver) tell the rest of the project what it needs, so that nothing
outside its file spells its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from utils.config import Config


class LossTerms(NamedTuple):
    """The scalar to minimise and, for logging, each sample's squared error (N,) and time (N,), on the device."""

    loss: Tensor
    mse: Tensor
    t: Tensor


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
