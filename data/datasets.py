"""The dataset registry and ``build_dataset``, the one way the rest of the project gets a dataset.

``DATASETS`` maps a name to a dataset class; each class lives in its own module and implements the
interface of ``data.base`` (``in_memory``, ``build``, ``num_classes``, ``classes``, ``fingerprint``,
``tensors``):

- ``cifar10`` (``data/cifar10.py``): torchvision's CIFAR-10, downloaded on first use, held in memory;
- ``folder`` (``data/folder.py``): one sub-folder of images per class, read from disk;
- ``digits`` (``data/digits.py``): scikit-learn's embedded 8x8 digits, held in memory.

Adding a dataset is one class (usually a ``TensorImageDataset`` subclass whose ``build`` loads the tensors)
and one line, from anywhere before the config is parsed::

    DATASETS["toy"] = ToyDataset

Configs take the dict itself as their ``choices``, so a name added later is accepted by ``--dataset``, and
nothing outside ``data/`` looks at a dataset's name or attributes beyond that interface.
"""

from __future__ import annotations

from pathlib import Path

from data.base import DataError, ImageDataset, TensorImageDataset, resize_uint8
from data.cifar10 import CIFAR10_URL, Cifar10Dataset
from data.digits import DigitsDataset
from data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, resize_center_crop

__all__ = [
    "CIFAR10_URL", "DATASETS", "IMAGE_EXTENSIONS", "Cifar10Dataset", "DataError", "DigitsDataset", "ImageDataset",
    "ImageFolderDataset", "TensorImageDataset", "build_dataset", "resize_center_crop", "resize_uint8",
]  # fmt: skip

DATASETS: dict[str, type[ImageDataset]] = {
    "cifar10": Cifar10Dataset,
    "folder": ImageFolderDataset,
    "digits": DigitsDataset,
}


def build_dataset(
    name: str,
    root: str | Path = "./datasets",
    image_size: int = 32,
    channels: int = 3,
    train: bool = True,
    download: bool = True,
) -> ImageDataset:
    """The un-augmented dataset ``name`` (a key of DATASETS): items (uint8 (channels, image_size, image_size), int).

    ``root`` is where CIFAR-10 lives or is downloaded to, and for "folder" the folder with class
    sub-folders; "digits" ignores it. The result has ``.num_classes``, ``.classes`` and ``.fingerprint()``.
    Raises DataError for an unknown name, for missing, empty or unreadable data and for settings that do not fit it.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3; got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer; got {image_size!r}")
    return DATASETS[name].build(Path(root), image_size, channels, train, download)
