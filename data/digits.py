"""scikit-learn's embedded handwritten digits (1797 images, 8x8, values 0..16, 10 classes), held in memory.

For a CPU quick start with no download. Values are scaled to 0..255; ``image_size`` other than 8 resizes
bilinearly; ``channels=3`` repeats the gray channel. There is no train/test split: ``root``, ``train`` and
``download`` are ignored and the whole set is used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.base import TensorImageDataset, resize_uint8


class DigitsDataset(TensorImageDataset):
    """The digits as uint8 (1797, channels, image_size, image_size) images and int64 (1797,) labels 0..9."""

    @classmethod
    def build(cls, root: Path, image_size: int, channels: int, train: bool, download: bool) -> DigitsDataset:
        """All 1797 digits at ``image_size`` with ``channels`` (1, or 3 by repeating the gray channel)."""
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
