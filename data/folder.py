"""A folder with one sub-folder of images per class (sorted names give the labels), centre-cropped as ADM and DiT
do. Links are followed only out of every class folder, each directory once: no loops, no image counted twice."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.base import DataError, ImageDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


class ImageFolderDataset(ImageDataset):
    """Images under ``root/<class>/...``; ``samples`` lists the (path, label) pairs in item order."""

    in_memory = False  # read by loader workers; a large folder would not fit on the device anyway

    def __init__(self, root: str | Path, image_size: int, channels: int) -> None:
        self.root, self.image_size, self.channels = Path(root), image_size, channels
        self.mode = "L" if channels == 1 else "RGB"
        self.classes, self.samples = _scan_image_folder(self.root)
        self.num_classes = len(self.classes)

    @classmethod
    def build(cls, root: Path, image_size: int, channels: int, train: bool, download: bool) -> ImageFolderDataset:
        return cls(Path(root).expanduser(), image_size, channels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = to_8_bits(img, path).convert(self.mode)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for damaged files; all mean the same to the user
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        img = center_crop_arr(img, self.image_size)
        array = np.atleast_3d(np.array(img, dtype=np.uint8))  # (H, W, 1 or 3); a copy, so torch may own it
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), label

    def fingerprint(self) -> str:
        """A hash of every file's path, label, size and modification time (no pixel is read)."""
        h = hashlib.sha256(f"len={len(self)}|crop=adm".encode())  # the preprocessing enters: caches follow it
        for path, label in self.samples:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def to_8_bits(img: Image.Image, path: str | os.PathLike) -> Image.Image:
    """A 16-bit (I;16*, I) or float (F) gray image as 8-bit L: round(v * 255 / 65535) or round(v * 255)."""
    if img.mode == "F":
        top, what = 1.0, "0..1 (float images are read as 0..1)"
    elif img.mode == "I" or img.mode.startswith("I;16"):
        top, what = 65535.0, "0..65535 (integer images are read as 16 bits)"
    else:
        return img
    a = np.asarray(img, dtype=np.float64)  # (H, W)
    finite = bool(np.isfinite(a).all())
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not finite or lo < 0 or hi > top:
        raise DataError(
            f"cannot read image {path}: its {img.mode} values {lo:g}..{hi:g}{'' if finite else ' (and NaN/inf)'} "
            f"lie outside {what}; convert it to 8 or 16 bits"
        )
    return Image.fromarray(np.rint(a * (255.0 / top)).astype(np.uint8))  # uint8 (H, W): mode L


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (Dhariwal & Nichol 2021), as DiT prepares ImageNet."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _crosses_classes(real: Path, own: Path, classes: list[Path]) -> bool:
    """Whether the real directory ``real`` holds a class folder (own: a loop) or lies inside another class."""
    inside_other = lambda c: c != own and real.is_relative_to(c) and not own.is_relative_to(c)
    return any(c.is_relative_to(real) or inside_other(c) for c in classes)


def _class_images(top: Path, own: Path, classes: list[Path]) -> list[str]:
    """Image paths under the class folder ``top`` (real path ``own``), sorted per directory."""
    found: list[str] = []
    visited = {own}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            path = os.path.join(dirpath, d)
            real = Path(os.path.realpath(path))
            if real in visited or _crosses_classes(real, own, classes):
                continue
            if os.path.islink(path) and real.is_relative_to(own):
                continue  # inside the class: its real directories are walked anyway
            visited.add(real)
            keep.append(d)
        dirnames[:] = keep  # os.walk descends only into these
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, f))
    return found


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
    reals = [Path(os.path.realpath(root / name)) for name in classes]
    found = [_class_images(root / name, real, reals) for name, real in zip(classes, reals, strict=True)]
    samples = [(path, label) for label, paths in enumerate(found) for path in paths]
    empty = [name for name, paths in zip(classes, found, strict=True) if not paths]
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
