"""The pretrained autoencoder of latent DiTs (a diffusers ``AutoencoderKL``) and the latent normalisation
z = (z_vae - shift) * scale per channel, which gives the DiT data of about unit variance (docs/latents.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.config import short_reason
from utils.device import autocast, resolve_precision

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
NORMALIZATIONS = ("config", "stats")


class VAEError(ValueError):
    """The VAE cannot be loaded (not on this machine, no network) or does not fit the latents."""


@dataclass(frozen=True)
class LatentSpace:
    """What decodes a latent DiT's samples: the VAE, its normalisation and both shapes (stored as a dict)."""

    vae: str
    revision: str | None
    normalization: str
    shift: tuple[float, ...]
    scale: tuple[float, ...]
    image_size: int
    image_channels: int
    latent_shape: tuple[int, int, int]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentSpace:
        names = {"vae": str(d["vae"]), "revision": d.get("revision"), "normalization": str(d["normalization"])}
        floats = {k: tuple(float(v) for v in d[k]) for k in ("shift", "scale")}
        ints = {"image_size": int(d["image_size"]), "image_channels": int(d["image_channels"])}
        return cls(**names, **floats, **ints, latent_shape=tuple(int(v) for v in d["latent_shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def load_autoencoder(name: str, revision: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The AutoencoderKL ``name`` (hub id or local folder), frozen on device; VAEError says how to fetch it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEError(f"latent models need diffusers: pip install diffusers ({e})") from None
    local = Path(name).expanduser()
    if not local.is_dir() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):  # a path, not owner/name
        raise VAEError(
            f"the VAE folder {local} is not there (moved?); pass --vae with its new place (a folder written by "
            "AutoencoderKL.save_pretrained) or the hub id of the same model"
        )
    try:
        source, revision = (str(local), None) if local.is_dir() else (name, revision)
        vae = AutoencoderKL.from_pretrained(source, revision=revision, low_cpu_mem_usage=False)
    except Exception as e:  # OSError, ValueError, hub and HTTP errors: all mean this model cannot be had here
        reason = short_reason(e)
        if local.is_dir():
            raise VAEError(
                f"{local} is not a diffusers AutoencoderKL folder (config.json and weights): {reason}"
            ) from None
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise VAEError(
            f"the VAE {name!r} is not on this machine and could not be downloaded ({reason}); fetch it where there "
            f"is network with `huggingface-cli download {name}` (into $HF_HOME, here {home}) and copy that folder "
            "here, or pass --vae FOLDER (a folder written by AutoencoderKL.save_pretrained)"
        ) from None
    return vae.to(device).eval().requires_grad_(False)


class LatentCodec:
    """A VAE with a normalisation, run in chunks of batch_size; precision "auto" is bf16 autocast on CUDA."""

    def __init__(
        self,
        vae: nn.Module,
        shift: Sequence[float],
        scale: Sequence[float],
        batch_size: int = 32,
        precision: str = "auto",
    ):
        self.vae = vae
        self.device = next(vae.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.shift = torch.tensor(list(shift), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale = torch.tensor(list(scale), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.batch_size = batch_size

    @classmethod
    def from_space(cls, space: LatentSpace, device: str | torch.device = "cpu", vae: str | None = None) -> LatentCodec:
        """The codec of a LatentSpace (``vae``: another copy of its VAE, e.g. a local folder without network)."""
        name = vae or space.vae
        model = load_autoencoder(name, None if vae else space.revision, device)
        if (channels := int(model.config.latent_channels)) != space.latent_shape[0]:
            raise VAEError(f"the VAE {name} has {channels} latent channels; the latents have {space.latent_shape[0]}")
        return cls(model, space.shift, space.scale)

    def _run(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return torch.cat([fn(part.to(self.device, torch.float32)).float() for part in x.split(self.batch_size)])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) posterior means (N, C', H/f, W/f) float32 of images (N, C, H, W) in [-1, 1]."""
        return self._run(lambda x: self.vae.encode(x).latent_dist.mean, images)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (N, C', h, w) -> images (N, C, h * f, w * f) float32 in [0, 1], on z's device."""
        raw = z.float().to(self.device) / self.scale + self.shift
        images = self._run(lambda x: self.vae.decode(x).sample, raw)
        return ((images + 1) / 2).clamp_(0, 1).to(z.device)
