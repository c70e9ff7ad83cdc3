"""What train.py does every few thousand steps on the EMA model: sample grids, trajectory GIFs and FID.

Both are diagnostics: train.py catches their failures so that a days-long run never stops for them.
Both leave the training randomness untouched (fixed seeds, forked RNG), so exact resume holds with them on.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sampler import Sampler, save_grid, to_gif
from utils.fid import FIDError, compute_fid, load_inception, real_statistics
from utils.logging import RunLogger


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block without moving torch's global CPU (and this CUDA device's) generator."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_and_log(
    model: nn.Module,
    step: int,
    out: str | Path,
    logger: RunLogger,
    *,
    samples_per_class: int,
    cfg_scales: Sequence[float],
    steps: int,
    seed: int,
) -> None:
    """Samples of every class, one row per class, at each CFG scale: PNG grids and trajectory GIFs.

    Saved as OUT/samples/stepNNNNNNN_cfgS.{png,gif} and logged to wandb as images and videos. The noise
    is fixed by seed, so grids of different steps show the same starting points.
    """
    k = samples_per_class
    y = torch.arange(model.num_classes).repeat_interleave(k)  # row c holds class c
    sampler = Sampler(model, steps=steps, method="heun")
    images, videos = {}, {}
    with forked_rng(_device(model)):
        for scale in cfg_scales:
            imgs, traj = sampler.sample(len(y), y, cfg_scale=scale, seed=seed, return_trajectory=True)
            stem = Path(out) / "samples" / f"step{step:07d}_cfg{scale:g}"
            save_grid(imgs, f"{stem}.png", nrow=k)
            to_gif(traj, f"{stem}.gif", nrow=k)
            images[f"samples/cfg{scale:g}"] = f"{stem}.png"
            videos[f"trajectory/cfg{scale:g}"] = f"{stem}.gif"
    logger.log_images(images, step)
    logger.log_videos(videos, step)


class FIDMonitor:
    """FID of EMA samples against the training set during training (utils/fid.py).

    Inception and the real statistics are loaded at the first evaluation, not at start-up, and the
    statistics come from the on-disk cache after the first run. When the Inception weights cannot be had
    (offline), the monitor says so once and switches itself off; training goes on.
    """

    def __init__(
        self,
        dataset: str,
        data_path: str,
        image_size: int,
        channels: int,
        *,
        num_samples: int,
        steps: int,
        cfg_scale: float,
        seed: int,
        num_workers: int = 0,
        extractor: nn.Module | None = None,
    ):
        self.data = dict(dataset_name=dataset, root=data_path, image_size=image_size, channels=channels)
        self.num_samples, self.steps, self.cfg_scale, self.seed = num_samples, steps, cfg_scale, seed
        self.num_workers = num_workers
        self.extractor = extractor
        self.real: tuple[Any, Any] | None = None
        self.enabled = True

    def __call__(self, model: nn.Module, step: int, logger: RunLogger) -> float | None:
        """Compute, print and log FID of model's samples; None when switched off."""
        if not self.enabled:
            return None
        device = _device(model)
        try:
            if self.extractor is None:
                self.extractor = load_inception(device)
            if self.real is None:
                self.real = real_statistics(
                    **self.data, extractor=self.extractor, num_workers=self.num_workers, download=False
                )
        except FIDError as e:
            self.enabled = False
            print(f"warning: FID switched off for this run: {e}", file=sys.stderr)
            return None
        start = time.perf_counter()
        sampler = Sampler(model, steps=self.steps, method="heun")
        with forked_rng(device):
            fid, nfe = compute_fid(
                sampler, self.real, self.num_samples, extractor=self.extractor, cfg_scale=self.cfg_scale, seed=self.seed
            )
        seconds = time.perf_counter() - start
        print(f"step {step}: FID {fid:.3f} ({self.num_samples} samples, NFE {nfe}, {seconds:.0f} s)")
        logger.log({"eval/fid": fid, "eval/fid_nfe": nfe, "eval/fid_seconds": seconds}, step)
        return fid
