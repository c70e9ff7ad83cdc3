"""Representation alignment (REPA, Yu et al. 2025): a flow objective's loss plus ``weight`` times the negative cosine
similarity between the DiT's projected patch tokens after block --repa-depth (``DiT(..., align=True)``) and a frozen
encoder's features of the clean image, averaged over tokens and batch, in float32 (fp16 normalisation overflows)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.config import network_size
from models.encoder import load_encoder
from objectives.base import LossTerms, Objective
from utils.config import ConfigError, short_reason


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """-cos between projected tokens (B, T, D) and target tokens (B, T, D) or vectors (B, D) (then the projected
    tokens' mean), averaged: -1 aligned up to scale, 0 orthogonal."""
    projected = projected.float() if target.dim() == 3 else projected.float().mean(1)
    return -F.cosine_similarity(projected, target.float(), dim=-1).mean()


def match_grid(tokens: Tensor, grid: int) -> Tensor:
    """Tokens (B, N, D) of a square grid resampled to grid x grid (row-major): block means ("area") when shrinking,
    bilinear when growing."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the encoder gives {n} tokens, not a square grid")
    if side == grid:
        return tokens
    maps = tokens.transpose(1, 2).reshape(b, d, side, side).float()
    resample = dict(mode="area") if side > grid else dict(mode="bilinear", align_corners=False)
    maps = F.interpolate(maps, size=(grid, grid), **resample)
    return maps.flatten(2).transpose(1, 2)  # (B, grid * grid, D)


class RepresentationAlignment:
    """An objective's loss plus REPA's; ``loss(..., images=None)`` (after --repa-until) adds a zero term that keeps
    the projector in the graph, so that DDP still finds a gradient for every parameter."""

    def __init__(self, objective: Objective, encoder: nn.Module, weight: float, grid: int):
        self.objective, self.encoder, self.weight, self.grid = objective, encoder, weight, grid
        self.sample_method = objective.sample_method

    def network_options(self) -> dict:
        return self.objective.network_options()

    def loss(self, net: Callable, x1: Tensor, y: Tensor | None = None, images: Tensor | None = None) -> LossTerms:
        """The objective's loss on x1 plus the alignment of its network call with the encoder's view of images
        (B, C, H, W) in [0, 1]."""
        projected = []

        def velocity(*args, **kwargs) -> Tensor:
            out, tokens = net(*args, align=True, **kwargs)
            projected.append(tokens)
            return out

        terms = self.objective.loss(velocity, x1, y)
        if images is None:
            return terms._replace(loss=terms.loss + 0.0 * projected[0].float().mean())
        with torch.no_grad():
            target = self.encoder(images)
        if target.dim() == 3:
            target = match_grid(target, self.grid)
        align = alignment_loss(projected[0], target)
        return terms._replace(loss=terms.loss + self.weight * align, align=align.detach())


def representation_alignment(
    cfg: Any, objective: Objective, side: int, device: torch.device
) -> tuple[RepresentationAlignment, dict[str, int]]:
    """--repa-*: the objective with REPA's loss, and the DiT arguments of its projector, for data side x side; the
    encoder is loaded and tried on two blank images first, so bad input fails with one line before anything is written."""
    name, grid = cfg.repa_encoder, side // network_size(cfg)[2]
    if cfg.objective != "flow":
        raise ConfigError("--repa-weight needs --objective flow (MeanFlow and iMF call the network inside a JVP)")
    encoder = load_encoder(name, grid, device)
    try:
        with torch.no_grad():
            features = encoder(torch.zeros(2, cfg.channels, cfg.image_size, cfg.image_size, device=device))
        if features.dim() not in (2, 3) or features.shape[0] != 2:
            raise ValueError(f"it maps 2 images to {tuple(features.shape)}, not tokens (B, N, D) or vectors (B, D)")
        if features.dim() == 3:
            match_grid(features, grid)
    except Exception as e:
        raise ConfigError(
            f"--repa-encoder {name} on {cfg.channels}-channel {cfg.image_size}px images: {short_reason(e, 200)}"
        ) from None
    options = dict(repa_depth=cfg.repa_depth, repa_dim=features.shape[-1], repa_projector_dim=cfg.repa_projector_dim)
    return RepresentationAlignment(objective, encoder, cfg.repa_weight, grid), options
