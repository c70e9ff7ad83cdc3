"""Argparse groups shared by train.py, sampler.py, evaluate.py and the benchmarks, defined once."""

from __future__ import annotations

import argparse
from typing import Any

from models.dit import DiT, DiT_models


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the network: a registry name plus optional overrides."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="DiT-S/2", choices=sorted(DiT_models), help="named DiT size (default DiT-S/2)")
    g.add_argument("--hidden-size", type=int, default=None, help="override the named size's hidden width")
    g.add_argument("--depth", type=int, default=None, help="override the named size's number of blocks")
    g.add_argument("--num-heads", type=int, default=None, help="override the named size's attention heads")
    g.add_argument("--num-registers", type=int, default=4, help="register tokens (Darcet et al. 2024); 0 disables")
    g.add_argument("--class-dropout", type=float, default=0.1, help="label dropout probability for CFG training")
    g.add_argument("--no-qk-norm", dest="qk_norm", action="store_false", help="disable RMSNorm on queries and keys")


def build_model(
    name: str,
    input_size: int,
    in_channels: int,
    num_classes: int,
    hidden_size: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    num_registers: int = 4,
    class_dropout: float = 0.1,
    qk_norm: bool = True,
) -> DiT:
    """A DiT from a registry name, the data's shape and optional size overrides."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(DiT_models))}")
    overrides: dict[str, Any] = {
        k: v for k, v in dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads).items() if v is not None
    }
    return DiT_models[name](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        num_registers=num_registers,
        class_dropout_prob=class_dropout,
        qk_norm=qk_norm,
        **overrides,
    )
