"""SwiGLU, RMSNorm and RoPE, the block parts of LightningDiT (Yao et al. 2025) and JiT (Li & He 2025), and the
registries the DiT picks its blocks from. RoPE (Su et al. 2021) rotates each query and key channel pair by an
angle proportional to the token's position, so q_i . k_j depends on positions only through i - j; the 2-D axial form
(after EVA-02) gives half of each head's pairs the row, half the column. Plain tensor operations (no complex
numbers, no fused kernel) keep torch.compile, bf16 autocast and MeanFlow's forward-mode JVP working through it."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def swiglu_width(hidden_dim: int, multiple_of: int = 8) -> int:
    """2/3 of the GELU MLP's width, to a multiple: three matrices for two keep the parameters (LLaMA, LightningDiT)."""
    return max(multiple_of, multiple_of * round(2 * hidden_dim / 3 / multiple_of))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, as in DiT."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated MLP w3(SiLU(x W1) * x W2) (Shazeer 2020, "GLU Variants Improve Transformer"); W1 and W2 in one matrix."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        width = swiglu_width(hidden_dim)
        self.w12 = nn.Linear(dim, 2 * width)
        self.w3 = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # each (N, T, width)
        return self.w3(F.silu(gate) * value)  # (N, T, D)


# name -> MLP class (dim, hidden_dim): the --mlp choices. A new MLP is a class here and a line below.
MLPS: dict[str, Callable[[int, int], nn.Module]] = {"gelu": Mlp, "swiglu": SwiGLU}
# name -> norm (dim), without learned affine parameters (adaLN supplies shift and scale): the --norm choices.
# RMSNorm (Zhang & Sennrich 2019) skips LayerNorm's mean subtraction.
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "layernorm": partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6),
    "rmsnorm": partial(nn.RMSNorm, elementwise_affine=False, eps=1e-6),
}


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Angles (T, head_dim / 2), float64, at positions (T, 2): the first half of the pairs turn with the row."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    axis_pairs = head_dim // 4
    freqs = theta ** (-torch.arange(axis_pairs, dtype=torch.float64) / axis_pairs)  # (Dh / 4,)
    positions = positions.to(torch.float64)
    return torch.cat([positions[:, :1] * freqs, positions[:, 1:] * freqs], dim=1)  # (T, Dh / 2)


def rope_tables(grid_size: int, head_dim: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """cos and sin (num_prefix + G * G, head_dim / 2) float32, prefix first, patches row-major. The prefix has no
    place in the image: angle 0, so it meets every patch through the same vectors (as in JiT)."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = rope_angles(torch.stack([rows.flatten(), cols.flatten()], dim=1), head_dim)  # (G * G, Dh / 2)
    angles = torch.cat([angles.new_zeros(num_prefix, head_dim // 2), angles])  # (P + G * G, Dh / 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (N, H, T, Dh), channel pairs (2i, 2i + 1) rotated in float32 at least, in x's dtype (bf16 for flash)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype)[..., 0::2], x.to(dtype)[..., 1::2]  # each (N, H, T, Dh / 2)
    cos, sin = cos.to(dtype), sin.to(dtype)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (N, H, T, Dh / 2, 2)
    return out.flatten(-2).to(x.dtype)  # (N, H, T, Dh)
