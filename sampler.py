"""Sample images from a trained DiT by integrating the flow ODE dx/dt = v(x, t, y) from noise to data.

    python sampler.py --ckpt runs/cifar10/checkpoints/last.pt --n 64 --cfg-scale 2.5 --steps 20 --method heun \\
        --seed 0 --out grid.png --gif traj.gif --npz samples.npz

As a library: ``from sampler import Sampler, save_grid, to_gif`` (README; docs/sampling.md)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.images import save_grid, save_npz, to_gif, to_uint8
from sampling.options import Samples, SamplingOptions, sampling_options, seeded_noise
from sampling.sampler import Sampler
from sampling.solvers import ADAPTIVE, time_grid
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, arg, parse, script_exit
from utils.io import atomic_write

__all__ = ["Sampler", "Samples", "SamplingOptions", "save_grid", "save_npz", "seeded_noise", "time_grid", "to_gif"]
__all__ += ["to_uint8"]


@dataclass(kw_only=True)
class SampleConfig(SamplingOptions):
    """The sampler CLI: the sampling options plus what to load and where to write."""

    ckpt: str = arg(
        None, "train.py's checkpoint, e.g. runs/cifar10/checkpoints/last.pt", group="input and output", required=True
    )
    ema: bool = arg(True, "use the EMA weights (--no-ema: the raw weights)")
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    n: int = arg(64, "number of samples, per class with --each-class", min=1)
    class_label: int | None = arg(None, "sample only this class (default: random classes)")
    each_class: bool = arg(False, "--n samples of every class, one class per row")
    seed: int = arg(0, "seed of the noise and random labels", min=0)
    out: str | None = arg(None, "PNG grid of the samples (default: samples.png in the checkpoint's run folder)")
    nrow: int | None = arg(None, "images per grid row (default: about sqrt(n); --n with --each-class)", min=1)
    gif: str | None = arg(None, "also write the sampling trajectory as a GIF here")
    fps: int = arg(10, "GIF frames per second", min=1)
    npz: str | None = arg(None, "also write uint8 HWC images and labels to this .npz (latents with --no-decode)")
    vae: str | None = arg(None, "latent models: another copy of the checkpoint's VAE (a folder or hub id)")
    overwrite: bool = arg(False, "replace output files that already exist")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.class_label is not None and self.each_class:
            raise ConfigError("--class-label and --each-class exclude each other")
        for path, suffixes in ((self.out, (".png", ".jpg", ".jpeg")), (self.gif, (".gif",)), (self.npz, (".npz",))):
            if path is not None and Path(path).suffix.lower() not in suffixes:
                raise ConfigError(f"{path} must end in {' or '.join(suffixes)}")
            if path is not None and path != self.out and Path(path).exists() and not self.overwrite:  # --out: main
                raise ConfigError(f"{path} already exists; pass --overwrite to replace it")


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    return parse(SampleConfig, argv, "sampler.py", __doc__.split("\n\n")[0])


def main(cfg: SampleConfig) -> dict[str, Any]:
    """Sample and write the grid (GIF, npz); returns images (N, C, H, W) in [0, 1], labels, NFE, method, precision."""
    state = load_checkpoint(cfg.ckpt)
    ckpt = Path(cfg.ckpt)
    grid = Path(cfg.out or (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent) / "samples.png")
    if state.get("latent_space") and not cfg.decode:  # latents go to --npz; no grid is written
        if cfg.npz is None or cfg.gif is not None:
            raise ConfigError("--no-decode gives latents, not images: pass --npz FILE for them (and no --gif)")
    elif grid.exists() and not cfg.overwrite:
        raise ConfigError(f"{grid} already exists; pass --overwrite to replace it (or choose --out)")
    sampler = Sampler.from_checkpoint(state, ema=cfg.ema, device=cfg.device, vae=cfg.vae, **sampling_options(cfg))
    o, result = sampler.options, {"method": sampler.options.method, "config": asdict(cfg)}
    if sampler.latent and not cfg.decode:
        out = sampler.generate(cfg.n, cfg.class_label, seed=cfg.seed, progress=True)
        arrays = {"latents": out.images.cpu().numpy(), "labels": out.labels.numpy() if out.labels is not None else []}
        atomic_write(cfg.npz, lambda f: np.savez(f, **arrays))
        print(f"{cfg.n} latents {tuple(out.images.shape[1:])}, NFE {out.nfe}: {cfg.npz}")
        return result | {"images": out.images.cpu(), "labels": out.labels, "nfe": out.nfe, "precision": out.precision}
    kw: dict[str, Any] = dict(seed=cfg.seed, trajectory=cfg.gif is not None, progress=True)
    if cfg.each_class:
        out = sampler.generate_each_class(cfg.n, **kw)
        nrow = cfg.nrow or cfg.n
    else:
        out = sampler.generate(cfg.n, cfg.class_label, **kw)
        nrow = cfg.nrow or math.ceil(math.sqrt(cfg.n))
    images = out.images.cpu()
    save_grid(images, grid, nrow=nrow)
    if out.trajectory is not None:
        frames = sampler.trajectory_images(out.trajectory) * 2 - 1 if sampler.latent else out.trajectory
        to_gif(frames, cfg.gif, fps=cfg.fps, nrow=nrow)
    if cfg.npz is not None:
        save_npz(images, out.labels, cfg.npz)
    written = [str(grid), *(path for path in (cfg.gif, cfg.npz) if path is not None)]
    how = o.method if o.method in ADAPTIVE else f"{o.method} on a {o.grid} grid"
    print(f"{len(images)} samples, {how}, NFE {out.nfe}, {out.precision} on {sampler.device}: {', '.join(written)}")
    return result | {"images": images, "labels": out.labels, "nfe": out.nfe, "precision": out.precision}


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point: a known error is one line on stderr (exit 2: bad input, 1: a failed write)."""
    try:
        main(parse_args(argv))
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError: ValueErrors
        raise script_exit("sampler.py", e) from None


if __name__ == "__main__":
    cli(sys.argv[1:])
