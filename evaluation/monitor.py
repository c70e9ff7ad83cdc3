"""What train.py does beside training at some steps: sample grids and trajectory GIFs of the EMA model, and FID.
They run inside ``utils.rng.isolated_rng``, so training randomness is the same with them on or off, and a failure is
reported without stopping training. Stop requests and DDP: docs/reliability.md."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from data import ImageDataset
from evaluation.fid import FIDError, compute_fid, load_inception, real_statistics, reference_statistics
from evaluation.images import gif_bytes, grid_bytes
from sampling.options import SamplingStopped
from sampling.sampler import Sampler
from utils.device import module_device_dtype
from utils.distributed import DistInfo, PeerError, all_ok
from utils.io import atomic_write
from utils.preemption import REASONS, AgreedStop, StopRequest
from utils.rng import isolated_rng
from utils.runlog import RunLogger, warn

# The trajectory GIF's samples per class row and frames, so it takes seconds whatever the grid (docs/reliability.md).
GIF_SAMPLES, GIF_FRAMES = 8, 20


@dataclass(frozen=True)
class MonitorConfig:
    """The settings the diagnostics read (train.py's flags of the same names)."""

    sample_every: int
    samples_per_class: int
    sample_classes: int
    cfg_scales: tuple[float, ...]
    sample_steps: int
    fid_every: int
    fid_samples: int
    fid_cfg_scale: float
    fid_ref_stats: str | None
    seed: int
    dataset: str
    data_path: str
    image_size: int
    channels: int
    num_workers: int

    @classmethod
    def of(cls, settings: Any) -> MonitorConfig:
        """The monitor's settings out of a run's config (any object with these attributes)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class Monitor:
    """Sample grids (rank 0) and FID of the EMA model (every process) at their intervals and at the last step."""

    def __init__(
        self,
        cfg: MonitorConfig,
        out: Path,
        logger: RunLogger,
        dist: DistInfo,
        sample_method: str | None = None,
        fid_extractor: nn.Module | None = None,
        decoder: Any | None = None,
        dataset: ImageDataset | None = None,
    ):
        self.cfg, self.out, self.logger, self.dist, self.sample_method = cfg, out, logger, dist, sample_method
        self.extractor = fid_extractor
        self.decoder = decoder  # latent models: the models.vae.LatentCodec that turns samples into images
        self.dataset = dataset  # the training set: asked which real images FID compares with (fid_images)
        self.real: tuple[Any, Any] | None = None  # rank 0's real statistics, loaded at the first FID
        self.fid_state = "not loaded"  # "ready" or "off" after the first FID
        self.seconds = {"sample grids": 0.0, "FID": 0.0}  # how long each took last time: what a budget must fit
        self.reason: int | None = None  # why the last diagnostic was abandoned
        self.warned_scales = False  # said once that some cfg scales are outside a guidance-input network's range

    def __call__(
        self, step: int, model: nn.Module, ema_model: nn.Module, last: bool, stop: StopRequest | None = None
    ) -> None:
        """The diagnostics due at this step; ``stop`` abandons or skips them (None: they always run to the end)."""
        cfg = self.cfg
        samples = self.dist.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or last)
        fid = cfg.fid_every and (step % cfg.fid_every == 0 or last)
        if not (samples or fid):
            return
        with isolated_rng(module_device_dtype(ema_model)[0]):
            if samples:
                self.timed("sample grids", step, stop, lambda: self.samples(step, model, ema_model, stop))
            if fid and self.fid_state != "off":  # every process: FID's sampling is shared out
                self.timed("FID", step, stop, lambda: self.fid(step, ema_model, stop), agreed=True)

    def timed(
        self, what: str, step: int, stop: StopRequest | None, run: Callable[[], float | None], agreed: bool = False
    ) -> None:
        """run(), skipped or abandoned on a stop request, a failure reported without stopping training (a days-long
        run must not end for its diagnostics); ``agreed``: all processes ask ``stop.check`` together."""
        try:
            if stop is not None:
                self.reason = (stop.check if agreed else stop.requested)(self.seconds[what])
                if self.reason is not None:
                    if self.dist.is_main:
                        warn(f"{what} at step {step} skipped ({REASONS[self.reason]}): the run is about to stop")
                    return
            start = time.perf_counter()
            took = run()  # a diagnostic may say how long its repeatable part took (FID: without its set-up)
        except SamplingStopped:
            if self.dist.is_main:
                why = REASONS.get(self.reason, "a stop request")
                warn(f"{what} at step {step} abandoned ({why}); nothing of them is written or logged")
            return
        except Exception as e:  # the failing process says why
            if not isinstance(e, PeerError) or self.dist.is_main:
                who = f" (rank {self.dist.rank})" if self.dist.distributed else ""
                warn(f"{what} at step {step} failed{who}: {type(e).__name__}: {e}")
            return
        self.seconds[what] = time.perf_counter() - start if took is None else took

    def should_stop(self, stop: StopRequest | None) -> Callable[[], bool] | None:
        """A ``should_stop`` callback of this process alone that remembers the reason, or None without ``stop``."""
        if stop is None:
            return None

        def ask() -> bool:
            self.reason = stop.requested()
            return self.reason is not None

        return ask

    def samples(self, step: int, model: nn.Module, ema_model: nn.Module, stop: StopRequest | None = None) -> None:
        """EMA and raw grids and the EMA trajectory at each CFG scale: OUT/samples/stepNNNNNNN_cfgS.{png,gif}."""
        cfg, k = self.cfg, self.cfg.samples_per_class
        ema, raw = (self.sampler(m) for m in (ema_model, model))
        classes = grid_classes(ema.num_classes, cfg.sample_classes)
        ask, shown = self.should_stop(stop), min(k, GIF_SAMPLES)  # rank 0 alone draws; GIF: shown a row
        # A network with the guidance scale as an input samples only the scales it was trained on; the others go.
        lo, hi = ema.guidance_range or (float("-inf"), float("inf"))
        scales = [scale for scale in cfg.cfg_scales if lo <= scale <= hi]
        if len(scales) < len(cfg.cfg_scales) and not self.warned_scales:
            self.warned_scales = True
            left_out = ", ".join(f"{s:g}" for s in cfg.cfg_scales if s not in scales)
            warn(
                f"sample grids: cfg scales {left_out} left out, outside [{lo:g}, {hi:g}], the guidance scales this "
                "network takes as an input"
            )
        images, videos, files = {}, {}, {}  # every file is encoded before any is written
        for scale in scales:
            ema_out = ema.generate_each_class(
                k, classes, cfg_scale=scale, seed=cfg.seed, trajectory=True, max_frames=GIF_FRAMES, should_stop=ask
            )
            raw_out = raw.generate_each_class(k, classes, cfg_scale=scale, seed=cfg.seed, should_stop=ask)
            rows = [x.unflatten(0, (-1, k)) for x in (ema_out.images, raw_out.images)]  # (classes, k, C, H, W)
            blank = torch.ones_like(rows[0][:, :1])  # a white column between EMA and raw
            stem = self.out / "samples" / f"step{step:07d}_cfg{scale:g}"
            files[f"{stem}.png"] = grid_bytes(torch.cat([rows[0], blank, rows[1]], dim=1).flatten(0, 1), 2 * k + 1)
            traj = ema_out.trajectory.unflatten(1, (-1, k))[:, :, :shown].flatten(1, 2)  # (K, classes * shown, C, H, W)
            traj = ema.trajectory_images(traj, ask) * 2 - 1 if ema.latent else traj
            files[f"{stem}.gif"] = gif_bytes(traj, nrow=shown, should_stop=ask)
            how = f"step {step}, cfg {scale:g}, {ema.options.method} {cfg.sample_steps} steps, NFE {ema_out.nfe}"
            rows_are = f"one class per row ({', '.join(map(str, classes))})"
            images[f"samples/cfg{scale:g}"] = (f"{stem}.png", f"{how}; {rows_are}; EMA left, raw weights right")
            videos[f"trajectory/cfg{scale:g}"] = (f"{stem}.gif", f"{how}; EMA, {shown} a row, from noise (t=0) to data")
        for path, data in files.items():
            atomic_write(path, lambda f, data=data: f.write(data))
        self.logger.log_media(step, images, videos)

    def sampler(self, model: nn.Module) -> Sampler:
        """The sampler of the diagnostics: the objective's solver at --sample-steps."""
        return Sampler(model, self.decoder, steps=self.cfg.sample_steps, method=self.sample_method)

    def fid(self, step: int, model: nn.Module, stop: StopRequest | None = None) -> float | None:
        """FID of the model's samples against the training set, rank 0 printing and logging it (every process calls
        it); returns the seconds it took without the one-time set-up (what the next one will take)."""
        if self.fid_state == "not loaded":
            self.fid_state = "ready" if self._load(module_device_dtype(model)[0], stop) else "off"
        if self.fid_state == "off":
            return None
        start = time.perf_counter()
        cfg, dist = self.cfg, self.dist
        agreed = None if stop is None else AgreedStop(stop)
        kw = dict(extractor=self.extractor, cfg_scale=cfg.fid_cfg_scale, seed=cfg.seed, progress=dist.is_main)
        kw |= dict(rank=dist.rank, world_size=dist.world_size)  # this process's share of the samples
        kw |= dict(should_stop=agreed and agreed.meet, step_stop=agreed and agreed.step)
        try:
            fid, nfe = compute_fid(self.sampler(model), self.real, cfg.fid_samples, **kw)
        finally:
            self.reason = agreed and agreed.reason
        seconds = time.perf_counter() - start
        if dist.is_main:
            print(f"step {step}: FID {fid:.3f} ({cfg.fid_samples} samples, NFE {nfe}, {seconds:.0f} s)")
            self.logger.log({"eval/fid": fid, "eval/fid_nfe": nfe, "eval/fid_seconds": seconds}, step)
        return seconds

    def real_statistics(self, stop: StopRequest | None) -> tuple[Any, Any]:
        """--fid-ref-stats, else the cached statistics of the training set's images (``fid_images`` for latents)."""
        cfg = self.cfg
        if cfg.fid_ref_stats:
            return reference_statistics(cfg.fid_ref_stats, self.extractor)
        ref = self.dataset.fid_images() if self.dataset is not None else None
        name, root, dataset = ref if ref is not None else (cfg.dataset, cfg.data_path, None)
        size, channels = (dataset.image_size, dataset.channels) if ref is not None else (cfg.image_size, cfg.channels)
        kw = dict(num_workers=cfg.num_workers, download=False, dataset=dataset, should_stop=self.should_stop(stop))
        return real_statistics(name, root, size, channels, extractor=self.extractor, **kw)

    def _load(self, device: Any, stop: StopRequest | None = None) -> bool:
        """Load the extractor (and on rank 0 the real statistics), local rank 0 first; False, said once, on failure."""
        error = None
        # Two turns with an agreed flag between them (not utils.distributed.first_then_others, a bare barrier):
        # when the first turn fails, for want of the weights say, the other processes must not try again.
        for first in (True, False):
            if (self.dist.local_rank == 0) == first:
                try:
                    self.extractor = self.extractor or load_inception(device)
                    if self.dist.is_main and self.real is None:
                        self.real = self.real_statistics(stop)
                except Exception as e:  # FIDError (weights, data) or anything else: every process must hear of it
                    error = e
            if not all_ok(error is None):  # a collective: also the barrier between the turns
                break
        else:
            return True
        if not all_ok(not isinstance(error, SamplingStopped)):  # not a failure: set up again at the next FID
            raise SamplingStopped("stopped while computing the real statistics")
        who = f" (rank {self.dist.rank})" if self.dist.distributed else ""
        if error is not None:
            why = str(error) if isinstance(error, FIDError) else f"{type(error).__name__}: {error}"
            warn(f"FID switched off for this run{who}: {why}")
        elif self.dist.is_main:
            warn("FID switched off for this run: set-up failed on another process")
        return False


def grid_classes(num_classes: int, count: int) -> list[int]:
    """``count`` classes spread evenly over ``num_classes`` (all when count is 0 or not smaller)."""
    if count == 0 or count >= num_classes:
        return list(range(num_classes))
    return [i * num_classes // count for i in range(count)]
