"""What train.py does beside training at some steps: sample grids and trajectory GIFs of the EMA model, and FID.

Both are diagnostics. They run inside ``utils.rng.isolated_rng``, so whatever they draw from the global
generators, and whether they succeed or fail, the training randomness goes on exactly as without them (a run
with them on ends bit-identical to one with them off); a failure is reported and training goes on.

A stop request (a signal, or a --time-limit close to its end: ``utils.preemption.StopRequest``) is asked between
sample chunks: it abandons the diagnostic, which then writes and logs nothing (the grids of every scale are drawn
before any file is written), so the run checkpoints within seconds. With a budget, a diagnostic whose last run
would not fit before the time left is skipped. Grids show ``cfg.sample_classes`` classes, spread evenly over all
of them and the same at every step (``grid_classes``), so their cost does not grow with the class count.

Under DDP the sample grids are drawn by rank 0 alone (a few dozen images: the other processes wait for it in
the next step's gradient all-reduce), so it asks its own stop flag (``StopRequest.requested``); FID runs on every
process: each generates its share of the samples and the feature sums are all-reduced
(``evaluation.fid.generated_statistics``), and every process asks the agreed flag (``StopRequest.check``, a
collective) before each batch, so all abandon at the same one. Rank 0 alone holds the real statistics and
computes, prints and logs the distance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from data import ImageDataset
from evaluation.fid import FIDError, compute_fid, load_inception, real_statistics, reference_statistics
from evaluation.images import save_grid, to_gif
from sampling.sampler import Sampler, SamplingStopped
from utils.device import module_device_dtype
from utils.distributed import DistInfo, PeerError, all_ok
from utils.preemption import REASONS, StopRequest
from utils.rng import isolated_rng
from utils.runlog import RunLogger, warn

GIF_FRAMES = 10  # frames a latent model's trajectory GIF decodes


class Monitor:
    """Sample grids every ``cfg.sample_every`` steps (rank 0) and FID of the EMA model every ``cfg.fid_every`` steps
    (every process), and both at the last step. ``cfg`` is train.py's config; ``sample_method`` the objective's
    solver; ``fid_extractor`` replaces Inception (tests)."""

    def __init__(
        self,
        cfg: Any,
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
                try:
                    self.timed("sample grids", step, stop, lambda: self.samples(step, model, ema_model, stop))
                except Exception as e:  # diagnostics: a failure here must not end a days-long run
                    warn(f"sampling at step {step} failed: {type(e).__name__}: {e}")
            if fid:
                try:
                    self.fid(step, ema_model, stop)
                except Exception as e:  # the failing process says why
                    if not isinstance(e, PeerError) or self.dist.is_main:
                        who = f" (rank {self.dist.rank})" if self.dist.distributed else ""
                        warn(f"FID at step {step} failed{who}: {type(e).__name__}: {e}")

    def timed(
        self, what: str, step: int, stop: StopRequest | None, run: Callable[[], float | None], agreed: bool = False
    ) -> None:
        """run() unless a stop request says no: skipped when one is there already or when the last run would not
        fit before a budget's reserve, abandoned (``SamplingStopped``) when one comes while it samples. ``agreed``:
        every process calls this together and asks ``stop.check`` (a collective), else ``stop.requested``."""
        if stop is not None:
            self.reason = (stop.check if agreed else stop.requested)(self.seconds[what])
            if self.reason is not None:
                if self.dist.is_main:
                    warn(f"{what} at step {step} skipped ({REASONS[self.reason]}): the run is about to stop")
                return
        start = time.perf_counter()
        try:
            took = run()  # a diagnostic may say how long its repeatable part took (FID: without its set-up)
        except SamplingStopped:
            if self.dist.is_main:
                why = REASONS.get(self.reason, "a stop request")
                warn(f"{what} at step {step} abandoned ({why}); nothing of them is written or logged")
            return
        self.seconds[what] = time.perf_counter() - start if took is None else took

    def should_stop(self, stop: StopRequest | None, agreed: bool) -> Callable[[], bool] | None:
        """A ``should_stop`` callback for the sampler and FID that remembers the reason, or None without ``stop``."""
        if stop is None:
            return None

        def ask() -> bool:
            self.reason = (stop.check if agreed else stop.requested)()
            return self.reason is not None

        return ask

    def samples(self, step: int, model: nn.Module, ema_model: nn.Module, stop: StopRequest | None = None) -> None:
        """At each CFG scale, samples of the grid's classes (``grid_classes``) from the EMA and the raw weights side
        by side (one class per row, EMA left), and the EMA trajectory: OUT/samples/stepNNNNNNN_cfgS.{png,gif},
        logged to wandb with captions. The noise is fixed by the seed, so every sample step starts from the same
        noise. Every scale is sampled before anything is written, so a stop request (``SamplingStopped``) leaves
        nothing."""
        cfg, k = self.cfg, self.cfg.samples_per_class
        ema, raw = (self.sampler(m) for m in (ema_model, model))
        classes = grid_classes(ema.num_classes, cfg.sample_classes)
        ask = self.should_stop(stop, agreed=False)  # rank 0 alone draws the grids
        drawn = []
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
        for scale in scales:
            ema_out = ema.generate_each_class(
                k, classes, cfg_scale=scale, seed=cfg.seed, trajectory=True, should_stop=ask
            )
            raw_out = raw.generate_each_class(k, classes, cfg_scale=scale, seed=cfg.seed, should_stop=ask)
            drawn.append((scale, ema_out, raw_out.images))
        images, videos = {}, {}
        for scale, ema_out, raw_imgs in drawn:
            imgs, traj = ema_out.images, ema_out.trajectory
            rows = [x.unflatten(0, (-1, k)) for x in (imgs, raw_imgs)]  # (classes, k, C, H, W)
            blank = torch.ones_like(rows[0][:, :1])  # a white column between EMA and raw
            stem = self.out / "samples" / f"step{step:07d}_cfg{scale:g}"
            save_grid(torch.cat([rows[0], blank, rows[1]], dim=1).flatten(0, 1), f"{stem}.png", nrow=2 * k + 1)
            if ema.latent:  # a VAE pass per frame: GIF_FRAMES of them, not every step's
                traj = ema.trajectory_images(traj, GIF_FRAMES) * 2 - 1
            to_gif(traj, f"{stem}.gif", nrow=k)
            how = f"step {step}, cfg {scale:g}, {ema.options.method} {cfg.sample_steps} steps, NFE {ema_out.nfe}"
            rows_are = f"one class per row ({', '.join(map(str, classes))})"
            images[f"samples/cfg{scale:g}"] = (f"{stem}.png", f"{how}; {rows_are}; EMA left, raw weights right")
            videos[f"trajectory/cfg{scale:g}"] = (f"{stem}.gif", f"{how}; EMA, from noise (t=0) to data (t=1)")
        self.logger.log_media(step, images, videos)

    def sampler(self, model: nn.Module) -> Sampler:
        """The sampler of the diagnostics: the objective's solver at --sample-steps."""
        return Sampler(model, self.decoder, steps=self.cfg.sample_steps, method=self.sample_method)

    def fid(self, step: int, model: nn.Module, stop: StopRequest | None = None) -> None:
        """FID of the model's samples against the training set; rank 0 prints and logs it. Every process calls it."""
        if self.fid_state != "off":
            self.timed("FID", step, stop, lambda: self._fid(step, model, stop), agreed=True)

    def _fid(self, step: int, model: nn.Module, stop: StopRequest | None) -> float | None:
        """The FID itself; returns the seconds it took without the one-time set-up (what the next one will take)."""
        if self.fid_state == "not loaded":
            self.fid_state = "ready" if self._load(module_device_dtype(model)[0], stop) else "off"
        if self.fid_state == "off":
            return None
        start = time.perf_counter()
        cfg, dist = self.cfg, self.dist
        sampler = self.sampler(model)
        fid, nfe = compute_fid(
            sampler,
            self.real,
            cfg.fid_samples,
            extractor=self.extractor,
            cfg_scale=cfg.fid_cfg_scale,
            seed=cfg.seed,
            progress=dist.is_main,
            rank=dist.rank,
            world_size=dist.world_size,
            should_stop=self.should_stop(stop, agreed=True),
        )
        seconds = time.perf_counter() - start
        if dist.is_main:
            print(f"step {step}: FID {fid:.3f} ({cfg.fid_samples} samples, NFE {nfe}, {seconds:.0f} s)")
            self.logger.log({"eval/fid": fid, "eval/fid_nfe": nfe, "eval/fid_seconds": seconds}, step)
        return seconds

    def real_statistics(self, stop: StopRequest | None) -> tuple[Any, Any]:
        """The reference statistics: --fid-ref-stats, else those of the training set's real images (for latents
        the images they were extracted from, ``fid_images``), cached (``evaluation.fid.real_statistics``)."""
        cfg = self.cfg
        if getattr(cfg, "fid_ref_stats", None):
            return reference_statistics(cfg.fid_ref_stats, self.extractor)[:2]
        ref = self.dataset.fid_images() if self.dataset is not None else None
        name, root, dataset = ref if ref is not None else (cfg.dataset, cfg.data_path, None)
        size, channels = (dataset.image_size, dataset.channels) if ref is not None else (cfg.image_size, cfg.channels)
        return real_statistics(
            name,
            root,
            size,
            channels,
            extractor=self.extractor,
            num_workers=cfg.num_workers,
            download=False,
            dataset=dataset,
            should_stop=self.should_stop(stop, agreed=False),
        )

    def _load(self, device: Any, stop: StopRequest | None = None) -> bool:
        """Load the extractor (and on rank 0 the real statistics): each node's local rank 0 first (it downloads
        the weights if needed), then the others from the caches. False, said once, when it fails anywhere;
        ``SamplingStopped`` everywhere when a stop request came while rank 0 computed the real statistics."""
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
    """The classes of the sample grids: ``count`` of the ``num_classes`` (all when count is 0 or not smaller),
    spread evenly (class i * num_classes // count), so they depend on nothing but these two numbers."""
    if count == 0 or count >= num_classes:
        return list(range(num_classes))
    return [i * num_classes // count for i in range(count)]
