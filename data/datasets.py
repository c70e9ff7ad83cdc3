"""The dataset registry, ``build_dataset``, and the in-memory sets ``cifar10`` and ``digits`` (scikit-learn's 8x8
digits, no download). A new dataset is a class and a line, ``DATASETS["toy"] = ToyDataset``."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.base import DataError, ImageDataset, TensorImageDataset
from data.folder import ImageFolderDataset
from data.latents import LatentDataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 images (N, C, H, W) -> (N, C, size, size), rounded back to uint8."""
    out = []
    for part in images.split(chunk):  # chunks bound the float32 copy's memory
        x = F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


class Cifar10Dataset(TensorImageDataset):
    """CIFAR-10 as uint8 (N, 3, image_size, image_size) images and int64 (N,) labels, 10 classes."""

    @classmethod
    def build(cls, root: Path, image_size: int, channels: int, train: bool, download: bool) -> Cifar10Dataset:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity, extract_archive

        if channels != 3:
            raise DataError(f"CIFAR-10 has 3 channels; got --channels {channels}")
        root = Path(root).expanduser().resolve()
        archive, folder = root / CIFAR10.filename, root / CIFAR10.base_folder
        where = f"put the extracted folder at {folder} or the archive {archive.name} in {root} (from {CIFAR10_URL})"
        if not download and not folder.exists() and archive.exists():  # an archive placed by hand: unpack it
            if not check_integrity(str(archive), CIFAR10.tgz_md5):
                raise DataError(f"{archive} is damaged (md5 mismatch); {where}")
            extract_archive(str(archive), str(root))
        try:
            tv = CIFAR10(str(root), train=train, download=download)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, tarfile.TarError, KeyError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")
            if download:
                raise DataError(f"CIFAR-10 is not in {root} and could not be downloaded ({reason}); {where}") from None
            raise DataError(f"CIFAR-10 not found or damaged in {root} ({reason}); {where}") from None
        images = torch.from_numpy(np.ascontiguousarray(tv.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        if image_size != images.shape[-1]:
            images = resize_uint8(images, image_size)
        return cls(images, torch.as_tensor(tv.targets, dtype=torch.long), list(tv.classes))


class DigitsDataset(TensorImageDataset):
    """The digits as uint8 (1797, channels, image_size, image_size) images and int64 (1797,) labels 0..9."""

    @classmethod
    def build(cls, root: Path, image_size: int, channels: int, train: bool, download: bool) -> DigitsDataset:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float()  # (1797, 8, 8), values 0..16
        images = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
        if image_size != 8:
            images = resize_uint8(images, image_size)
        if channels == 3:
            images = images.repeat(1, 3, 1, 1)
        labels = torch.from_numpy(digits.target).long()
        return cls(images.contiguous(), labels, [str(i) for i in range(10)])


DATASETS: dict[str, type[ImageDataset]] = dict(
    cifar10=Cifar10Dataset, folder=ImageFolderDataset, digits=DigitsDataset, latents=LatentDataset
)


def build_dataset(
    name: str,
    root: str | Path = "./datasets",
    image_size: int = 32,
    channels: int = 3,
    train: bool = True,
    download: bool = True,
) -> ImageDataset:
    """The un-augmented dataset ``name``; DataError for missing or unreadable data or settings that do not fit it."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3; got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer; got {image_size!r}")
    return DATASETS[name].build(Path(root), image_size, channels, train, download)
