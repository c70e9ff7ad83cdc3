"""Sampling: integrate the flow ODE dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1), or jump along an
average velocity.

Time convention (owned by ``objectives/flow.py``): t = 0 is pure noise, t = 1 is data, and the network predicts
the velocity dx/dt. An average-velocity network (``model.average_velocity``) also takes the length h of a jump
and then predicts the average velocity over [t, t + h]; the "mean" method jumps along it.

``Sampler`` wraps a network into such a velocity (guidance, precision, batching, seeds), checks what it is given
(the network itself checks nothing), and runs a method of ``sampling/solvers.py`` on a time grid, or dopri5.
``Sampler.generate`` returns ``Samples``: the images with the labels, NFE, seed and precision of that call. Its
options (``SamplingOptions``) are the defaults of every call, which may override them, and also the sampling flags
of sampler.py and evaluate.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torchdiffeq import odeint
from tqdm import tqdm

from models import model_from_checkpoint, upgraded_config
from models.cost import count_params
from models.vae import LatentCodec, LatentSpace
from sampling.solvers import ADAPTIVE, GRIDS, METHODS, SOLVERS, frame_indices, get_solver, time_grid
from utils.checkpoint import load_checkpoint
from utils.config import Config, ConfigError, arg
from utils.device import PRECISIONS, autocast, module_device_dtype, resolve_device, resolve_precision, unwrap_model

DEFAULT_METHOD = "heun"  # for a network without a checkpoint (whose objective names its own)

METHOD_HELP = (
    "sampling method (default: the sample_method of the checkpoint's objective; heun for a bare network). "
    "Fixed-grid, NFE = steps x: "
    + "; ".join(f"{name} {s.nfe_per_step} ({s.about})" for name, s in SOLVERS.items())
    + "; "
    + ", ".join(ADAPTIVE)
    + ": adaptive ODE solver (rtol, atol), NFE its own"
)


@dataclass(kw_only=True)
class SamplingOptions(Config):
    """How ``Sampler.generate`` samples: method, grid, guidance, precision, batching. Also sampler.py's and
    evaluate.py's sampling flags. ``method`` None is the default method (``Sampler``, ``Sampler.from_checkpoint``)."""

    steps: int = arg(50, "steps on the time grid (not dopri5)", min=1, group="sampling")
    method: str | None = arg(None, METHOD_HELP, choices=METHODS)
    grid: str = arg("uniform", "time grid of the fixed-grid methods", choices=GRIDS)
    grid_shift: float = arg(
        3.0,
        "shift s of --grid shifted: s > 1 puts more steps near the data (t=1); this is "
        "SD3/Flux's shift run the other way (their shift > 1 puts steps near the noise): s here is "
        "their 1/shift",
        gt=0,
    )
    cfg_scale: float = arg(1.0, "classifier-free guidance scale; 1 disables it")
    guidance_interval: tuple[float, float] = arg(
        (0.0, 1.0),
        "apply guidance only for t in [T_LO, T_HI] (Kynkäänniemi et al. 2024); t=0 noise, t=1 data",
        metavar=("T_LO", "T_HI"),
    )
    rtol: float = arg(1e-5, "dopri5 relative tolerance", gt=0)
    atol: float = arg(1e-5, "dopri5 absolute tolerance", gt=0)
    precision: str = arg(
        "auto",
        "network precision: auto is bf16 autocast on CUDA, fp32 elsewhere; the ODE state stays float32",
        choices=PRECISIONS,
    )
    batch_size: int = arg(256, "samples per forward batch (bounds memory)", min=1)
    max_frames: int = arg(50, "at most this many trajectory frames (GIFs)", min=2)
    decode: bool = arg(
        True,
        "latent models: decode the samples to images through the checkpoint's VAE (--no-decode: return the latents)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got ({lo}, {hi})")


def sampling_options(cfg: SamplingOptions) -> dict[str, Any]:
    """The ``SamplingOptions`` fields of cfg (a script's config that extends them), as ``Sampler`` keywords."""
    return {f.name: getattr(cfg, f.name) for f in fields(SamplingOptions)}


def checkpoint_decoder(state: dict[str, Any], device: torch.device, vae: str | None = None) -> Any | None:
    """The ``models.vae.LatentCodec`` that decodes the samples of a checkpoint trained on latents (its
    "latent_space"; ``vae`` another copy of its VAE), on device; None for a pixel-space checkpoint."""
    space = state.get("latent_space")
    if not space:
        return None
    return LatentCodec.from_space(LatentSpace.from_dict(space), device, vae=vae)


def checkpoint_sample_method(state: dict[str, Any]) -> str:
    """The method a checkpoint's network samples with by default: the one its objective recorded ("sample_method");
    for checkpoints from before that, "mean" for an average-velocity network, else heun."""
    average = upgraded_config(state["model_config"]).get("average_velocity")
    return state.get("sample_method") or ("mean" if average else DEFAULT_METHOD)


class SamplingStopped(Exception):
    """A ``should_stop`` callback asked to stop between chunks (a training run's stop request): the call returns
    nothing, so no partial result can be mistaken for a whole one."""


@dataclass(frozen=True)
class Samples:
    """What one ``Sampler.generate`` call made.

    images: (n, C, H, W) float32 in [0, 1], on the model's device; for a latent model the images its VAE decodes
    (``decode`` off: the latents themselves, unclipped). labels: (n,) int64 on the CPU, those given or
    drawn; None for an unconditional model. trajectory: raw states (K, n, C, H, W) float32 on the CPU, K <=
    max_frames, the first frame the noise and the last the final state; None unless asked for. nfe: network
    evaluations per sample path, the largest over the chunks of batch_size; nfe_per_chunk: each chunk's.
    seed: the seed the noise (and random labels) came from; None when nothing was drawn. precision: the network
    precision that ran ("auto" resolved).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    trajectory: torch.Tensor | None
    nfe: int
    nfe_per_chunk: list[int]
    seed: int | None
    precision: str


#################################################################################
#                                Noise and labels                               #
#################################################################################


def seeded_noise(seed: int, indices: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Noise (len(indices), *shape) float32 on the CPU; sample i depends only on (seed, i).

    One generator per sample keeps a sample's noise independent of n and of the batch size; the spawn key
    keeps the streams of different (seed, i) apart (torch's CPU generator keeps only 32 seed bits).
    """
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for j, i in enumerate(indices):
        out[j] = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, i))).standard_normal(shape)
    return torch.from_numpy(out)


def seeded_labels(seed: int, n: int, num_classes: int) -> torch.Tensor:
    """Uniform random labels (n,) int64 from the seed alone."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    return torch.from_numpy(rng.integers(0, num_classes, size=n, dtype=np.int64))


#################################################################################
#                                    Sampler                                    #
#################################################################################


class Sampler:
    """Sampler for a DiT: classifier-free guidance with a guidance interval, fixed-grid methods and dopri5.

    ``Sampler(model, steps=20, method="heun")``: keyword options are ``SamplingOptions`` fields, the defaults of
    every call. ``method`` None (the default) is heun here and the objective's own method in ``from_checkpoint``;
    ``options.method`` always holds the resolved one. Works on any model with ``input_size``, ``in_channels`` and
    ``num_classes`` (0 for an unconditional model) that maps (x, t, y) to a velocity; one with
    ``average_velocity = True`` also takes ``interval=``. A latent model (``latent``, or a ``decoder``: a
    ``models.vae.LatentCodec``) generates latents that ``decoder`` turns into images (``SamplingOptions.decode``).

    NFE (``Samples.nfe``) counts evaluations of the velocity field per sample path: one call on the whole batch
    counts once, a guided call (one pass of 2N) too; fixed-grid methods make ``nfe_per_step * steps``
    (``sampling.solvers.SOLVERS``), dopri5 chooses its own. The ODE state, the times and the velocity handed to the
    solver stay float32 (float64 for a float64 model) whatever the network runs in. The model is used unwrapped
    (no DDP / torch.compile wrapper), in eval mode; its mode is restored afterwards. A call's results come back in
    its ``Samples``; the Sampler keeps no state between calls.
    """

    def __init__(self, model: nn.Module, decoder: Any | None = None, latent: bool = False, **options: Any):
        self.model = unwrap_model(model)
        self.decoder = decoder  # latent models: a models.vae.LatentCodec whose decode() makes images of samples
        self.latent = latent or decoder is not None  # the network generates latents, not pixels
        o = SamplingOptions(**options)
        self.options = o if o.method is not None else dataclasses.replace(o, method=DEFAULT_METHOD)
        self.input_size = int(self.model.input_size)
        self.in_channels = int(self.model.in_channels)
        self.num_classes = int(getattr(self.model, "num_classes", 0))
        self.average_velocity = bool(getattr(self.model, "average_velocity", False))
        # A network that takes the guidance scale as an input (its ``guidance_max``) samples guided in one pass of N,
        # at scales in the range it was trained on; None: ordinary classifier-free guidance, any scale.
        top = float(getattr(self.model, "guidance_max", 0.0) or 0.0)
        self.guidance_range: tuple[float, float] | None = (1.0, top) if top else None
        self.device, self.model_dtype = module_device_dtype(self.model)
        self.state_dtype = torch.float64 if self.model_dtype == torch.float64 else torch.float32
        self._check_scale(self.options)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        ema: bool = True,
        device: str | torch.device = "auto",
        vae: str | None = None,
        **options: Any,
    ) -> Sampler:
        """A Sampler for the DiT of a training checkpoint, with its EMA (default) or raw weights, on device
        ("auto", "cpu", "cuda", "cuda:N" or "mps"; the file loads on any device whatever device saved it).
        Without a ``method`` (or with None) it samples with its objective's ``sample_method``. A latent DiT's
        samples are decoded by the VAE its checkpoint names (``vae``: another copy of it, a folder or hub id),
        loaded only when ``decode`` is on."""
        device = resolve_device(str(device))
        state = load_checkpoint(path)
        if options.get("method") is None:
            options = {**options, "method": checkpoint_sample_method(state)}
        model = model_from_checkpoint(state, ema=ema, device=device)
        decoder = checkpoint_decoder(state, device, vae) if options.get("decode", True) else None
        return cls(model, decoder, latent=bool(state.get("latent_space")), **options)

    def __repr__(self) -> str:
        shape = f"{self.in_channels}x{self.input_size}x{self.input_size}{' latent' if self.latent else ''}"
        classes = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        kind = "average-velocity " if self.average_velocity else ""
        if self.guidance_range is not None:
            kind += f"guidance-input [{self.guidance_range[0]:g}, {self.guidance_range[1]:g}] "
        o = self.options
        return (
            f"Sampler({type(self.model).__name__} {kind}{count_params(self.model) / 1e6:.2f}M params, {classes}, "
            f"{shape} images, {self.device}; {o.method} {o.steps} steps on a {o.grid} grid, cfg {o.cfg_scale:g}, "
            f"precision {o.precision}, batch {o.batch_size})"
        )

    def velocity(
        self,
        x: torch.Tensor,
        t: float,
        y: torch.Tensor | None = None,
        interval: float | None = None,
        options: SamplingOptions | None = None,
    ) -> torch.Tensor:
        """Guided velocity (N, C, H, W) at states x (N, C, H, W), one time t and labels y (N,) (None for an
        unconditional model), in the state's dtype; inputs are checked (one-line ValueErrors).

        Guidance v_u + s (v_c - v_u) runs through the model's ``forward_with_cfg`` only for t inside the guidance
        interval; elsewhere, and at scale 1, one conditional pass runs. A network with a guidance input
        (``guidance_range``) takes the scale instead, in one pass of N (scale 1 outside the interval). ``interval``:
        the jump length of an average-velocity network (its average velocity over [t, t + interval]).
        """
        o = options or self.options
        if x.ndim != 4 or tuple(x.shape[1:]) != self._image_shape() or not x.is_floating_point():
            raise ValueError(
                f"x must be a float tensor of shape (N, {', '.join(map(str, self._image_shape()))}), "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        if not isinstance(t, int | float) and not (isinstance(t, torch.Tensor) and t.numel() == 1):
            got = f"a tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be one number, got {got}")
        if interval is not None and not self.average_velocity:
            raise ValueError("an interval needs an average-velocity network (model.average_velocity), not this one")
        self._check_scale(o)
        y = self._labels(y, x.shape[0], o)
        return self._velocity(x, t, None if y is None else y.to(x.device), interval, o)

    def _velocity(
        self, x: torch.Tensor, t: float, y: torch.Tensor | None, interval: float | None, o: SamplingOptions
    ) -> torch.Tensor:
        """``velocity`` without the checks: the solvers' inner loop."""
        lo, hi = o.guidance_interval
        scale = o.cfg_scale if lo <= float(t) <= hi else 1.0
        n = x.shape[0]
        # t stays in the state's precision even for a bf16 network: bf16 would round 0.998 to 1.0.
        tt = torch.full((n,), float(t), device=x.device, dtype=x.dtype)
        extra = {} if interval is None else {"interval": torch.full_like(tt, float(interval))}
        with autocast(x.device, resolve_precision(o.precision, self.device)):
            if self.num_classes == 0:
                v = self.model(x.to(self.model_dtype), tt, **extra)
            else:
                v = self.model.forward_with_cfg(x.to(self.model_dtype), tt, y, scale, **extra)
        return v.to(x.dtype)  # the ODE state never drops to the network's bf16

    @torch.inference_mode()
    def generate(
        self,
        n: int,
        y: torch.Tensor | Sequence[int] | int | None = None,
        *,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        trajectory: bool = False,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
        **options: Any,
    ) -> Samples:
        """Generate n images (n, C, H, W) in [0, 1] and what the call did (``Samples``).

        y: labels (n,) of any integer dtype, or one int for every sample; None draws uniform random classes for a
        conditional model (``Samples.labels``). noise: the state at t = 0, (n, C, H, W); with noise, seed only
        draws the random labels. seed: makes the call repeatable; sample i's noise depends only on (seed, i), so
        results do not depend on n or batch_size. Without a seed one is drawn from torch's global generator
        whenever something is random (``Samples.seed``). ``options`` override the sampler's ``SamplingOptions``
        for this call (a misspelled one is a TypeError; method None is the sampler's method).

        trajectory=True also returns the raw states (K, n, C, H, W) on the CPU, K <= max_frames: on a fixed grid
        the frames are spread evenly over the steps; with dopri5 over time.

        should_stop: asked before each chunk of batch_size samples; when it returns True the call raises
        ``SamplingStopped`` (what a training run's diagnostics pass, so that a signal acts within a chunk).
        """
        o = self._options(options)
        y, noise, seed = self._check(n, y, noise, seed, o)
        shape = self._image_shape()
        ts = time_grid(o.steps, o.grid, o.grid_shift).tolist()
        if not trajectory:
            frames = []
        elif o.method in ADAPTIVE:
            frames = list(range(o.max_frames))
        else:
            frames = frame_indices(o.steps, o.max_frames)

        images, kept_frames, nfe_per_chunk = [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(range(0, n, o.batch_size), desc="sampling", unit="batch", disable=not progress):
                if should_stop is not None and should_stop():
                    raise SamplingStopped(f"stopped after {start} of {n} samples")
                stop = min(start + o.batch_size, n)
                x = noise[start:stop] if noise is not None else seeded_noise(seed, range(start, stop), shape)
                yb = y[start:stop].to(self.device) if y is not None else None
                x, kept, nfe = self._integrate(x.to(self.device, self.state_dtype), yb, ts, frames, o)
                nfe_per_chunk.append(nfe)
                images.append(self.to_images(x, o))
                kept_frames += [torch.stack(kept)] if frames else []  # (K, b, C, H, W)
        finally:
            self.model.train(was_training)
        return Samples(
            images=torch.cat(images),
            labels=y,
            trajectory=torch.cat(kept_frames, dim=1) if frames else None,
            nfe=max(nfe_per_chunk),
            nfe_per_chunk=nfe_per_chunk,
            seed=seed,
            precision=resolve_precision(o.precision, self.device),
        )

    def to_images(self, x: torch.Tensor, options: SamplingOptions | None = None) -> torch.Tensor:
        """Final states x (n, C, H, W) -> images float32 in [0, 1]: decoded by a latent model's VAE, else mapped from
        [-1, 1]; with ``decode`` off a latent model's states are returned as they are."""
        o = options or self.options
        if not self.latent:
            return ((x.float() + 1) / 2).clamp_(0, 1)
        if not o.decode:
            return x.float()
        if self.decoder is None:
            raise ValueError(
                "this latent model has no decoder: pass decoder= (a models.vae.LatentCodec), load it with "
                "Sampler.from_checkpoint, or sample with decode=False"
            )
        return self.decoder.decode(x)

    def trajectory_images(self, trajectory: torch.Tensor, max_frames: int | None = None) -> torch.Tensor:
        """A trajectory (K, n, C, H, W) as images in [0, 1], decoded for a latent model (at most ``max_frames``
        frames, spread evenly and always the first and last: decoding every frame costs a VAE pass each)."""
        k = trajectory.shape[0]
        if max_frames is not None and k > max_frames:
            trajectory = trajectory[torch.linspace(0, k - 1, max_frames).round().long()]
        frames = [self.to_images(frame.to(self.device)).cpu() for frame in trajectory]
        return torch.stack(frames)

    def generate_each_class(self, n_per_class: int, classes: Sequence[int] | None = None, **kwargs: Any) -> Samples:
        """n_per_class samples of every class (or of ``classes``, in their order), the i-th class in rows
        i * n_per_class ...: a grid with nrow=n_per_class shows one class per row. Keywords as for ``generate``."""
        if self.num_classes == 0:
            raise ValueError("sampling each class needs a class-conditional model; this one is unconditional")
        if not isinstance(n_per_class, int) or isinstance(n_per_class, bool) or n_per_class < 1:
            raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
        if classes is not None and len(classes) == 0:
            raise ValueError("classes must name at least one class")
        each = torch.arange(self.num_classes) if classes is None else torch.as_tensor(list(classes))
        y = each.repeat_interleave(n_per_class)
        return self.generate(len(y), y, **kwargs)

    def sample(
        self,
        n: int,
        y: torch.Tensor | Sequence[int] | int | None = None,
        *,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``generate``'s images (n, C, H, W) in [0, 1]; with return_trajectory=True (images, trajectory (K, n, C,
        H, W)). For notebooks: ``generate`` also returns the labels, NFE, seed and precision."""
        out = self.generate(n, y, noise=noise, seed=seed, trajectory=return_trajectory, progress=progress, **options)
        return (out.images, out.trajectory) if return_trajectory else out.images

    def sample_each_class(
        self, n_per_class: int, *, return_trajectory: bool = False, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``generate_each_class``'s images (classes * n_per_class, C, H, W), with return_trajectory=True also the
        trajectory (K, classes * n_per_class, C, H, W)."""
        out = self.generate_each_class(n_per_class, trajectory=return_trajectory, **kwargs)
        return (out.images, out.trajectory) if return_trajectory else out.images

    def _integrate(
        self, x: torch.Tensor, y: torch.Tensor | None, ts: list[float], frames: list[int], o: SamplingOptions
    ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """The final state from x (b, C, H, W) at t = 0, the kept frames (float32, on the CPU) and the NFE."""
        nfe = 0

        def f(x: torch.Tensor, t: float, h: float | None = None) -> torch.Tensor:
            nonlocal nfe
            nfe += 1
            return self._velocity(x, t, y, h, o)

        if o.method in ADAPTIVE:  # dense output gives the frames without extra solver steps
            times = torch.linspace(0.0, 1.0, max(len(frames), 2), device=x.device, dtype=x.dtype)
            states = odeint(lambda t, s: f(s, t), x, times, rtol=o.rtol, atol=o.atol, method=o.method)
            return states[-1], [s.float().cpu() for s in states] if frames else [], nfe
        step = get_solver(o.method).step  # an unknown name is an error here, never some other method
        kept = [x.float().cpu()] if 0 in frames else []
        for i in range(o.steps):
            x = step(f, x, ts[i], ts[i + 1])
            if i + 1 in frames:
                kept.append(x.float().cpu())
        return x, kept, nfe

    def _options(self, options: dict[str, Any]) -> SamplingOptions:
        """The sampler's options with a call's overrides (method None keeps the sampler's method)."""
        if options.get("method", "") is None:
            options = {k: v for k, v in options.items() if k != "method"}
        return dataclasses.replace(self.options, **options) if options else self.options

    def _image_shape(self) -> tuple[int, int, int]:
        return self.in_channels, self.input_size, self.input_size

    def _check(
        self, n: int, y: Any, noise: torch.Tensor | None, seed: int | None, o: SamplingOptions
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None]:
        """One-line ValueErrors for arguments that cannot work; labels (n,) int64 on the CPU and the seed."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._check_scale(o)
        solver = SOLVERS.get(o.method)
        if solver is not None and solver.average_velocity and not self.average_velocity:
            raise ValueError(
                f"method {o.method!r} needs an average-velocity network (one trained with an objective "
                f"whose sample_method is {o.method!r})"
            )
        expected = (n, *self._image_shape())
        if noise is not None and (
            not isinstance(noise, torch.Tensor) or tuple(noise.shape) != expected or not noise.is_floating_point()
        ):
            got = f"{tuple(noise.shape)} {noise.dtype}" if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a float tensor of shape {expected}, got {got}")
        random_labels = self.num_classes > 0 and y is None
        if seed is None and (noise is None or random_labels):
            seed = int(torch.randint(0, 2**62, (1,)))
        y = seeded_labels(seed, n, self.num_classes) if random_labels else self._labels(y, n, o)
        return y, noise, seed

    def _check_scale(self, o: SamplingOptions) -> None:
        """A one-line ValueError for a guidance scale outside the range a guidance-input network was trained on."""
        if self.guidance_range is not None and not self.guidance_range[0] <= o.cfg_scale <= self.guidance_range[1]:
            lo, hi = self.guidance_range
            raise ValueError(
                f"cfg_scale {o.cfg_scale:g} is outside [{lo:g}, {hi:g}], the guidance scales this network "
                "takes as an input and was trained on"
            )

    def _labels(self, y: Any, n: int, o: SamplingOptions) -> torch.Tensor | None:
        """Labels y checked against the model: (n,) int64 on the CPU (an int: every sample), None if unconditional."""
        if self.num_classes == 0:
            if y is not None or o.cfg_scale != 1.0:
                raise ValueError("this model is unconditional (num_classes=0): sample without labels, at cfg_scale 1")
            return None
        if y is None:
            raise ValueError(f"this model is class-conditional: pass labels y of shape ({n},)")
        if isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((n,), y)
        try:
            y = torch.as_tensor(y).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"labels y must be integers, got {type(y).__name__}") from None
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"expected {n} labels y of shape ({n},), got shape {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got min {int(y.min())} max {int(y.max())}")
        return y.long()
