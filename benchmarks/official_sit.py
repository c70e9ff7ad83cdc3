"""The official SiT (willisma/SiT ``models.py``) and REPA's SiT (sihyun-yu/REPA ``models/sit.py``), kept as references
for ``import_weights.py``: its tests save these networks' state dicts and compare the imported velocity with them.

Both are DiT's network (``benchmarks/official_dit.py``, the same timm ``Attention``, ``Mlp`` and ``PatchEmbed``) with t
in [0, 1] fed unscaled to the sinusoidal embedding. SiT: x_t = t x1 + (1 - t) noise; ``learn_sigma`` doubles the
output channels and ``forward`` drops the second half; ``forward_with_cfg`` guides the first three channels only.
REPA: no learned sigma, projector MLPs on the hidden state after block ``encoder_depth`` (``forward`` returns the
output and their features), an optional timm qk-norm, and the reversed time x_t = (1 - t) x + t noise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention

from benchmarks.official_dit import OfficialDiT


class OfficialSiT(OfficialDiT):
    """SiT as in willisma/SiT: DiT with an unscaled time and the learned-sigma half dropped in ``forward``."""

    def __init__(self, learn_sigma: bool = True, **kwargs):
        super().__init__(learn_sigma=learn_sigma, **kwargs)

    def features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == getattr(self, "encoder_depth", -1):
                zs = [p(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1) for p in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), c, zs

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.features(x, t, y)[0]
        if self.learn_sigma:
            x, _ = x.chunk(2, dim=1)
        return x

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """SiT's guidance, verbatim: x and y hold 2N rows (the conditional half, then the null half)."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]  # "for exact reproducibility": three channels
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class OfficialREPA(OfficialSiT):
    """REPA's SiT: ``forward`` returns (output, projector features); time 0 is data, 1 is noise."""

    def __init__(
        self,
        encoder_depth: int = 8,
        z_dims: tuple[int, ...] = (768,),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        **kwargs,
    ):
        super().__init__(learn_sigma=False, **kwargs)
        hidden, heads = self.pos_embed.shape[-1], self.num_heads
        self.encoder_depth = encoder_depth
        self.projectors = nn.ModuleList([build_mlp(hidden, projector_dim, z) for z in z_dims])
        if qk_norm:  # timm's qk-norm: LayerNorm with weight and bias on each head's queries and keys
            for block in self.blocks:
                block.attn = Attention(hidden, num_heads=heads, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
        x, _, zs = self.features(x, t, y)
        return x, zs
