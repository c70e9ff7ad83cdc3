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


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags that control the ODE sampler (sampler.py, evaluate.py); defaults match ``sampler.Sampler``."""
    # Imported here: sampler.py imports this module, and the solver and grid names live in sampler.py.
    from sampler import GRIDS, SOLVERS

    def positive_int(s: str) -> int:
        v = int(s)
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
        return v

    def seed_int(s: str) -> int:
        v = int(s)
        if v < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
        return v

    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale; 1 disables it (default %(default)s)",
    )
    g.add_argument(
        "--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
        help="apply guidance only for t in [T_LO, T_HI] (Kynkäänniemi et al. 2024); t=0 noise, t=1 data (default 0 1)",
    )  # fmt: skip
    g.add_argument(
        "--steps", type=positive_int, default=50, help="solver steps on the time grid (not dopri5; default %(default)s)"
    )
    g.add_argument(
        "--method", default="heun", choices=SOLVERS, help="ODE solver; dopri5 is adaptive (default %(default)s)"
    )
    g.add_argument(
        "--grid", default="uniform", choices=GRIDS, help="time grid of the fixed-step solvers (default %(default)s)"
    )
    g.add_argument(
        "--grid-shift",
        type=float,
        default=3.0,
        help="shift s of --grid shifted; s > 1 refines near data (default %(default)s)",
    )
    g.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance (default %(default)s)")
    g.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance (default %(default)s)")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="samples per forward batch (bounds memory; default %(default)s)",
    )
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the noise and random labels (default %(default)s)")
