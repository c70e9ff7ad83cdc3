"""DiT (Peebles & Xie 2023) predicting a flow-matching velocity, with registers, qk-norm and optional
LightningDiT / JiT parts (models/blocks.py). ``time_scale`` multiplies t and h before the sinusoids: DiT's 1000 matches
its integer timesteps; an objective whose target holds the network's time derivative asks for 1, since sinusoids of
t * 1000 make that derivative large."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from models.blocks import MLPS, NORMS, apply_rope, rope_tables


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens x (N, T, D) by per-sample shift and scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Embeds continuous times t in [0, 1] (or interval lengths) into vectors through sinusoids and an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale  # 1000: DiT's integer timesteps (the module docstring says when 1)

    @staticmethod
    def timestep_embedding(
        t: Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Sinusoidal embedding (N, dim) of scalar times t (N,), computed in dtype (float32 or float64)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t.to(dtype)[:, None] * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        # float32 sinusoids for float32 / bf16 weights; float64 only for a float64 network (exact-derivative tests).
        freq_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        t_freq = self.timestep_embedding(t * self.time_scale, self.frequency_embedding_size, dtype=freq_dtype)
        return self.mlp(t_freq.to(dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; index num_classes is the learned null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: Tensor, drop_mask: Tensor | None = None) -> Tensor:
        if drop_mask is not None:  # (N,) bool: these labels become the null class
            labels = torch.where(drop_mask, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (N, D)


class PatchEmbed(nn.Module):
    """Splits an image (N, C, H, W) into p x p patches and projects each to a token (N, T, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        # qk-norm keeps attention logits bounded, which stabilises training at high learning rates.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Attention over tokens x (N, T, D); rope: cos and sin (T, Dh / 2) that rotate queries and keys (RoPE)."""
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, Dh)
        if self.qk_norm:
            # Weights in the activations' dtype: under bf16 autocast the fused RMSNorm kernel needs both alike.
            q = F.rms_norm(q, (self.head_dim,), self.q_norm.weight.to(q.dtype), self.q_norm.eps)
            k = F.rms_norm(k, (self.head_dim,), self.k_norm.weight.to(k.dtype), self.k_norm.eps)
        if rope is not None:  # after qk-norm, as in LightningDiT and JiT
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class DiTBlock(nn.Module):
    """A transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        mlp_type: str = "gelu",
        norm_type: str = "layernorm",
    ):
        super().__init__()
        self.norm1 = NORMS[norm_type](hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = NORMS[norm_type](hidden_size)
        self.mlp = MLPS[mlp_type](hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """The final adaLN layer that maps each patch token to p * p * C output values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_type: str = "layernorm"):
        super().__init__()
        self.norm_final = NORMS[norm_type](hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)  # (N, T, p * p * C)


class DiT(nn.Module):
    """Diffusion Transformer mapping (x, t, y) to the velocity dx/dt (or an average velocity)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        num_registers: int = 4,
        qk_norm: bool = True,
        average_velocity: bool = False,
        time_scale: float = 1000.0,
        guidance_max: float = 0.0,
        mlp_type: str = "gelu",
        norm_type: str = "layernorm",
        rope: bool = False,
        class_tokens: int = 0,
        learn_sigma: bool = False,
        reverse_time: bool = False,
        guidance_channels: int | None = None,
        repa_depth: int = 0,
        repa_dim: int = 0,
        repa_projector_dim: int = 2048,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if num_classes < 0 or num_registers < 0 or depth < 1 or in_channels < 1:
            raise ValueError("num_classes and num_registers must be >= 0; depth and in_channels >= 1")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if mlp_type not in MLPS or norm_type not in NORMS:
            raise ValueError(f"mlp_type must be one of {tuple(MLPS)} and norm_type one of {tuple(NORMS)}")
        if class_tokens < 0 or (class_tokens and num_classes == 0):
            raise ValueError("class_tokens must be >= 0, and 0 for an unconditional model (num_classes 0)")
        if repa_dim and not 1 <= repa_depth <= depth:
            raise ValueError(f"repa_depth must be in [1, depth {depth}], got {repa_depth}")
        if guidance_max and (guidance_max < 1.0 or num_classes == 0):
            raise ValueError(
                f"guidance_max must be 0 (no guidance input) or >= 1 on a class-conditional model, "
                f"got {guidance_max} with num_classes={num_classes}"
            )
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)  # DiT's learned variance, dropped in forward
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, mlp_ratio
        self.num_classes, self.class_dropout_prob, self.num_registers = num_classes, class_dropout_prob, num_registers
        self.qk_norm, self.average_velocity, self.time_scale = qk_norm, average_velocity, time_scale
        self.mlp_type, self.norm_type, self.rope, self.class_tokens = mlp_type, norm_type, rope, class_tokens
        self.num_prefix = class_tokens + num_registers  # tokens before the patches, dropped before the final layer
        self.guidance_max = guidance_max
        # Imported networks (import_weights.py): REPA's time runs from data (0) to noise (1), so velocity(x, t) =
        # -output(x, 1 - t); DiT and SiT guide the first 3 of 4 latent channels "for exact reproducibility".
        self.learn_sigma, self.reverse_time, self.guidance_channels = learn_sigma, reverse_time, guidance_channels
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.h_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale) if average_velocity else None
        # The guidance scale w in [1, guidance_max] as an input (improved MeanFlow), embedded as w / guidance_max.
        self.w_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale) if guidance_max else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        pos_embed = get_2d_sincos_pos_embed(hidden_size, self.grid_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos_embed).float().unsqueeze(0), persistent=False)
        # Register tokens (Darcet et al. 2024): extra learned tokens that attention can use as scratch space.
        self.registers = nn.Parameter(torch.zeros(1, num_registers, hidden_size)) if num_registers else None
        # In-context class tokens (JiT): the class embedding plus one learned embedding per token, (1, K, D).
        self.class_token_embed = nn.Parameter(torch.zeros(1, class_tokens, hidden_size)) if class_tokens else None
        if rope:  # cos and sin (P + T, Dh / 2) of the 2-D axial rotations, rebuilt from the config like pos_embed
            cos, sin = rope_tables(self.grid_size, hidden_size // num_heads, self.num_prefix)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        block = dict(mlp_ratio=mlp_ratio, qk_norm=qk_norm, mlp_type=mlp_type, norm_type=norm_type)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, **block) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_type=norm_type)
        self.initialize_weights()
        # REPA (Yu et al. 2025): an MLP from the patch tokens after block repa_depth to a frozen encoder's features,
        # trained with the network and unused when sampling; built last, so the network's own weights stay the same.
        self.repa_depth, self.repa_dim, self.repa_projector_dim = repa_depth, repa_dim, repa_projector_dim
        self.projector = None
        if repa_dim:
            width = repa_projector_dim
            self.projector = nn.Sequential(
                nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, repa_dim)
            )
            for layer in self.projector[::2]:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def config(self) -> dict:
        """Every constructor argument: DiT(**model.config) rebuilds the same network (checkpoints store it)."""
        names = [p for p in inspect.signature(DiT.__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.h_embedder, self.w_embedder):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=0.02)
        if self.class_token_embed is not None:
            nn.init.normal_(self.class_token_embed, std=0.02)
        # Zero-init adaLN modulation so each block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Zero-init the output layers (adaLN and linear) so the untrained network predicts exactly zero velocity.
        for param in self.final_layer.parameters():
            nn.init.zeros_(param)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Patch tokens (N, T, p * p * C) back to images (N, C, H, W)."""
        p = self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=self.grid_size, p=p, q=p)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | None = None,
        interval: Tensor | float | None = None,
        drop_mask: Tensor | None = None,
        guidance: Tensor | float | None = None,
        align: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity (N, C, H, W) at x (N, C, H, W), t (N,) or scalar, labels y (N,) (num_classes: the null class).
        interval: MeanFlow's h (None: 0); drop_mask (N,) bool: labels made null in any mode (None: ``label_drop_mask``);
        guidance in [1, guidance_max] (None: 1). align: also return REPA's projected patch tokens (N, T, repa_dim)."""
        n, t = x.shape[0], 1 - t if self.reverse_time else t
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        if self.registers is not None:
            x = torch.cat([self.registers.expand(n, -1, -1), x], dim=1)  # (N, R + T, D)
        c = self.t_embedder(torch.as_tensor(t, device=x.device).expand(n))  # (N, D)
        if self.h_embedder is not None:
            c = c + self.h_embedder(torch.as_tensor(0.0 if interval is None else interval, device=x.device).expand(n))
        if self.w_embedder is not None:  # other networks ignore guidance
            w = torch.as_tensor(1.0 if guidance is None else guidance, device=x.device).expand(n)
            c = c + self.w_embedder(w / self.guidance_max)
        if self.y_embedder is not None:
            if drop_mask is None and self.training:
                drop_mask = self.label_drop_mask(y)
            y_emb = self.y_embedder(y, drop_mask)  # (N, D); the null class where dropped
            c = c + y_emb
            if self.class_token_embed is not None:  # JiT's in-context class tokens, first in the sequence
                x = torch.cat([y_emb.unsqueeze(1) + self.class_token_embed, x], dim=1)  # (N, K + R + T, D)
        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        projected = None
        for i, block in enumerate(self.blocks, 1):
            x = block(x, c, rope)
            if align and i == self.repa_depth:
                projected = self.projector(x[:, self.num_prefix :])
        x = x[:, self.num_prefix :]  # class tokens and registers never reach the output: (N, T, D)
        x = self.unpatchify(self.final_layer(x, c))[:, : self.in_channels]  # (N, C, H, W)
        x = -x if self.reverse_time else x
        return (x, projected) if align else x

    def label_drop_mask(self, y: Tensor) -> Tensor:
        """(N,) bool: labels to replace by the null class, each with class_dropout_prob in train mode (none in eval)."""
        if self.training and self.class_dropout_prob > 0:
            return torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
        return torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)

    def forward_with_cfg(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor,
        cfg_scale: float,
        interval: Tensor | float | None = None,
        channels: int | None = None,
    ) -> Tensor:
        """v_u + cfg_scale * (v_c - v_u) (N, C, H, W) in one pass of 2N (of N at scale 1 or with a guidance input), on
        the first ``channels`` (None: ``guidance_channels``, None: all); the others keep v_c."""
        if self.y_embedder is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes > 0)")
        n = x.shape[0]
        keep = torch.zeros(n, dtype=torch.bool, device=x.device)
        if self.w_embedder is not None:
            return self(x, t, y, interval=interval, drop_mask=keep, guidance=cfg_scale)
        if cfg_scale == 1.0:
            return self(x, t, y, interval=interval, drop_mask=keep)
        t2 = torch.as_tensor(t, device=x.device).expand(n).repeat(2)
        h2 = None if interval is None else torch.as_tensor(interval, device=x.device).expand(n).repeat(2)
        out = self(torch.cat([x, x]), t2, y.repeat(2), interval=h2, drop_mask=torch.cat([keep, ~keep]))  # (2N, ...)
        v_cond, v_uncond = out.chunk(2, dim=0)
        guided, k = v_uncond + cfg_scale * (v_cond - v_uncond), self.guidance_channels if channels is None else channels
        return guided if k is None else torch.cat([guided[:, :k], v_cond[:, k:]], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of shape (grid_size * grid_size, embed_dim)."""
    pos = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(pos, pos), axis=0)  # (2, G, G); w goes first, as in MAE / DiT
    emb_h = _get_1d_sincos_pos_embed(embed_dim // 2, grid[0])
    emb_w = _get_1d_sincos_pos_embed(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)  # (G * G, D)


def _get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


# name -> (hidden_size, depth, num_heads). S/B/L/XL from the DiT paper; XS and T for CPU runs and tests.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (1152, 28, 16),
    "L": (1024, 24, 16),
    "B": (768, 12, 12),
    "S": (384, 12, 6),
    "T": (192, 12, 3),
    "XS": (128, 4, 4),
}


def _make_config(size: str, patch_size: int) -> Callable[..., DiT]:
    hidden_size, depth, num_heads = DIT_SIZES[size]

    def build(**kwargs) -> DiT:
        arch = dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads)
        arch.update(kwargs)  # explicit keywords override the named size; DiT rejects unknown ones
        return DiT(**arch)

    build.__name__ = f"DiT_{size}_{patch_size}"
    build.__doc__ = f"DiT-{size}/{patch_size}: hidden {hidden_size}, depth {depth}, {num_heads} heads."
    return build


DiT_models: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{patch}": _make_config(size, patch) for size in DIT_SIZES for patch in (2, 4, 8)
}
