"""CIFAR-10: torchvision's CIFAR10, downloaded on first use into ``root``, held in memory.

It is RGB, so ``channels`` must be 3. Its native size is 32; any other ``image_size`` resizes the whole set
once at load (bilinear, antialiased), which is meant for experiments, not for comparable FID numbers.
``train`` picks the 50k training or the 10k test images. With ``download=False`` an archive placed by hand in
``root`` is unpacked (after its md5 is checked).
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from data.base import DataError, TensorImageDataset, resize_uint8

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class Cifar10Dataset(TensorImageDataset):
    """CIFAR-10 as uint8 (N, 3, image_size, image_size) images and int64 (N,) labels, 10 classes."""

    @classmethod
    def build(cls, root: Path, image_size: int, channels: int, train: bool, download: bool) -> Cifar10Dataset:
        """The train (50k) or test (10k) split from ``root``, downloaded there when missing and ``download``."""
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity, extract_archive

        if channels != 3:
            raise DataError(f"CIFAR-10 has 3 channels; got --channels {channels}")
        root = Path(root).expanduser().resolve()
        where = (
            f"put the extracted folder at {root / CIFAR10.base_folder} or the archive {CIFAR10.filename} "
            f"in {root} (from {CIFAR10_URL})"
        )
        archive = root / CIFAR10.filename
        folder = root / CIFAR10.base_folder
        if not download and not folder.exists() and archive.exists():
            # the user placed the archive by hand and asked for no download: unpack it ourselves
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
