"""Sample images from a trained DiT by integrating the flow ODE dx/dt = v(x, t, y).

Time convention (owned by ``utils/flow.py``): t = 0 is pure noise, t = 1 is data, and the network
predicts the velocity dx/dt. The sampler starts from Gaussian noise at t = 0 and integrates to t = 1.
Time grids and integrators live in ``utils/solvers.py``, image writers in ``utils/images.py`` (re-exported
here: ``from sampler import Sampler, save_grid, to_gif`` works).

Library use::

    from sampler import Sampler
    sampler = Sampler(model)                      # a trained DiT (or Sampler.from_checkpoint(path))
    images = sampler.sample(10, cfg_scale=2.5)    # (10, C, H, W) in [0, 1]

Command line (train.py writes OUT/checkpoints/last.pt, OUT defaulting to runs/DATASET)::

    python sampler.py --ckpt runs/cifar10/checkpoints/last.pt --n 64 --cfg-scale 2.5 --steps 20 --method heun \
        --seed 0 --out grid.png --gif traj.gif --npz samples.npz
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from utils.checkpoint import load_checkpoint, model_from_checkpoint, unwrap_model
from utils.cli import SamplingConfig, add_sampling_args, parse_device, positive_int
from utils.images import grid_uint8, save_grid, save_npz, to_gif, to_uint8
from utils.solvers import GRIDS, PRECISIONS, SOLVERS, frame_indices, solve_dopri5, solve_fixed, time_grid

__all__ = [
    "GRIDS", "PRECISIONS", "SOLVERS", "SampleConfig", "Sampler", "grid_uint8", "resolve_precision", "save_grid",
    "save_npz", "seeded_noise", "time_grid", "to_gif", "to_uint8",
]  # fmt: skip


#################################################################################
#                            Noise, labels, precision                           #
#################################################################################


def seeded_noise(seed: int, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise (stop - start, *shape) float32 on CPU; sample i depends only on (seed, i).

    One generator per sample keeps a sample's noise independent of n and of the batch size; the spawn
    key keeps the streams of different (seed, i) apart (torch's CPU generator keeps only 32 seed bits).
    """
    out = np.empty((stop - start, *shape), dtype=np.float32)
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, i)))
        out[j] = rng.standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(out)


def _seeded_labels(seed: int, n: int, num_classes: int) -> torch.Tensor:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    return torch.from_numpy(rng.integers(0, num_classes, size=n, dtype=np.int64))


def resolve_precision(precision: str, device: torch.device) -> str:
    """What a precision setting means on device: "bf16" (bf16 autocast) or "fp32" (no autocast).

    "auto" is bf16 on a CUDA device that supports it and fp32 elsewhere; "bf16" on the CPU runs CPU bf16
    autocast. "fp32" runs the network in its own parameter dtype (float32, or float64 for a float64 model).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


#################################################################################
#                                    Sampler                                    #
#################################################################################


class _Settings(NamedTuple):
    """One call's checked sampling settings."""

    steps: int
    method: str
    grid: str
    cfg_scale: float
    guidance_interval: tuple[float, float]
    precision: str  # as asked: auto, bf16 or fp32


class Sampler:
    """ODE sampler for a DiT velocity model: CFG with a guidance interval, fixed-grid and adaptive solvers.

    The constructor arguments are defaults that every ``sample`` call may override.

    NFE convention: ``last_nfe`` counts evaluations of the velocity field per sample path, i.e. per step
    one call on the whole batch counts once, and a classifier-free guided call (one pass of 2N) also
    counts once. Euler uses ``steps`` NFE, midpoint and heun ``2 * steps`` (heun corrects its last step
    too, on every grid: EDM's sampler takes a plain Euler last step, 2 * steps - 1); dopri5 chooses its own.
    When a call is split into chunks of ``batch_size``, ``last_nfe`` is the largest count among the
    chunks (the same for every chunk on a fixed grid) and ``last_nfe_per_chunk`` lists them all.

    Precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16" or "fp32"; ``last_precision`` holds
    what the last call resolved it to. The ODE state, the times and the velocity handed to the solver stay
    float32 (float64 for a float64 model) whatever the network runs in.

    The model is used unwrapped (no DDP / torch.compile wrapper) and in eval mode during sampling; its
    train/eval mode is restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 50,
        method: str = "heun",
        grid: str = "uniform",
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        batch_size: int = 256,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        max_frames: int = 50,
        grid_shift: float = 3.0,
        precision: str = "auto",
    ):
        self.model = unwrap_model(model)
        for attr in ("input_size", "in_channels"):
            if not hasattr(self.model, attr):
                raise ValueError(f"the model needs an attribute {attr!r} (a DiT has one)")
        self.input_size = int(self.model.input_size)
        self.in_channels = int(self.model.in_channels)
        self.num_classes = int(getattr(self.model, "num_classes", 0))
        self.device, self.model_dtype = _model_device_dtype(self.model)
        # The ODE state stays in float32 (float64 for a float64 model) even when the network runs in bf16.
        self.state_dtype = torch.float64 if self.model_dtype == torch.float64 else torch.float32

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(max_frames, int) or max_frames < 2:
            raise ValueError(f"max_frames must be an integer >= 2 (first and last state), got {max_frames!r}")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got {rtol}, {atol}")
        if not grid_shift > 0:
            raise ValueError(f"grid_shift must be > 0, got {grid_shift}")
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.rtol, self.atol = float(rtol), float(atol)
        self.grid_shift = float(grid_shift)
        s = self._resolve(steps, method, grid, cfg_scale, guidance_interval, precision)
        self.steps, self.method, self.grid, self.cfg_scale, self.guidance_interval, self.precision = s

        self.last_nfe: int = 0
        self.last_nfe_per_chunk: list[int] = []
        self.last_labels: torch.Tensor | None = None  # (n,) int64 on CPU, None for an unconditional model
        self.last_seed: int | None = None
        self.last_precision: str | None = None  # "bf16" or "fp32", resolved by the last call
        self._nfe = 0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, ema: bool = True, device: str | torch.device | None = None, **sampler_kwargs: Any
    ) -> Sampler:
        """A Sampler for the DiT stored in a training checkpoint, with its EMA (default) or raw weights.

        The checkpoint is read onto the CPU whatever device saved it, then the model moves to ``device``:
        "auto" or None (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or "mps"; a device this machine
        lacks is a ValueError. ``sampler_kwargs`` go to the constructor.
        """
        device = parse_device(device)
        model = model_from_checkpoint(load_checkpoint(path), ema=ema, device=device)
        return cls(model, **sampler_kwargs)

    # ------------------------------------------------------------------ argument checks

    def resolved_precision(self, precision: str | None = None) -> str:
        """What precision (default: this sampler's) means on the model's device: "bf16" or "fp32"."""
        return resolve_precision(self.precision if precision is None else precision, self.device)

    def _resolve(
        self,
        steps: int | None,
        method: str | None,
        grid: str | None,
        cfg_scale: float | None,
        guidance_interval: Sequence[float] | None,
        precision: str | None,
    ) -> _Settings:
        steps = getattr(self, "steps", None) if steps is None else steps
        method = getattr(self, "method", None) if method is None else method
        grid = getattr(self, "grid", None) if grid is None else grid
        cfg_scale = getattr(self, "cfg_scale", None) if cfg_scale is None else cfg_scale
        interval = getattr(self, "guidance_interval", None) if guidance_interval is None else guidance_interval
        precision = getattr(self, "precision", None) if precision is None else precision
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if method not in SOLVERS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(SOLVERS)}")
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        cfg_scale = float(cfg_scale)
        if not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
        if cfg_scale != 1.0 and self.num_classes == 0:
            raise ValueError(
                f"cfg_scale={cfg_scale} needs a class-conditional model; this one is unconditional (use 1.0)"
            )
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_interval must be two numbers (t_lo, t_hi), got {interval!r}") from None
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got ({lo}, {hi})")
        return _Settings(steps, method, grid, cfg_scale, (lo, hi), precision)

    def _check_labels(self, y: torch.Tensor | Sequence[int] | int | None, n: int) -> torch.Tensor | None:
        """Labels (n,) int64 on CPU, checked here so a bad label fails before any work, on any device."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes=0): sample without labels y")
            return None
        if y is None:
            return None
        if isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((n,), y, dtype=torch.int64)
        y = torch.as_tensor(y).detach().cpu()
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"expected {n} labels y of shape ({n},), got shape {tuple(y.shape)}")
        y = y.long()
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got min {int(y.min())} max {int(y.max())}")
        return y

    def _check_noise(self, noise: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if noise is None:
            return None
        expected = (n, self.in_channels, self.input_size, self.input_size)
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != expected or not noise.is_floating_point():
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a float tensor of shape {expected}, got {got}")
        return noise

    # ------------------------------------------------------------------ velocity

    def velocity(
        self,
        x: torch.Tensor,
        t: float | torch.Tensor,
        y: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        precision: str | None = None,
    ) -> torch.Tensor:
        """Guided velocity (N, C, H, W) at states x (N, C, H, W) and one time t, in the state's dtype.

        Classifier-free guidance v_u + s (v_c - v_u) goes through the model's ``forward_with_cfg`` only for
        t inside [t_lo, t_hi] (guidance interval, Kynkäänniemi et al. 2024); elsewhere, and whenever the
        scale is 1, a single conditional pass of N runs. Each call counts as one network evaluation.
        precision: "auto", "bf16" or "fp32" (default: the sampler's); only the network runs in it.
        """
        t = float(t)
        lo, hi = guidance_interval
        scale = cfg_scale if lo <= t <= hi else 1.0
        bf16 = self.resolved_precision(precision) == "bf16"
        # t stays in the state's precision even for a bf16 network: bf16 would round 0.998 to 1.0.
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        xin = x.to(self.model_dtype)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if self.num_classes == 0:
                v = self.model(xin, tt)
            else:
                v = self.model.forward_with_cfg(xin, tt, y, scale)
        self._nfe += 1
        # Under autocast the network (and forward_with_cfg's guidance sum) returns bf16: the velocity goes
        # back to the state's float32 (float64) here, so the ODE state itself never drops to bf16.
        return v.to(x.dtype)

    # ------------------------------------------------------------------ sampling

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        y: torch.Tensor | Sequence[int] | int | None = None,
        *,
        cfg_scale: float | None = None,
        steps: int | None = None,
        method: str | None = None,
        grid: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
        precision: str | None = None,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Generate n images (n, C, H, W) in [0, 1], float32 on the model's device.

        y: labels (n,), or one int for every sample; None draws uniform random classes for a conditional
        model (they are kept in ``last_labels``). noise: the state x at t = 0, (n, C, H, W); with noise,
        seed only draws the random labels. seed: makes the call repeatable; sample i's noise depends only
        on (seed, i), so results do not depend on n or batch_size. Without noise and seed, a seed is drawn
        from torch's global generator (kept in ``last_seed``). The other keywords override the
        constructor's defaults for this call.

        With return_trajectory=True returns (images, trajectory): raw states (K, n, C, H, W), float32 on
        CPU, K <= max_frames, the first frame the noise and the last the final state. On a fixed grid the
        frames are evenly spread over the steps; with dopri5 over time.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        steps, method, grid, cfg_scale, interval, precision = self._resolve(
            steps, method, grid, cfg_scale, guidance_interval, precision
        )
        y = self._check_labels(y, n)
        noise = self._check_noise(noise, n)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if seed is None and noise is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        if self.num_classes > 0 and y is None:
            y = _seeded_labels(seed if seed is not None else int(torch.randint(0, 2**62, (1,))), n, self.num_classes)
        self.last_seed, self.last_labels = seed, y
        precision = self.last_precision = resolve_precision(precision, self.device)

        ts = time_grid(steps, grid, self.grid_shift).tolist()
        if method == "dopri5":
            frames = list(range(self.max_frames)) if return_trajectory else []
        else:
            frames = frame_indices(steps, self.max_frames) if return_trajectory else []
        shape = (self.in_channels, self.input_size, self.input_size)

        def f(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
            return self.velocity(x, t, yb, cfg_scale, interval, precision)

        images, trajectory, nfes = [], [], []
        chunks = range(0, n, self.batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="sampling", unit="batch", total=math.ceil(n / self.batch_size))
        with self._eval_mode():
            for start in chunks:
                stop = min(start + self.batch_size, n)
                x = noise[start:stop] if noise is not None else seeded_noise(seed, start, stop, shape)
                x = x.to(self.device, self.state_dtype)
                yb = y[start:stop].to(self.device) if y is not None else None
                self._nfe = 0
                if method == "dopri5":
                    x, kept = solve_dopri5(f, x, len(frames), self.rtol, self.atol)
                else:
                    x, kept = solve_fixed(f, x, ts, method, frames)
                nfes.append(self._nfe)
                images.append(((x.float() + 1) / 2).clamp_(0, 1))
                if return_trajectory:
                    trajectory.append(torch.stack(kept))  # (K, b, C, H, W)
        self.last_nfe_per_chunk = nfes
        self.last_nfe = max(nfes)
        out = torch.cat(images)
        if return_trajectory:
            return out, torch.cat(trajectory, dim=1)
        return out

    def sample_each_class(
        self,
        n_per_class: int,
        *,
        cfg_scale: float | None = None,
        steps: int | None = None,
        method: str | None = None,
        grid: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
        precision: str | None = None,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n_per_class samples of every class, (n_per_class * num_classes, C, H, W), as ``sample`` returns.

        Labels are arange(num_classes).repeat(n_per_class): a grid with nrow=num_classes shows one class
        per column and one sample of every class per row.
        """
        if self.num_classes == 0:
            raise ValueError("sample_each_class needs a class-conditional model; this one is unconditional")
        if not isinstance(n_per_class, int) or isinstance(n_per_class, bool) or n_per_class < 1:
            raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
        y = torch.arange(self.num_classes).repeat(n_per_class)
        return self.sample(
            len(y), y, cfg_scale=cfg_scale, steps=steps, method=method, grid=grid,
            guidance_interval=guidance_interval, precision=precision, noise=noise, seed=seed,
            return_trajectory=return_trajectory, progress=progress,
        )  # fmt: skip


#################################################################################
#                                 Command line                                  #
#################################################################################


@dataclass(kw_only=True)
class SampleConfig(SamplingConfig):
    """Everything the sampler CLI needs: the shared sampling flags (``SamplingConfig``) plus input and output."""

    ckpt: str
    n: int = 64
    out: str = "samples.png"
    gif: str | None = None
    npz: str | None = None
    class_label: int | None = None
    each_class: bool = False
    ema: bool = True
    device: str = "auto"
    nrow: int | None = None
    fps: int = 10
    max_frames: int = 50
    overwrite: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sampler.py",
        description="Sample images from a trained DiT checkpoint by integrating the flow ODE (t=0 noise, t=1 data).",
    )
    g = p.add_argument_group("input and output")
    g.add_argument(
        "--ckpt", required=True, help="training checkpoint written by train.py, e.g. runs/cifar10/checkpoints/last.pt"
    )
    g.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights instead of the EMA")
    g.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps (default %(default)s)",
    )
    g.add_argument(
        "--n",
        type=positive_int,
        default=64,
        help="number of samples, per class with --each-class (default %(default)s)",
    )
    g.add_argument("--class-label", type=int, default=None, help="sample only this class (default: random classes)")
    g.add_argument("--each-class", action="store_true", help="--n samples of every class, one class per column")
    g.add_argument("--out", default="samples.png", help="PNG grid of the samples (default %(default)s)")
    g.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: about sqrt(n))")
    g.add_argument("--gif", default=None, help="also write the sampling trajectory as a GIF here")
    g.add_argument("--fps", type=positive_int, default=10, help="GIF frames per second (default %(default)s)")
    g.add_argument(
        "--max-frames",
        type=int,
        default=50,
        help="at most this many trajectory frames in the GIF (default %(default)s)",
    )
    g.add_argument("--npz", default=None, help="also write uint8 HWC images and labels to this .npz")
    g.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    add_sampling_args(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    """Parse command-line flags into a SampleConfig."""
    return SampleConfig(**vars(build_parser().parse_args(argv)))


def _check_outputs(cfg: SampleConfig) -> list[Path]:
    outputs = [(cfg.out, (".png", ".jpg", ".jpeg")), (cfg.gif, (".gif",)), (cfg.npz, (".npz",))]
    paths = []
    for path, suffixes in outputs:
        if path is None:
            continue
        path = Path(path)
        if path.suffix.lower() not in suffixes:
            raise ValueError(f"{path} must end in {' or '.join(suffixes)}")
        if path.exists() and not cfg.overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it")
        paths.append(path)
    return paths


def main(cfg: SampleConfig) -> dict[str, Any]:
    """Sample from cfg.ckpt and write the grid (and GIF / npz). Returns images (N, C, H, W) in [0, 1] on CPU,
    labels (N,) or None, the NFE, the resolved precision and the config."""
    _check_outputs(cfg)  # before any work, so a run never ends by failing to write
    if cfg.class_label is not None and cfg.each_class:
        raise ValueError("--class-label and --each-class exclude each other")
    device = parse_device(cfg.device)  # a bad --device fails before the checkpoint is read
    sampler = Sampler.from_checkpoint(
        cfg.ckpt, ema=cfg.ema, device=device, max_frames=cfg.max_frames, **cfg.sampler_kwargs()
    )
    want_traj = cfg.gif is not None
    if cfg.each_class:
        result = sampler.sample_each_class(cfg.n, seed=cfg.seed, return_trajectory=want_traj, progress=True)
        nrow = cfg.nrow or sampler.num_classes
    else:
        result = sampler.sample(cfg.n, cfg.class_label, seed=cfg.seed, return_trajectory=want_traj, progress=True)
        nrow = cfg.nrow or math.ceil(math.sqrt(cfg.n))
    images, trajectory = result if want_traj else (result, None)
    images = images.cpu()
    save_grid(images, cfg.out, nrow=nrow)
    written = [cfg.out]
    if trajectory is not None:
        to_gif(trajectory, cfg.gif, fps=cfg.fps, nrow=nrow)
        written.append(cfg.gif)
    if cfg.npz is not None:
        save_npz(images, sampler.last_labels, cfg.npz)
        written.append(cfg.npz)
    solver = "dopri5" if sampler.method == "dopri5" else f"{sampler.method} on a {sampler.grid} grid"
    how = f"{solver}, NFE {sampler.last_nfe}, {sampler.last_precision} on {device}"
    print(f"{len(images)} samples, {how}: {', '.join(written)}")
    return {
        "images": images, "labels": sampler.last_labels, "nfe": sampler.last_nfe,
        "precision": sampler.last_precision, "config": asdict(cfg),
    }  # fmt: skip


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point: known errors become one line on stderr and a non-zero exit."""
    cfg = parse_args(argv)
    try:
        main(cfg)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])
