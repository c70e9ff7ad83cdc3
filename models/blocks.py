"""The block parts that LightningDiT and JiT swap into a DiT: SwiGLU MLP, RMSNorm, 2-D axial RoPE.

LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation", Table 1) adds them one at a time to a DiT-XL/2 and
each lowers FID: SwiGLU 12.52 -> 10.10, RMSNorm -> 9.25, RoPE -> 7.13; JiT (Li & He 2025, "Back to Basics") uses
the same three. ``models/dit.py`` chooses between these and DiT's originals by constructor arguments whose defaults
are DiT's, so a checkpoint written before them rebuilds unchanged.

RoPE (Su et al. 2021, "RoFormer") rotates each pair of query and key channels by an angle proportional to the
token's position, so that q_i . k_j depends on the positions only through their offset i - j. The 2-D axial form
(as in LightningDiT and JiT, after EVA-02) gives half of each head's pairs the row index and the other half the
column index. It is written with plain tensor operations (no complex numbers, no fused kernel), so that
torch.compile, bf16 autocast and the forward-mode JVP of MeanFlow (``torch.func.jvp``) all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


def swiglu_width(hidden_dim: int, multiple_of: int = 8) -> int:
    """SwiGLU's hidden width for a GELU MLP of width hidden_dim: 2/3 of it (three matrices instead of two, so the
    parameters stay those of the GELU MLP; LLaMA, LightningDiT), rounded to the nearest multiple of multiple_of."""
    return max(multiple_of, multiple_of * round(2 * hidden_dim / 3 / multiple_of))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, as in DiT."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated MLP w3(SiLU(x W1) * x W2) (Shazeer 2020, "GLU Variants Improve Transformer"); W1 and W2 in one matrix."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        width = swiglu_width(hidden_dim)
        self.w12 = nn.Linear(dim, 2 * width)
        self.w3 = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (T, head_dim / 2), float64, of tokens at 2-D positions (T, 2) (row, column): the first
    head_dim / 4 channel pairs turn with the row, the rest with the column, at frequencies theta^(-2k / (head_dim / 2))."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    axis_pairs = head_dim // 4
    freqs = theta ** (-torch.arange(axis_pairs, dtype=torch.float64) / axis_pairs)  # (Dh / 4,)
    positions = positions.to(torch.float64)
    return torch.cat([positions[:, :1] * freqs, positions[:, 1:] * freqs], dim=1)  # (T, Dh / 2)


def rope_tables(grid_size: int, head_dim: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (num_prefix + G * G, head_dim / 2), float32, for num_prefix position-less tokens (registers,
    in-context class tokens) followed by a G x G grid of patch tokens in the patch embedding's row-major order.

    The prefix tokens get angle 0, the identity rotation: they have no place in the image, and RoPE leaves their
    queries and keys as they are, so the scores between patches stay functions of their offsets alone and a
    prefix token reads and is read by every patch through the same vectors wherever the patch lies (as JiT does
    for its in-context tokens)."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = rope_angles(torch.stack([rows.flatten(), cols.flatten()], dim=1), head_dim)  # (G * G, Dh / 2)
    angles = torch.cat([angles.new_zeros(num_prefix, head_dim // 2), angles])  # (P + G * G, Dh / 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2i, 2i + 1) of x (N, H, T, Dh) by the angles whose cos and sin (T, Dh / 2) are given.

    Computed in at least float32 and returned in x's dtype (bf16 under autocast, for the flash kernel)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype)[..., 0::2], x.to(dtype)[..., 1::2]  # each (N, H, T, Dh / 2)
    cos, sin = cos.to(dtype), sin.to(dtype)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (N, H, T, Dh / 2, 2)
    return out.flatten(-2).to(x.dtype)  # (N, H, T, Dh)
