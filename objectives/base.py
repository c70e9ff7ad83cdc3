"""What every training objective is: a config of its own flags with a ``loss`` that returns ``LossTerms``.

An objective is one file in objectives/ and one line in ``objectives.OBJECTIVES``. Its dataclass fields are its
command-line flags (``python train.py --objective NAME --help`` lists them) and are checked when it is made, its
cross-field checks go in ``__post_init__``, and three class-level answers tell the rest of the project what it
needs, so that nothing outside its file spells its name:
- ``loss(net, x1, y)``: the scalar to minimise and its per-sample parts (``LossTerms``), for data x1 and labels y.
- ``network_options()``: extra DiT constructor arguments (e.g. an interval input, how t is embedded).
- ``sample_method``: the solver its models are sampled with by default (periodic samples, FID, sampler.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from utils.config import Config


class LossTerms(NamedTuple):
    """An objective's loss: the scalar to minimise, and for logging the per-sample squared error (N,) and the
    time (N,) each sample was drawn at (all on the device: reading them back is the caller's choice)."""

    loss: torch.Tensor
    mse: torch.Tensor
    t: torch.Tensor


@dataclass(kw_only=True)
class Objective(Config):
    """Base of the training objectives; subclasses add their flags as ``utils.config.arg`` fields."""

    sample_method: ClassVar[str] = "heun"  # a fixed-grid solver of sampling/solvers.py

    def network_options(self) -> dict[str, Any]:
        """DiT constructor arguments this objective needs beyond the model flags (none by default)."""
        return {}

    def loss(self, net: Callable[..., torch.Tensor], x1: torch.Tensor, y: torch.Tensor | None = None) -> LossTerms:
        """The loss for data x1 (N, C, H, W) with labels y (N,) (None for an unconditional network)."""
        raise NotImplementedError
