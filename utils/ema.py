"""Exponential moving average (EMA) of a model's weights, updated on the device without host syncs."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from utils.device import unwrap_model


class EMA:
    """ema <- decay_n * ema + (1 - decay_n) * weights; buffers copied. Warmup: decay_n = min(decay, (1 + n) / (10 + n)),
    n the updates so far, so the random initialisation does not dominate the early average."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        device = next(self.model.parameters()).device
        self.updates = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def num_updates(self) -> int:
        """Updates applied so far (a host sync; skipped updates do not count)."""
        return int(self.updates.item())

    @torch.no_grad()
    def update(self, model: nn.Module, mask: torch.Tensor | None = None) -> None:
        """Move the average toward model's weights; a 0-d bool mask that is False skips the update."""
        n = self.updates
        decay = torch.clamp((1 + n) / (10 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
        weight = 1.0 - decay
        if mask is not None:
            weight = weight * mask
        self.updates += 1 if mask is None else mask
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in unwrap_model(model).parameters()]
        # ema + w * (p - ema) with w a 0-d device tensor: _foreach_mul_'s Tensor overload keeps the skip
        # decision on the device (_foreach_lerp_ would turn w into a Python scalar, a host sync per step).
        diff = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(diff, weight.to(ema_params[0].dtype))
        torch._foreach_add_(ema_params, diff)
        for ema_b, b in zip(self.model.buffers(), unwrap_model(model).buffers(), strict=True):
            ema_b.copy_(b)
