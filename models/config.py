"""The flags that choose the network, and the one place a DiT is built from them."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch

from models.blocks import MLPS, NORMS
from models.dit import DIT_SIZES, DiT, DiT_models
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import Config, arg


@dataclass(kw_only=True)
class ModelConfig(Config):
    """The flags that choose the network: a registry name plus optional size overrides."""

    model: str = arg("DiT-S/2", "named DiT size", choices=sorted(DiT_models), group="model")
    hidden_size: int | None = arg(None, "override the named size's hidden width", min=1)
    depth: int | None = arg(None, "override the named size's number of blocks", min=1)
    num_heads: int | None = arg(None, "override the named size's attention heads", min=1)
    num_registers: int = arg(4, "register tokens (Darcet et al. 2024); 0 disables", min=0)
    class_dropout: float = arg(0.1, "label dropout probability for CFG training", min=0.0, lt=1.0)
    qk_norm: bool = arg(True, "RMSNorm on queries and keys (--no-qk-norm disables)")
    mlp: str | None = arg(None, "block MLP: gelu (DiT), swiglu (LightningDiT); default: the recipe's", choices=MLPS)
    norm: str | None = arg(None, "norms: layernorm (DiT), rmsnorm (LightningDiT); default: the recipe's", choices=NORMS)
    rope: bool | None = arg(None, "2-D axial RoPE on queries and keys (LightningDiT, JiT); default: the recipe's")
    class_tokens: int | None = arg(None, "in-context class tokens (JiT); default: the recipe's", min=0)


def network_size(cfg: ModelConfig) -> tuple[int, int, int]:
    """(hidden_size, depth, patch_size) of the network the model flags name, their overrides included."""
    size, patch = cfg.model.removeprefix("DiT-").split("/")
    hidden, depth, _ = DIT_SIZES[size]
    return cfg.hidden_size or hidden, cfg.depth or depth, int(patch)


def build_model(cfg: ModelConfig, input_size: int, in_channels: int, num_classes: int, **extra: Any) -> DiT:
    """A DiT from the model flags and the data's shape; flags left at None keep the size's or DiT's default."""
    optional = dict(
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_type=cfg.mlp,
        norm_type=cfg.norm,
        rope=cfg.rope,
        class_tokens=cfg.class_tokens,
    )
    return DiT_models[cfg.model](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        num_registers=cfg.num_registers,
        class_dropout_prob=cfg.class_dropout,
        qk_norm=cfg.qk_norm,
        **{k: v for k, v in optional.items() if v is not None},
        **extra,
    )


def upgraded_config(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model_config`` with every DiT argument (old ``mean_flow``; later arguments at defaults)."""
    config = dict(config)
    if config.pop("mean_flow", False):
        config.update(average_velocity=True, time_scale=1.0)
    defaults = {p.name: p.default for p in inspect.signature(DiT.__init__).parameters.values() if p.name != "self"}
    return {**defaults, **config}


def model_from_config(config: dict[str, Any]) -> DiT:
    """The DiT that a checkpoint's ``model_config`` (``DiT.config``, maybe of an older version) describes."""
    return DiT(**upgraded_config(config))


def model_from_checkpoint(
    state: dict[str, Any] | str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
) -> DiT:
    """The DiT a checkpoint (a path or a loaded one) describes, with its EMA (default) or raw weights, in eval mode."""
    state = state if isinstance(state, dict) else load_checkpoint(state)
    if ema and state.get("ema") is None:
        raise CheckpointError("checkpoint holds no EMA weights; load the raw weights with ema=False")
    model = model_from_config(state["model_config"])
    try:
        model.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model config: {e}") from None
    return model.to(device).eval()
