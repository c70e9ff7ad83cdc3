"""Writing images (float (N, C, H, W) in [0, 1]) as uint8, PNG grids, trajectory GIFs and .npz archives, atomically.
Grids and GIFs enlarge images under ``min_size`` pixels, which are unreadable at their size; the npz keeps them."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sampling.options import SamplingStopped
from utils.io import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] to uint8 (N, H, W, C), clipped first and rounded."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def upscale(images: torch.Tensor, min_size: int = 64) -> torch.Tensor:
    """Images (N, C, H, W) enlarged by nearest neighbour by the integer factor ceil(min_size / H) when H < min_size."""
    factor = -(-min_size // images.shape[-2])
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def grid_uint8(images: torch.Tensor, nrow: int, min_size: int = 64) -> np.ndarray:
    """One image grid (H', W', 3) uint8 from images (N, C, H, W) in [0, 1], small images enlarged (``upscale``)."""
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    images = upscale(images.detach().float().clamp(0, 1).cpu(), min_size)
    grid = make_grid(images, nrow=nrow, padding=2)  # (3, H', W')
    return to_uint8(grid.unsqueeze(0))[0]


def grid_bytes(images: torch.Tensor, nrow: int = 8, min_size: int = 64, fmt: str = "PNG") -> bytes:
    """Images (N, C, H, W) in [0, 1] as one grid in PIL's format ``fmt``, small images enlarged (``upscale``)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(grid_uint8(images, nrow, min_size)).save(out, format=fmt)
    return out.getvalue()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, min_size: int = 64) -> None:
    """Write ``grid_bytes`` of images (N, C, H, W) in [0, 1] in the format of the path's suffix (.png)."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: no image format for the suffix {path.suffix!r} (use .png)")
    atomic_write(path, lambda f: f.write(grid_bytes(images, nrow, min_size, fmt)))


def gif_bytes(
    trajectory: torch.Tensor, fps: int = 10, nrow: int = 8, should_stop: Callable[[], bool] | None = None
) -> bytes:
    """A trajectory (K, N, C, H, W) in [-1, 1] as a GIF of grids; ``should_stop`` is asked before each frame."""
    from moviepy import VideoClip

    if trajectory.ndim != 5:
        raise ValueError(f"expected a trajectory of shape (K, N, C, H, W), got {tuple(trajectory.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    k, frames = len(trajectory), {}

    def frame(t: float) -> np.ndarray:  # drawn when moviepy first asks for it
        # moviepy samples a clip at t = i / fps for i < int(duration * fps); summed float durations would drop or
        # repeat frames (0.3 < 0.1 + 0.1 + 0.1): the index is rounded, and a half frame more makes that exactly K.
        i = min(round(t * fps), k - 1)
        if i not in frames:
            if should_stop is not None and should_stop():
                raise SamplingStopped(f"stopped before GIF frame {i + 1} of {k}")
            frames[i] = grid_uint8((trajectory[i].float().clamp(-1, 1) + 1) / 2, nrow)
        return frames[i]

    clip = VideoClip(frame_function=frame, duration=(k + 0.5) / fps)
    with tempfile.TemporaryDirectory() as scratch:  # moviepy writes to a name: encode there
        encoded = Path(scratch) / "trajectory.gif"
        clip.write_gif(str(encoded), fps=fps, logger=None)
        return encoded.read_bytes()


def to_gif(trajectory: torch.Tensor, path: str | Path, fps: int = 10, nrow: int = 8) -> None:
    """Write ``gif_bytes`` of a trajectory (K, N, C, H, W) of states in [-1, 1]."""
    atomic_write(path, lambda f: f.write(gif_bytes(trajectory, fps, nrow)))


def save_npz(images: torch.Tensor, labels: torch.Tensor | None, path: str | Path) -> None:
    """Write uint8 (N, H, W, C) "images" and int64 "labels" (-1: unconditional) as an npz."""
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    arrays = {"images": to_uint8(images), "labels": labels.cpu().numpy().astype(np.int64)}
    atomic_write(path, lambda f: np.savez(f, **arrays))
