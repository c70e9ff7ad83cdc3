"""``ImageDataset``, ``TensorImageDataset`` and DataError. Items are un-augmented (uint8 (C, H, W), int label), so
the same dataset gives FID's real images; ``training_batch`` flips and scales on the device."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """Missing, empty or unreadable data, or settings that do not fit it."""


class ImageDataset(Dataset):
    """The interface of a registered dataset; subclasses fill it in."""

    in_memory: ClassVar[bool] = False  # whether training holds it on the device by default
    classes: list[str]
    num_classes: int

    @classmethod
    def build(cls, root: Path, image_size: int, channels: int, train: bool, download: bool) -> ImageDataset:
        """The dataset for these settings (``build_dataset`` has checked channels and image_size)."""
        raise NotImplementedError(f"{cls.__name__} does not define build()")

    def fingerprint(self) -> str:
        """A 16-hex-digit hash of the content: equal for equal data, different when an image changes."""
        raise NotImplementedError(f"{type(self).__name__} does not define fingerprint()")

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All images uint8 (N, C, H, W) and labels int64 (N,) when held in memory; None otherwise."""
        return None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one training sample."""
        return tuple(self[0][0].shape)  # type: ignore[return-value]

    def training_batch(self, x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) and flip bits (B,) -> float32 (B, C, H, W) in [-1, 1], mirrored where flip."""
        return pixel_batch(x, flip)

    @classmethod
    def native_size(cls, root: Path) -> tuple[int, int] | None:
        """(image_size, channels) fixed by the data in root, or None when --image-size and --channels choose."""
        return None

    def latent_space(self) -> dict | None:
        """How samples decode to images (``models.vae.LatentSpace.to_dict()``); None: the samples are images."""
        return None

    def image(self, index: int) -> torch.Tensor:
        """The clean uint8 (C, H, W) image of item index where samples are not images (latents), for REPA."""
        raise DataError(f"{type(self).__name__} keeps no images beside its samples")

    def fid_images(self) -> tuple[str, Path, ImageDataset] | None:
        """(name, root, dataset) of the real images FID compares with; None: this dataset's own images."""
        return None


def pixel_batch(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 images x (B, C, H, W) mirrored where flip (B,), scaled 0..255 -> [-1, 1]."""
    if x.dtype != torch.uint8:
        raise DataError(f"dataset images must be uint8 (C, H, W) in 0..255; got {x.dtype}")
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x.float().div_(127.5).sub_(1.0)


class TensorImageDataset(ImageDataset):
    """A dataset held in memory: images uint8 (N, C, H, W) and labels int64 (N,); subclasses add ``build``."""

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels must have shape ({images.shape[0]},); got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch for DataLoader from one gather."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.images[index].unbind(0), self.labels[index].tolist(), strict=True))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """A hash of the images (dtype, shape, bytes); labels do not enter (FID statistics ignore them)."""
        images = self.images.detach().cpu().contiguous()
        h = hashlib.sha256(f"len={len(self)}".encode())
        h.update(f"{images.dtype}:{tuple(images.shape)}".encode())
        h.update(images.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]
