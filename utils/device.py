"""How the network runs: which device, which precision, and torch.compile; the one place "auto" is resolved."""

from __future__ import annotations

import warnings
from itertools import chain

import torch
import torch.nn as nn

from utils.rng import isolated_rng

PRECISIONS = ("auto", "bf16", "fp32")


def unwrap_model(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP
            model = model.module
        else:
            return model


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of a --device flag; cuda is cuda:LOCAL_RANK, never the global RANK. A missing device: ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} was asked for but no MPS device is available")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index >= count and name == "cuda":
            raise ValueError(
                f"LOCAL_RANK {local_rank} has no GPU of its own: this node shows {count} CUDA device(s); launch at "
                f"most {count} processes per node (torchrun --nproc_per_node {count}) or set CUDA_VISIBLE_DEVICES"
            )
        if device.index >= count:
            raise ValueError(f"--device {name} was asked for but this machine has {count} CUDA devices")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "bf16" (autocast) or "fp32" (the parameters' own dtype); "auto" is bf16 on a CUDA device that supports it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on device when precision (resolved) is "bf16"; a disabled context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first floating-point parameter or buffer (the CPU and float32 if none)."""
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def allow_tf32(device: torch.device) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (what fp32 leftovers of bf16 runs use)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_or_eager(net: nn.Module, batch_size: int, precision: str, verbose: bool = True):
    """torch.compile(net) if a forward and backward on zeros passes (RNG untouched), else net and a warning."""
    model = unwrap_model(net)
    device = module_device_dtype(model)[0]
    x = torch.zeros(batch_size, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.full((batch_size,), 0.5, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device) if model.num_classes else None
    try:
        compiled = torch.compile(net)
        with isolated_rng(device), autocast(device, precision):
            compiled(x, t, y).float().square().mean().backward()
        return compiled
    except Exception as e:
        if verbose:
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly", stacklevel=2)
        return net
    finally:
        net.zero_grad(set_to_none=True)
