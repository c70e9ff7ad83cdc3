"""The optimizer update with on-device skipping of non-finite steps, and device-side training statistics.

A step whose loss or gradient norm is not finite must leave the weights, the optimizer's moments and the
EMA exactly as they were. Deciding with ``loss.item()`` would stall the GPU on every step, so the decision
stays on the device: fused AdamW takes it as ``found_inf`` (the mechanism torch.amp.GradScaler uses) and
its kernel then changes nothing, and the EMA update is multiplied by the same mask (utils/ema.py).
Statistics accumulate in device tensors and are read back once per logging interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def build_adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW, fused where torch supports it for these parameters (CUDA, and the CPU since torch 2.4)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def guarded_step(
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    loss: torch.Tensor,
    max_norm: float = float("inf"),
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """After loss.backward(): clip gradients, step unless the loss or gradient norm is non-finite, zero grads.

    agree maps the local 0-d bool ``ok`` to the one all processes share (DDP: an all-reduce with min).
    Returns ok (0-d bool) and the gradient norm before clipping (0-d), both on the device. With fused AdamW
    nothing here waits for the device; a non-fused optimizer needs one host sync to decide.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    if agree is not None:
        ok = agree(ok)
    if opt.defaults.get("fused"):
        opt.found_inf = (~ok).float()  # the fused kernel skips the whole update (weights, moments, step count)
        opt.step()
    elif ok.item():
        opt.step()
    opt.zero_grad(set_to_none=True)
    return ok, grad_norm


class StepStats:
    """Training statistics kept on the device: per-interval loss and grad-norm sums, skipped steps, and the
    longest run of consecutive non-finite steps; ``read`` is the one host sync."""

    def __init__(self, device: torch.device | str):
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)
        self.loss_sum, self.gnorm_sum, self.good = zero(), zero(), zero()
        self.skipped, self.streak, self.worst_streak = zero(), zero(), zero()

    def update(self, ok: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Count one step: its loss (N,) or () and grad norm enter the sums only if ok."""
        bad = (~ok).double()
        self.loss_sum += torch.where(ok, loss.detach().double(), 0.0)
        self.gnorm_sum += torch.where(ok, grad_norm.detach().double(), 0.0)
        self.good += 1 - bad
        self.skipped += bad
        self.streak.mul_(bad).add_(bad)  # +1 on a bad step, back to 0 on a good one
        torch.maximum(self.worst_streak, self.streak, out=self.worst_streak)

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Means over the interval since the last read (summed over processes by reduce), then reset them.

        Returns loss (nan if no step was good), grad_norm, good_steps, skipped (since construction) and
        worst_streak (the longest run of non-finite steps since construction).
        """
        sums = torch.stack([self.loss_sum, self.gnorm_sum, self.good])
        if reduce is not None:
            sums = reduce(sums)
        loss_sum, gnorm_sum, good, skipped, worst = torch.cat(
            [sums, torch.stack([self.skipped, self.worst_streak])]
        ).tolist()
        for t in (self.loss_sum, self.gnorm_sum, self.good):
            t.zero_()
        return {
            "loss": loss_sum / good if good else float("nan"),
            "grad_norm": gnorm_sum / good if good else float("nan"),
            "good_steps": good,
            "skipped": skipped,
            "worst_streak": worst,
        }
