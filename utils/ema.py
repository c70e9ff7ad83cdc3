"""Exponential moving average (EMA) of a model's weights, updated on the device without host syncs."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from utils.checkpoint import unwrap_model


class EMA:
    """An EMA copy of a model: ema <- decay_n * ema + (1 - decay_n) * weights after every update.

    With warmup, decay_n = min(decay, (1 + n) / (10 + n)) where n counts the updates applied so far, so
    the average is not dominated by the random initialisation early in training. Buffers are copied.
    The counter n lives on the model's device so that a masked (skipped) update needs no host sync.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        device = next(self.model.parameters()).device
        self._num_updates = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def num_updates(self) -> int:
        """Updates applied so far (a host sync; skipped updates do not count)."""
        return int(self._num_updates.item())

    def _decay(self) -> torch.Tensor:
        if not self.warmup:
            return torch.full_like(self._num_updates, self.decay)
        n = self._num_updates
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, mask: torch.Tensor | None = None) -> None:
        """Move the average toward model's weights; a 0-d bool mask that is False skips the update."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in unwrap_model(model).parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: model does not have the EMA's parameters")
        weight = 1.0 - self._decay()
        if mask is not None:
            weight = weight * mask
            self._num_updates += mask
        else:
            self._num_updates += 1
        # ema + w * (p - ema) with w a 0-d device tensor: _foreach_mul_'s Tensor overload keeps the skip
        # decision on the device (_foreach_lerp_ would turn w into a Python scalar, a host sync per step).
        diff = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(diff, weight.to(ema_params[0].dtype))
        torch._foreach_add_(ema_params, diff)
        for ema_b, b in zip(self.model.buffers(), unwrap_model(model).buffers(), strict=True):
            ema_b.copy_(b)

    # The checkpoint keys this class owns: "ema" holds the averaged weights as a plain model state dict, so
    # that utils.checkpoint.model_from_checkpoint(ckpt) builds the EMA model from a checkpoint directly.
    STATE_KEYS = ("ema", "ema_num_updates")

    def state_dict(self) -> dict[str, Any]:
        """{"ema": the averaged weights (a plain model state dict), "ema_num_updates": updates applied (int)}.

        Stored as is at the top level of a training checkpoint (``checkpoint.update(ema.state_dict())``).
        """
        return {"ema": self.model.state_dict(), "ema_num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; ValueError for missing or unknown keys."""
        if set(state) != set(self.STATE_KEYS):
            raise ValueError(f"EMA state must have exactly the keys {', '.join(self.STATE_KEYS)}; got {sorted(state)}")
        self.model.load_state_dict(state["ema"])
        self._num_updates.fill_(float(state["ema_num_updates"]))
