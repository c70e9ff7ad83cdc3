"""Frozen image encoders for REPA: images (B, C, H, W) in [0, 1] -> patch tokens (B, N, D) or a vector (B, D).

A name loads DINOv2 from torch.hub (``dinov2_vitb14``, REPA's default) or any ViT from timm; a path loads a
``torch.export.save``d program, so that any encoder, such as one trained on a small dataset, needs no download."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils.config import ConfigError, short_reason

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PretrainedViT(nn.Module):
    """A torch.hub DINOv2 or timm ViT on ImageNet-normalised RGB, resized (bicubic) to ``grid`` patches a side."""

    def __init__(self, net: nn.Module, grid: int):
        super().__init__()
        self.net, self.timm = net, hasattr(net, "num_prefix_tokens")  # else DINOv2's own code
        patch = net.patch_embed.patch_size[0] if self.timm else net.patch_size
        self.size = grid * int(patch)  # DINOv2-B/14 at 224 px for a 16 x 16 DiT grid, as REPA
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        features = self.net.forward_features((x - self.mean) / self.std)
        if self.timm:
            return features[:, self.net.num_prefix_tokens :]  # class and register tokens first
        return features["x_norm_patchtokens"]


def load_encoder(name_or_path: str, grid: int, device: torch.device) -> nn.Module:
    """The frozen encoder (no gradients) that ``--repa-encoder`` names, on device; one-line ConfigError if it cannot
    load (e.g. offline without cached weights)."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".pt2" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--repa-encoder {path}: no such file")
        try:
            with quiet("torch.export"):  # its traceback: the one line below says it
                encoder = torch.export.load(path).module()
        except Exception as e:
            raise ConfigError(f"--repa-encoder {path} is not a torch.export program: {short_reason(e, 200)}") from None
    else:
        import timm  # noqa: F401  (imported before its hub's logger is quietened: importing sets its level)

        hub = name_or_path.startswith("dinov2_")
        try:
            with quiet("huggingface_hub"):  # not each retry's warning: the one line below says it
                net = load_pretrained(name_or_path, hub)
        except Exception as e:
            fetch = (
                f"torch.hub.load('facebookresearch/dinov2', '{name_or_path}')"
                if hub
                else f"import timm; timm.create_model('{name_or_path}', pretrained=True)"
            )
            raise ConfigError(
                f"--repa-encoder {name_or_path} could not be loaded ({short_reason(e, 200)}); download it once where the network "
                f'is reachable: python -c "import torch; {fetch}", or pass a .pt2 file'
            ) from None
        encoder = PretrainedViT(net.eval(), grid)
    return encoder.requires_grad_(False).to(device)


def load_pretrained(name: str, hub: bool) -> nn.Module:
    if hub:
        return torch.hub.load("facebookresearch/dinov2", name)
    import timm

    return timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Errors only from this logger (imported first: importing a library may set its level)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
