"""The training step: the optimizer update that skips non-finite steps on the device, and device-side statistics.
No ``loss.item()`` (a stall per step): fused AdamW takes the decision as ``found_inf`` (as torch.amp.GradScaler
does), the EMA update is multiplied by it, and under DDP it is all-reduced so every process skips the same steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from utils.device import autocast, module_device_dtype, unwrap_model
from utils.distributed import all_reduce_
from utils.ema import EMA


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
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: Tensor, max_norm: float = float("inf")
) -> tuple[Tensor, Tensor]:
    """After backward: clip, step unless the loss or gradient norm is non-finite on any process, zero the gradients.
    Returns ok (0-d bool) and the unclipped gradient norm on the device (a non-fused optimizer needs a host sync)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    ok = all_reduce_(ok.to(torch.int32), "min").bool()  # every process takes or skips the step
    if opt.defaults.get("fused"):
        opt.found_inf = (~ok).float()  # the fused kernel skips the whole update (weights, moments, step count)
        opt.step()
    elif ok.item():
        opt.step()
    opt.zero_grad(set_to_none=True)
    return ok, grad_norm


class StepStats:
    """Per-interval sums on the device, skipped steps and the longest non-finite run; ``read`` is the one host sync."""

    def __init__(self, device: torch.device | str, bins: int = 8):
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.bins = bins
        self.sums = zeros(4)  # loss, grad norm, good steps, REPA's alignment loss (this interval)
        self.by_t = zeros(2, bins)  # per bin of t: summed per-sample loss, samples (this interval)
        self.skipped, self.streak, self.worst_streak = zeros(), zeros(), zeros()

    def update(self, ok: Tensor, mse: Tensor, t: Tensor, grad_norm: Tensor, align: Tensor | None = None) -> None:
        """Count one step: its per-sample losses (N,) at times t (N,), grad norm and alignment loss enter the sums
        only if ok."""
        good = ok.double()
        mse = torch.where(ok, mse.detach().double(), 0.0)
        align = torch.where(ok, align.double(), 0.0) if align is not None else torch.zeros_like(good)
        self.sums += torch.stack([mse.mean(), torch.where(ok, grad_norm.detach().double(), 0.0), good, align])
        bin_of = (t.detach() * self.bins).long().clamp_(0, self.bins - 1)
        self.by_t[0].index_add_(0, bin_of, mse)
        self.by_t[1].index_add_(0, bin_of, good.expand_as(mse))
        self.skipped += 1 - good
        self.streak.mul_(1 - good).add_(1 - good)  # +1 on a bad step, back to 0 on a good one
        torch.maximum(self.worst_streak, self.streak, out=self.worst_streak)

    def read(self) -> dict[str, float | list[float]]:
        """Means since the last read over every process (nan where none), then reset; skipped and worst_streak total."""
        sums = all_reduce_(torch.cat([self.sums, self.by_t.flatten()]))
        (loss, gnorm, good, align), (bin_loss, bin_count) = sums[:4].tolist(), sums[4:].view(2, -1).tolist()
        self.sums.zero_()
        self.by_t.zero_()
        nan = float("nan")
        return {
            "loss": loss / good if good else nan,
            "grad_norm": gnorm / good if good else nan,
            "align": align / good if good else nan,
            "loss_by_t": [s / c if c else nan for s, c in zip(bin_loss, bin_count, strict=True)],
            "good_steps": good,
            "skipped": self.skipped.item(),
            "worst_streak": self.worst_streak.item(),
        }


def learning_rate(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps (``step`` 0-based), then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


class TrainStep:
    """Loss under autocast, backward, the guarded update, EMA and statistics, without a host sync."""

    def __init__(
        self,
        net: torch.nn.Module,
        objective: Any,
        optimizer: torch.optim.Optimizer,
        ema: EMA,
        stats: StepStats,
        precision: str,
        grad_clip: float = 0.0,
    ):
        self.net, self.objective, self.optimizer, self.ema, self.stats = net, objective, optimizer, ema, stats
        self.model = unwrap_model(net)
        self.device = module_device_dtype(self.model)[0]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.precision, self.max_norm = precision, grad_clip or math.inf

    def __call__(
        self,
        x: Tensor,
        y: Tensor | None,
        lr: float,
        mark: Callable[[], None] | None = None,
        images: Tensor | None = None,
    ) -> Tensor:
        """One step; returns whether it was taken (0-d bool on the device). ``mark`` is called after each phase;
        images: the clean images REPA's encoder sees (None: no alignment this step)."""
        mark = mark or (lambda: None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision):
            terms = self.objective.loss(self.net, x, y, **({} if images is None else {"images": images}))
        mark()
        terms.loss.backward()
        mark()
        ok, grad_norm = guarded_step(self.optimizer, self.params, terms.loss, self.max_norm)
        self.ema.update(self.model, mask=ok)
        self.stats.update(ok, terms.mse, terms.t, grad_norm, terms.align)
        mark()
        return ok
