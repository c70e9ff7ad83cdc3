"""What train.py does beside training at some steps: sample grids and trajectory GIFs of the EMA model, and FID.

Both are diagnostics. They run inside ``utils.rng.isolated_rng``, so whatever they draw from the global
generators, and whether they succeed or fail, the training randomness goes on exactly as without them (a run
with them on ends bit-identical to one with them off); a failure is reported and training goes on.

Under DDP the sample grids are drawn by rank 0 alone (a few dozen images: the other processes wait for it in
the next step's gradient all-reduce), while FID runs on every process: each generates its share of the samples
and the feature sums are all-reduced (``evaluation.fid.generated_statistics``); rank 0 alone holds the real
statistics and computes, prints and logs the distance.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from evaluation.fid import FIDError, compute_fid, load_inception, real_statistics
from evaluation.images import save_grid, to_gif
from sampling.sampler import Sampler
from utils.device import module_device_dtype
from utils.distributed import DistInfo, PeerError, all_ok, first_then_others
from utils.rng import isolated_rng
from utils.runlog import RunLogger, warn


class Monitor:
    """Sample grids every ``cfg.sample_every`` steps (rank 0) and FID of the EMA model every ``cfg.fid_every`` steps
    (every process), and both at the last step. ``cfg`` is train.py's config; ``sample_method`` the objective's
    solver; ``fid_extractor`` replaces Inception (tests)."""

    def __init__(self, cfg: Any, out: Path, logger: RunLogger, dist: DistInfo, sample_method: str = "heun",
                 fid_extractor: nn.Module | None = None):  # fmt: skip
        self.cfg, self.out, self.logger, self.dist, self.sample_method = cfg, out, logger, dist, sample_method
        self.extractor = fid_extractor
        self.real: tuple[Any, Any] | None = None  # rank 0's real statistics, loaded at the first FID
        self.fid_state = "not loaded"  # "ready" or "off" after the first FID

    def __call__(self, step: int, model: nn.Module, ema_model: nn.Module, last: bool) -> None:
        cfg = self.cfg
        samples = self.dist.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or last)
        fid = cfg.fid_every and (step % cfg.fid_every == 0 or last)
        if not (samples or fid):
            return
        with isolated_rng(module_device_dtype(ema_model)[0]):
            if samples:
                try:
                    self.samples(step, model, ema_model)
                except Exception as e:  # diagnostics: a failure here must not end a days-long run
                    warn(f"sampling at step {step} failed: {type(e).__name__}: {e}")
            if fid:
                try:
                    self.fid(step, ema_model)
                except Exception as e:  # the failing process says why
                    if not isinstance(e, PeerError) or self.dist.is_main:
                        who = f" (rank {self.dist.rank})" if self.dist.distributed else ""
                        warn(f"FID at step {step} failed{who}: {type(e).__name__}: {e}")

    def samples(self, step: int, model: nn.Module, ema_model: nn.Module) -> None:
        """At each CFG scale, samples of every class from the EMA and the raw weights side by side (one class per
        row, EMA left), and the EMA trajectory: OUT/samples/stepNNNNNNN_cfgS.{png,gif}, logged to wandb with
        captions. The noise is fixed by the seed, so every sample step starts from the same noise."""
        cfg, k = self.cfg, self.cfg.samples_per_class
        ema, raw = (self.sampler(m) for m in (ema_model, model))
        images, videos = {}, {}
        for scale in cfg.cfg_scales:
            ema_out = ema.generate_each_class(k, cfg_scale=scale, seed=cfg.seed, trajectory=True)
            imgs, traj = ema_out.images, ema_out.trajectory
            raw_imgs = raw.sample_each_class(k, cfg_scale=scale, seed=cfg.seed)
            rows = [x.unflatten(0, (-1, k)) for x in (imgs, raw_imgs)]  # (classes, k, C, H, W)
            blank = torch.ones_like(rows[0][:, :1])  # a white column between EMA and raw
            stem = self.out / "samples" / f"step{step:07d}_cfg{scale:g}"
            save_grid(torch.cat([rows[0], blank, rows[1]], dim=1).flatten(0, 1), f"{stem}.png", nrow=2 * k + 1)
            to_gif(traj, f"{stem}.gif", nrow=k)
            how = f"step {step}, cfg {scale:g}, {ema.options.method} {cfg.sample_steps} steps, NFE {ema_out.nfe}"
            images[f"samples/cfg{scale:g}"] = (f"{stem}.png", f"{how}; one class per row; EMA left, raw weights right")
            videos[f"trajectory/cfg{scale:g}"] = (f"{stem}.gif", f"{how}; EMA, from noise (t=0) to data (t=1)")
        self.logger.log_media(step, images, videos)

    def sampler(self, model: nn.Module) -> Sampler:
        """The sampler of the diagnostics: the objective's solver at --sample-steps."""
        return Sampler(model, steps=self.cfg.sample_steps, method=self.sample_method)

    def fid(self, step: int, model: nn.Module) -> None:
        """FID of the model's samples against the training set; rank 0 prints and logs it."""
        if self.fid_state == "not loaded":
            self.fid_state = "ready" if self._load(module_device_dtype(model)[0]) else "off"
        if self.fid_state == "off":
            return
        start = time.perf_counter()
        cfg, dist = self.cfg, self.dist
        sampler = self.sampler(model)
        fid, nfe = compute_fid(
            sampler, self.real, cfg.fid_samples, extractor=self.extractor, cfg_scale=cfg.fid_cfg_scale, seed=cfg.seed,
            progress=dist.is_main, rank=dist.rank, world_size=dist.world_size,
        )  # fmt: skip
        if dist.is_main:
            seconds = time.perf_counter() - start
            print(f"step {step}: FID {fid:.3f} ({cfg.fid_samples} samples, NFE {nfe}, {seconds:.0f} s)")
            self.logger.log({"eval/fid": fid, "eval/fid_nfe": nfe, "eval/fid_seconds": seconds}, step)

    def _load(self, device: Any) -> bool:
        """Load the extractor (and on rank 0 the real statistics): each node's local rank 0 first (it downloads
        the weights if needed), then the others from the caches. False, said once, when it fails anywhere."""
        error = None
        with first_then_others(self.dist.local_rank == 0):
            try:
                self.extractor = self.extractor or load_inception(device)
                if self.dist.is_main and self.real is None:
                    cfg = self.cfg
                    self.real = real_statistics(
                        cfg.dataset, cfg.data_path, cfg.image_size, cfg.channels, extractor=self.extractor,
                        num_workers=cfg.num_workers, download=False,
                    )  # fmt: skip
            except Exception as e:  # FIDError (weights, data) or anything else: every process must hear of it
                error = e
        if all_ok(error is None):
            return True
        who = f" (rank {self.dist.rank})" if self.dist.distributed else ""
        if error is not None:
            why = str(error) if isinstance(error, FIDError) else f"{type(error).__name__}: {error}"
            warn(f"FID switched off for this run{who}: {why}")
        elif self.dist.is_main:
            warn("FID switched off for this run: set-up failed on another process")
        return False
