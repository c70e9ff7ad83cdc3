"""Training datasets: CIFAR-10, a folder of images with one sub-folder per class, and the digits set.

Every dataset here is un-augmented and returns ``(image, label)`` with ``image`` a uint8 tensor
(C, H, W) in 0..255 and ``label`` an int; each has ``.num_classes`` (int) and ``.classes`` (list[str]).
Augmentation (horizontal flip) and scaling to [-1, 1] live in ``data.loader.BatchStream``, so the
same datasets give the real images for FID statistics without touching the training stream.

Choices, per dataset:
- ``cifar10``: torchvision's CIFAR10, downloaded on first use into ``root``. It is RGB, so
  ``channels`` must be 3. Its native size is 32; any other ``image_size`` resizes the whole set once
  at load (bilinear, antialiased), which is meant for experiments, not for comparable FID numbers.
- ``folder``: ``root`` holds one sub-folder per class (names sorted give the labels; images may sit
  deeper inside a class folder). Each image is converted by PIL to L (``channels=1``) or RGB
  (``channels=3``), its shorter side resized to ``image_size`` (bicubic, antialiased by PIL) and
  centre-cropped. At build time every file's header is opened (cheap, it reads a few bytes), so files
  that are not images fail at once with a message naming them; a file whose header is fine but whose
  pixels are damaged is met when it is first decoded and raises ``DataError`` naming it.
- ``digits``: scikit-learn's embedded handwritten digits (1797 images, 8x8, values 0..16, 10 classes),
  for a CPU quick start with no download. Values are scaled to 0..255; ``image_size`` other than 8
  resizes bilinearly; ``channels=3`` repeats the gray channel.
``folder`` and ``digits`` have no train/test split: ``train`` is ignored there and the whole set is used.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset


class DataError(ValueError):
    """Missing, empty or unreadable data, or settings that do not fit it."""


DATASETS = ("cifar10", "folder", "digits")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class TensorImageDataset(Dataset):
    """A dataset held in memory: images uint8 (N, C, H, W) and labels int64 (N,).

    ``BatchStream(on_device=True)`` uses ``images`` and ``labels`` directly instead of iterating.
    """

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


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/...``, resized (shorter side) and centre-cropped to a square.

    Items are (uint8 (channels, image_size, image_size), class index); classes are the sorted names of
    the sub-folders of ``root``.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.mode = "L" if channels == 1 else "RGB"
        self.classes, self.samples = _scan_image_folder(self.root)
        self.num_classes = len(self.classes)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except Exception as e:  # PIL raises many types for damaged files; all mean the same to the user
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        img = resize_center_crop(img, self.image_size)
        array = np.array(img, dtype=np.uint8)  # (H, W) or (H, W, 3); a copy, so torch may own it
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), label


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic; PIL antialiases when shrinking), then crop the centre.

    An image whose shorter side already is ``size`` is only cropped, pixel for pixel.
    """
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        # max(size, ...) guards the shorter side against rounding below size
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.BICUBIC)
        w, h = new_w, new_h
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and (path, label) pairs; checks every header."""
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise DataError(
            f"image folder {root} has no class sub-folders{hint}; put images in {root}/<class name>/ "
            "(a single sub-folder for unlabelled data)"
        )
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(os.path.join(dirpath, f))
        if not found:
            empty.append(name)
        samples.extend((path, label) for path in found)
    if len(empty) == len(classes):
        raise DataError(f"image folder {root} has no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        # a class without images would be a label the model is asked to learn but never sees
        raise DataError(f"class folders without images in {root}: {', '.join(empty)}")
    for path, _ in samples:
        try:
            with Image.open(path):  # lazy: parses the header only
                pass
        except Exception as e:
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return classes, samples


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 images (N, C, H, W) -> (N, C, size, size), rounded back to uint8."""
    out = []
    for part in images.split(chunk):  # chunks bound the float32 copy's memory
        x = F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _cifar10(root: Path, image_size: int, channels: int, train: bool, download: bool) -> TensorImageDataset:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, extract_archive

    if channels != 3:
        raise DataError(f"CIFAR-10 has 3 channels; got --channels {channels}")
    root = root.expanduser().resolve()
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
    return TensorImageDataset(images, torch.as_tensor(tv.targets, dtype=torch.long), list(tv.classes))


def _digits(image_size: int, channels: int) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()  # (1797, 8, 8), values 0..16
    images = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        images = resize_uint8(images, image_size)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    labels = torch.from_numpy(digits.target).long()
    return TensorImageDataset(images.contiguous(), labels, [str(i) for i in range(10)])


def build_dataset(
    name: str,
    root: str | Path = "./datasets",
    image_size: int = 32,
    channels: int = 3,
    train: bool = True,
    download: bool = True,
) -> Dataset:
    """The un-augmented dataset ``name`` (one of DATASETS): items (uint8 (channels, image_size, image_size), int).

    ``root`` is where CIFAR-10 lives or is downloaded to, and for "folder" the folder with class
    sub-folders; "digits" ignores it. The result has ``.num_classes`` and ``.classes``.
    Raises DataError for missing, empty or unreadable data and for settings that do not fit it.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3; got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer; got {image_size!r}")
    if name == "cifar10":
        return _cifar10(Path(root), image_size, channels, train, download)
    if name == "folder":
        return ImageFolderDataset(Path(root).expanduser(), image_size, channels)
    return _digits(image_size, channels)
