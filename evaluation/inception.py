"""Inception-v3 as published numbers use it: torch-fidelity's port of the TF 2015-12-05 weights, fed uint8 RGB and
resized to 299 the TF-1 way (``antialias=False``: torchmetrics >= 1.8 antialiases by default, unlike the original).
Gray images are repeated to 3 channels, images in [0, 1] rounded to uint8 like saved PNGs. Any module mapping uint8
(N, 3, H, W) to (N, D) can stand in for it (tests inject small ones); only ``load_inception`` downloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn

from evaluation.metrics import FIDError
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.device import module_device_dtype

# torch-fidelity's weights (its URL_INCEPTION_V3), kept by torch.hub in <torch.hub.get_dir()>/checkpoints/
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
INCEPTION_FEATURES = 2048
SUITE_FEATURES = {"pool": INCEPTION_FEATURES, "spatial": 7 * 17 * 17}  # InceptionSuite's sizes (and 1008 logits)


def load_inception(device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None) -> nn.Module:
    """torchmetrics' Inception-v3, uint8 (N, 3, H, W) -> (N, 2048); a FIDError says where to put missing weights."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if weights_path is not None:
        weights_path = Path(weights_path).expanduser()
        if not weights_path.is_file():
            raise FIDError(f"Inception weights not found: {weights_path} (expected {INCEPTION_FILENAME})")
    try:
        inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
            antialias=False,
        )
    except (ModuleNotFoundError, ImportError) as e:
        raise FIDError(f"FID needs torch-fidelity: pip install torch-fidelity ({e})") from None
    except Exception as e:  # urllib, http and hub errors all mean: the weights could not be fetched
        if weights_path is not None:  # one line: a mismatch would list every key of both state dicts
            try:
                load_checkpoint(weights_path)
                what = "it is a training checkpoint of this project (pass it as --ckpt), not the Inception weights"
            except CheckpointError:
                what = f"not torch-fidelity's Inception-v3 weights ({type(e).__name__})"
            raise FIDError(
                f"cannot load Inception weights from {weights_path}: {what}; expected {INCEPTION_FILENAME} "
                f"from {INCEPTION_URL}"
            ) from None
        target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
        raise FIDError(
            f"cannot get the Inception-v3 weights for FID ({type(e).__name__}: {e}); download {INCEPTION_URL} "
            f"and put it in {target.parent}/ as {target.name}"
        ) from None
    inception.num_features = INCEPTION_FEATURES
    return inception.to(device).eval()


class InceptionSuite(nn.Module):
    """ADM's features in one pass: uint8 (N, 3, H, W) -> {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)};
    spatial: TF's ``mixed_6/conv`` is torch-fidelity's ``Mixed_6d.branch1x1`` (after its ReLU, (N, 192, 17, 17)), of
    which ADM keeps 7 channels in TF's (H, W, C) order; logits: without the bias, ADM's ``softmax/logits/MatMul``."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool  # real statistics cached for train.py's FID stay keyed by this module
        self.spatial = None
        pool.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: setattr(self, "spatial", out[:, :7]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pool = self.pool(x)
        spatial = self.spatial.permute(0, 2, 3, 1).flatten(1)  # (N, 17, 17, 7) -> (N, 2023)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.pool.fc.weight.T}


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W), C in {1, 3}, float in [0, 1] or uint8 -> uint8 (N, 3, H, W), gray repeated."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float in [0, 1]; got {images.dtype}")
        images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)  # like saving a PNG
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features (N, D) of images (N, C, H, W) (uint8, or float in [0, 1]) on the extractor's device."""
    feats = extractor(to_uint8_rgb(images).to(module_device_dtype(extractor)[0]))
    if feats.dim() == 1:
        feats = feats.unsqueeze(0)
    if feats.dim() != 2 or feats.shape[0] != images.shape[0]:
        raise FIDError(f"feature extractor must return (N, D) for N={images.shape[0]}; got {tuple(feats.shape)}")
    return feats


def extractor_id(extractor: nn.Module) -> str:
    """Identity of a feature extractor for the stats cache: class, protocol options and a state_dict hash."""
    h = hashlib.sha256()
    for name, t in sorted(extractor.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    parts = [type(extractor).__module__ + "." + type(extractor).__qualname__]
    options = ("features_list", "use_antialias", "INPUT_IMAGE_SIZE")  # torchmetrics' Inception options
    parts += [f"{attr}={getattr(extractor, attr)}" for attr in options if hasattr(extractor, attr)]
    parts.append(h.hexdigest()[:16])
    return ",".join(parts)
