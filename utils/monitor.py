"""What train.py does every few thousand steps on the EMA model: sample grids, trajectory GIFs and FID.

Both are diagnostics: train.py catches their failures so that a days-long run never stops for them.
Both leave the training randomness untouched (fixed seeds, forked RNG), so exact resume holds with them on.

Under DDP, the sample grids are drawn by rank 0 alone (a few dozen images: the other processes wait for it
in the next step's gradient all-reduce), while FID runs on every process: each generates its share of the
samples and the feature sums are all-reduced (``utils.fid.generated_statistics``); rank 0 alone holds the
real statistics and computes, prints and logs the distance.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from sampler import Sampler, save_grid, to_gif
from utils.distributed import DistInfo, all_ok
from utils.fid import FIDError, frechet_distance, generated_statistics, load_inception, module_device, real_statistics
from utils.logging import RunLogger


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block without moving torch's global CPU (and this CUDA device's) generator."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


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
    with forked_rng(module_device(model)):
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
    """FID of EMA samples against the training set during training (utils/fid.py), on every DDP process.

    Inception and the real statistics are loaded at the first evaluation, not at start-up, and the
    statistics come from the on-disk cache after the first run. Set-up goes first on each node's local
    rank 0 (which downloads the weights if needed; rank 0 also computes or loads the real statistics), then
    on the other processes, from the caches. When it fails anywhere (e.g. offline, without the Inception
    weights), every process switches the monitor off, the failing ones say why once, and training goes on.

    dist: this process's place in a DDP run (``utils.distributed.init_distributed``); None for one process.
    Every process must call the monitor at the same steps: it takes part in collectives.
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
        dist: DistInfo | None = None,
    ):
        self.data = dict(dataset_name=dataset, root=data_path, image_size=image_size, channels=channels)
        self.num_samples, self.steps, self.cfg_scale, self.seed = num_samples, steps, cfg_scale, seed
        self.num_workers = num_workers
        self.extractor = extractor
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist else (0, 1)
        self.local_rank = dist.local_rank if dist else 0
        self.real: tuple[Any, Any] | None = None  # rank 0 only
        self.enabled = True
        self._ready = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _load(self, device: torch.device) -> Exception | None:
        """Load what this process needs (the extractor; on rank 0 the real statistics); the error, if any."""
        try:
            if self.extractor is None:
                self.extractor = load_inception(device)
            if self.is_main and self.real is None:
                self.real = real_statistics(
                    **self.data, extractor=self.extractor, num_workers=self.num_workers, download=False
                )
        except Exception as e:  # FIDError (weights, data) or anything else: every process must hear of it
            return e
        return None

    def _setup(self, device: torch.device) -> bool:
        """Load on each node's local rank 0 first, then on the others; agree that every process is ready."""
        if self._ready:
            return True
        first = self.local_rank == 0
        error = self._load(device) if first else None
        ok = all_ok(error is None)  # a collective, so also the barrier between the two turns
        if ok:  # the second turn's agreement is a collective too: every process takes part
            if not first:
                error = self._load(device)
            ok = all_ok(error is None)
        if not ok:
            self.enabled = False
            if error is not None:
                who = f" (rank {self.rank})" if self.world_size > 1 else ""
                why = str(error) if isinstance(error, FIDError) else f"{type(error).__name__}: {error}"
                print(f"warning: FID switched off for this run{who}: {why}", file=sys.stderr)
            elif self.is_main:
                print("warning: FID switched off for this run: set-up failed on another process", file=sys.stderr)
        self._ready = ok
        return ok

    def __call__(self, model: nn.Module, step: int, logger: RunLogger) -> float | None:
        """Compute FID of model's samples; rank 0 prints, logs and returns it, other ranks return None.

        None as well when switched off.
        """
        if not self.enabled:
            return None
        device = module_device(model)
        if not self._setup(device):
            return None
        start = time.perf_counter()
        sampler = Sampler(model, steps=self.steps, method="heun")
        with forked_rng(device):
            mu, sigma, nfe = generated_statistics(
                sampler, self.num_samples, extractor=self.extractor, cfg_scale=self.cfg_scale, seed=self.seed,
                progress=self.is_main, rank=self.rank, world_size=self.world_size,
            )  # fmt: skip
        if not self.is_main:
            return None
        if mu.shape != np.shape(self.real[0]):
            raise FIDError(f"real statistics have {np.shape(self.real[0])} features, the extractor gives {mu.shape}")
        fid = frechet_distance(self.real[0], self.real[1], mu, sigma)
        seconds = time.perf_counter() - start
        print(f"step {step}: FID {fid:.3f} ({self.num_samples} samples, NFE {nfe}, {seconds:.0f} s)")
        logger.log({"eval/fid": fid, "eval/fid_nfe": nfe, "eval/fid_seconds": seconds}, step)
        return fid
