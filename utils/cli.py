"""Argparse groups shared by train.py, sampler.py, evaluate.py and the benchmarks, defined once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

import torch

from models.dit import DiT, DiT_models
from utils.distributed import resolve_device
from utils.solvers import GRIDS, PRECISIONS, SOLVERS


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the network: a registry name plus optional overrides."""
    d = ModelConfig()
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=d.model, choices=sorted(DiT_models), help=f"named DiT size (default {d.model})")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="override the named size's hidden width")
    g.add_argument("--depth", type=int, default=d.depth, help="override the named size's number of blocks")
    g.add_argument("--num-heads", type=int, default=d.num_heads, help="override the named size's attention heads")
    g.add_argument(
        "--num-registers", type=int, default=d.num_registers, help="register tokens (Darcet et al. 2024); 0 disables"
    )
    g.add_argument(
        "--class-dropout", type=float, default=d.class_dropout, help="label dropout probability for CFG training"
    )
    g.add_argument("--no-qk-norm", dest="qk_norm", action="store_false", help="disable RMSNorm on queries and keys")


@dataclass(kw_only=True)
class ModelConfig:
    """The flags of ``add_model_args``; train.py's and the benchmark's configs extend it."""

    model: str = "DiT-S/2"
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_registers: int = 4
    class_dropout: float = 0.1
    qk_norm: bool = True


def build_model(cfg: ModelConfig, input_size: int, in_channels: int, num_classes: int) -> DiT:
    """A DiT from the model flags (a registry name and optional size overrides) and the data's shape."""
    if cfg.model not in DiT_models:
        raise ValueError(f"unknown model {cfg.model!r}; choose from {', '.join(sorted(DiT_models))}")
    sizes = dict(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads)
    overrides: dict[str, Any] = {k: v for k, v in sizes.items() if v is not None}
    return DiT_models[cfg.model](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        num_registers=cfg.num_registers,
        class_dropout_prob=cfg.class_dropout,
        qk_norm=cfg.qk_norm,
        **overrides,
    )


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(s: str) -> int:
    """argparse type: an integer >= 0."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def parse_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device a --device flag names: auto (or None), cpu, cuda, cuda:N or mps; ValueError otherwise.

    "auto" and "cuda" follow ``utils.distributed.resolve_device`` (auto: the GPU when there is one, else the
    CPU). An unknown name, or a device this machine does not have, is a one-line ValueError.
    """
    name = "auto" if name is None else str(name)
    if name in ("auto", "cpu", "cuda"):
        return resolve_device(name)
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name} was asked for but no MPS device is available")
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name} was asked for but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


@dataclass(kw_only=True)
class SamplingConfig:
    """The sampling flags of ``add_sampling_args``; sampler.py's and evaluate.py's configs extend it."""

    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    steps: int = 50
    method: str = "heun"
    grid: str = "uniform"
    grid_shift: float = 3.0
    rtol: float = 1e-5
    atol: float = 1e-5
    precision: str = "auto"
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        self.guidance_interval = tuple(self.guidance_interval)  # argparse's nargs=2 gives a list

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sampler.Sampler`` / ``Sampler.from_checkpoint`` (all fields but seed)."""
        return {f.name: getattr(self, f.name) for f in fields(SamplingConfig) if f.name != "seed"}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags that control the ODE sampler (sampler.py, evaluate.py), the fields of ``SamplingConfig``; defaults
    match ``sampler.Sampler``."""
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale; 1 disables it (default %(default)s)",
    )
    g.add_argument(
        "--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
        help="apply guidance only for t in [T_LO, T_HI] (Kynkäänniemi et al. 2024); t=0 noise, t=1 data (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--steps", type=positive_int, default=50, help="solver steps on the time grid (not dopri5; default %(default)s)"
    )
    g.add_argument(
        "--method",
        default="heun",
        choices=SOLVERS,
        help="ODE solver; NFE: euler steps, midpoint and heun 2*steps (heun corrects its last step too); "
        "dopri5 is adaptive (default %(default)s)",
    )
    g.add_argument(
        "--grid", default="uniform", choices=GRIDS, help="time grid of the fixed-step solvers (default %(default)s)"
    )
    g.add_argument(
        "--grid-shift",
        type=float,
        default=3.0,
        help="shift s of --grid shifted: s > 1 puts more steps near the data (t=1). This is the opposite "
        "direction of SD3/Flux's shift (there shift > 1 puts steps near the noise): s here is their 1/shift "
        "(default %(default)s)",
    )
    g.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance (default %(default)s)")
    g.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance (default %(default)s)")
    g.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="network precision: auto is bf16 autocast on CUDA, fp32 elsewhere; the ODE state stays float32 "
        "(default %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="samples per forward batch (bounds memory; default %(default)s)",
    )
    g.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the noise and random labels (default %(default)s)"
    )
