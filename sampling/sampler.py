"""Sampling: integrate the flow ODE dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1; the convention of
objectives/flow.py), or jump along an average velocity over [t, t + h] (the "mean" method).

``Sampler`` wraps a network into such a velocity (guidance, precision, batching, seeds), checks what it is given
(the network itself checks nothing), and runs a method of ``sampling/solvers.py`` on a time grid, or dopri5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torchdiffeq import odeint
from tqdm import tqdm

from models import model_from_checkpoint, upgraded_config
from models.cost import count_params
from models.vae import LatentCodec, LatentSpace
from sampling import solvers
from sampling.options import (
    DEFAULT_METHOD,
    Samples,
    SamplingOptions,
    SamplingStopped,
    seeded_labels,
    seeded_noise,
    step_noise,
)
from sampling.solvers import ADAPTIVE, SOLVERS, frame_indices, get_solver, time_grid
from utils.checkpoint import load_checkpoint
from utils.device import autocast, module_device_dtype, resolve_device, resolve_precision, unwrap_model

Labels = torch.Tensor | Sequence[int] | int | None  # (n,) labels, one for all, or None (random classes)


class Sampler:
    """Sampler for any network mapping (x, t, y) to a velocity (docs/sampling.md); ``options`` are
    ``SamplingOptions``, the defaults of every call. NFE counts evaluations per sample path (a guided pass once)."""

    def __init__(self, model: nn.Module, decoder: Any | None = None, latent: bool = False, **options: Any):
        self.model = unwrap_model(model)
        self._decoder = decoder  # latent models: a models.vae.LatentCodec (or what loads it, called when needed)
        self.latent = latent or decoder is not None  # the network generates latents, not pixels
        o = SamplingOptions(**options)
        self.options = o if o.method is not None else dataclasses.replace(o, method=DEFAULT_METHOD)
        self.input_size = int(self.model.input_size)
        self.in_channels = int(self.model.in_channels)
        self.num_classes = int(getattr(self.model, "num_classes", 0))
        self.average_velocity = bool(getattr(self.model, "average_velocity", False))
        # A guidance-input network (``guidance_max``) takes the scales it was trained on; None: any scale.
        top = float(getattr(self.model, "guidance_max", 0.0) or 0.0)
        self.guidance_range: tuple[float, float] | None = (1.0, top) if top else None
        self.device, self.model_dtype = module_device_dtype(self.model)
        self.state_dtype = torch.float64 if self.model_dtype == torch.float64 else torch.float32
        self._check_scale(self.options)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | dict[str, Any],
        ema: bool = True,
        device: str | torch.device = "auto",
        vae: str | None = None,
        **options: Any,
    ) -> Sampler:
        """A Sampler for a checkpoint (a file or loaded), EMA or raw weights, by default with its objective's method;
        a latent DiT decodes through the VAE the checkpoint names (``vae``: another copy), loaded when first needed."""
        device = resolve_device(str(device))
        state = path if isinstance(path, dict) else load_checkpoint(path)
        if options.get("method") is None:  # older checkpoints name none: "mean" for an average-velocity network
            average = upgraded_config(state["model_config"]).get("average_velocity")
            options = {**options, "method": state.get("sample_method") or ("mean" if average else DEFAULT_METHOD)}
        model = model_from_checkpoint(state, ema=ema, device=device)
        space = state.get("latent_space")
        decoder = lambda: LatentCodec.from_space(LatentSpace.from_dict(space), device, vae=vae)
        return cls(model, decoder if space and options.get("decode", True) else None, latent=bool(space), **options)

    @property
    def decoder(self) -> Any | None:
        """A latent model's ``models.vae.LatentCodec``; ``from_checkpoint`` loads it when first needed."""
        if callable(self._decoder):
            self._decoder = self._decoder()
        return self._decoder

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
        """Guided velocity (N, C, H, W) at states x (N, C, H, W), one time t and labels y (N,), inputs checked;
        ``interval``: the jump length of an average-velocity network."""
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
        # t stays in the state's precision even for a bf16 network: bf16 would round 0.998 to 1.0.
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        extra = {} if interval is None else {"interval": torch.full_like(tt, float(interval))}
        extra |= {} if o.guidance_channels is None or self.num_classes == 0 else {"channels": o.guidance_channels}
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
        y: Labels = None,
        *,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        trajectory: bool = False,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
        **options: Any,
    ) -> Samples:
        """n images (n, C, H, W) in [0, 1] and what the call did (``Samples``). y: labels (n,), one int, or None for
        random classes; noise: the state at t = 0, else drawn from (seed, i) for sample i; ``options`` override the
        sampler's; should_stop: asked before every step (dopri5: every evaluation), True raises ``SamplingStopped``."""
        o = self._options(options)
        y, noise, seed = self._check(n, y, noise, seed, o)
        _ = self.decoder if self.latent and o.decode else None  # a VAE that cannot be loaded fails before the work
        shape = self._image_shape()
        images, kept_frames, nfe_per_chunk = [], [], []
        ask = should_stop or (lambda: False)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(range(0, n, o.batch_size), desc="sampling", unit="batch", disable=not progress):
                stop = min(start + o.batch_size, n)
                x = noise[start:stop] if noise is not None else seeded_noise(seed, range(start, stop), shape)
                yb = y[start:stop].to(self.device) if y is not None else None
                x, kept, nfe = self._integrate(x, yb, trajectory, o, ask)
                nfe_per_chunk.append(nfe)
                images.append(self.to_images(x, o))
                kept_frames += [torch.stack(kept)] if trajectory else []  # (K, b, C, H, W)
        finally:
            self.model.train(was_training)
        return Samples(
            images=torch.cat(images),
            labels=y,
            trajectory=torch.cat(kept_frames, dim=1) if trajectory else None,
            nfe=max(nfe_per_chunk),
            nfe_per_chunk=nfe_per_chunk,
            seed=seed,
            precision=resolve_precision(o.precision, self.device),
        )

    def to_images(self, x: torch.Tensor, options: SamplingOptions | None = None) -> torch.Tensor:
        """Final states x (n, C, H, W) -> images float32 in [0, 1] (latents decoded unless ``decode`` is off)."""
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

    def trajectory_images(
        self, trajectory: torch.Tensor, should_stop: Callable[[], bool] | None = None
    ) -> torch.Tensor:
        """A trajectory (K, n, C, H, W) as images in [0, 1], ``should_stop`` asked before each frame's decoding."""
        frames = []
        for i, frame in enumerate(trajectory):
            if should_stop is not None and should_stop():
                raise SamplingStopped(f"stopped before frame {i + 1} of {len(trajectory)}")
            frames.append(self.to_images(frame.to(self.device)).cpu())
        return torch.stack(frames)

    def generate_each_class(self, n_per_class: int, classes: Sequence[int] | None = None, **kwargs: Any) -> Samples:
        """n_per_class samples of every class (or of ``classes``) in class order: a grid with nrow=n_per_class shows
        one class per row. Keywords as for ``generate``."""
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
        self, n: int, y: Labels = None, *, return_trajectory: bool = False, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``generate``'s images (n, C, H, W) in [0, 1], with return_trajectory=True also the trajectory (K, n, C, H,
        W); keywords as for ``generate``."""
        out = self.generate(n, y, trajectory=return_trajectory, **kwargs)
        return (out.images, out.trajectory) if return_trajectory else out.images

    def sample_each_class(
        self, n_per_class: int, *, return_trajectory: bool = False, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``generate_each_class``'s images (classes * n_per_class, C, H, W), as ``sample``."""
        out = self.generate_each_class(n_per_class, trajectory=return_trajectory, **kwargs)
        return (out.images, out.trajectory) if return_trajectory else out.images

    def _integrate(
        self, x: torch.Tensor, y: torch.Tensor | None, trajectory: bool, o: SamplingOptions, ask: Callable[[], bool]
    ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """The final state from the noise x (b, C, H, W) at t = 0, the kept frames (float32, on the CPU; none without
        ``trajectory``) and the NFE; a stochastic method's step noise is seeded by x (``step_noise``)."""
        noises = step_noise(x) if o.method in SOLVERS and SOLVERS[o.method].stochastic else None
        x, nfe = x.to(self.device, self.state_dtype), 0

        def f(x: torch.Tensor, t: float, h: float | None = None) -> torch.Tensor:
            nonlocal nfe
            if o.method in ADAPTIVE and ask():  # torchdiffeq lets the exception through
                raise SamplingStopped(f"stopped at t = {float(t):.4f}, after {nfe} evaluations")
            nfe += 1
            return self._velocity(x, t, y, h, o)

        if o.method in ADAPTIVE:  # dense output gives the frames without extra solver steps
            times = torch.linspace(0.0, 1.0, o.max_frames if trajectory else 2, device=x.device, dtype=x.dtype)
            states = odeint(lambda t, s: f(s, t), x, times, rtol=o.rtol, atol=o.atol, method=o.method)
            return states[-1], [s.float().cpu() for s in states] if trajectory else [], nfe
        solver = get_solver(o.method)  # an unknown name is an error here, never some other method
        sde = dict(diffusion=o.sde_diffusion, norm=o.sde_norm, last_step=o.last_step) if solver.stochastic else {}
        grid = solvers.sde_grid(o.steps, o.last_step_size, o.sde_diffusion) if sde else None
        ts = (time_grid(o.steps, o.grid, o.grid_shift) if grid is None else grid).tolist()
        frames = frame_indices(o.steps, o.max_frames) if trajectory else []
        kept = [x.float().cpu()] if 0 in frames else []
        for i in range(o.steps):
            if ask():
                raise SamplingStopped(f"stopped before step {i + 1} of {o.steps}")
            if sde:
                sde["noise"] = noises().to(x) if i < o.steps - 1 else None
            x = solver.step(f, x, ts[i], ts[i + 1], **sde)
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
            (lo, hi), scale = self.guidance_range, f"{o.cfg_scale:g}"  # all its digits where :g rounds (4.0000001)
            scale = scale if float(scale) == o.cfg_scale else repr(o.cfg_scale)
            raise ValueError(
                f"cfg_scale {scale} is outside [{lo:g}, {hi:g}], the guidance scales this network takes as an input "
                "and was trained on"
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
