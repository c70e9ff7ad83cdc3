"""What a DiT costs: parameters and the multiply-accumulates of a forward pass, counted as in the DiT paper."""

from __future__ import annotations

import torch.nn as nn

from models.dit import DiT


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def forward_macs(model: DiT) -> int:
    """Multiply-accumulates of a forward pass per image: every matmul, no element-wise work (DiT's Table 4)."""
    d, p, c = model.hidden_size, model.patch_size, model.in_channels
    tokens = model.num_patches + model.num_prefix  # patches, registers and in-context class tokens
    mlp_weights = sum(m.weight.numel() for m in model.blocks[0].mlp.modules() if isinstance(m, nn.Linear))
    freq = model.t_embedder.frequency_embedding_size
    per_block = (
        tokens * d * 3 * d  # qkv projection
        + 2 * tokens * tokens * d  # q k^T and attention-weighted values
        + tokens * d * d  # output projection
        + tokens * mlp_weights  # MLP (GELU: two matrices; SwiGLU: three)
        + d * 6 * d  # adaLN modulation
    )
    embed = model.num_patches * c * p * p * d + freq * d + d * d  # patches, time MLP
    if model.h_embedder is not None:
        embed += freq * d + d * d  # MeanFlow's interval MLP
    final = model.num_patches * d * p * p * model.out_channels + d * 2 * d
    return len(model.blocks) * per_block + embed + final


def forward_flops(model: DiT) -> int:
    """Forward FLOPs per image (2 per multiply-accumulate); a training step costs about 3x this."""
    return 2 * forward_macs(model)
