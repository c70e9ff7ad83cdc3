"""Pre-extracted VAE latents (``extract_latents.py``) as a dataset: ``--dataset latents --data-path FOLDER``.

Shard k holds images k * shard_size ... of the sorted source folder: ``latents`` float16 (n, 2, C, h, w), the raw VAE
posterior means of each image and its mirror, ``labels``, per-channel ``sum``, ``sum_sq`` and, with ``--images``,
``images`` uint8 (n, C, S, S), the centre crops (REPA's encoder sees them). ``index.json``, written last, lists the
shards with their sha256; without it the folder is not a dataset."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.base import DataError, ImageDataset
from data.folder import ImageFolderDataset
from utils.io import atomic_write

INDEX = "index.json"
FORMAT = "dit-latents-1"
PREPROCESSING = "center_crop_arr (ADM): box halving while the short side >= 2 x size, bicubic resize, centre crop"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def digest_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".sha256")


def record_digest(shard: Path, sha256: str) -> None:
    """Record a shard's sha256 beside it, atomically."""
    atomic_write(digest_path(shard), lambda f: f.write(f"{sha256}  {shard.name}\n".encode()))


def recorded_digest(shard: Path) -> tuple[str | None, bool]:
    """The sha256 recorded beside a shard (None: no record) and whether the shard is no newer than the record."""
    record = digest_path(shard)
    try:
        return record.read_text().split()[0], record.stat().st_mtime_ns >= shard.stat().st_mtime_ns
    except (OSError, UnicodeDecodeError, IndexError):
        return None, False


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damaged_shards(expected: dict[Path, str | None], rehash: bool = False) -> dict[Path, str]:
    """{shard: why} of those whose sha256 is wrong; one no newer than an agreeing record is trusted unless rehash."""
    want, todo, bad = {}, [], {}
    for path, sha in expected.items():
        recorded, fresh = recorded_digest(path)
        want[path] = sha or recorded
        if want[path] is None:
            bad[path] = "no sha256 was recorded for it"
        elif rehash or not fresh or recorded != want[path]:
            todo.append(path)
    started = time.perf_counter()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashlib lets go of the GIL
        for path, got in zip(todo, pool.map(file_sha256, todo), strict=True):
            if got != want[path]:
                bad[path] = "its sha256 is not the one recorded when it was written"
                continue
            with contextlib.suppress(OSError):  # a read-only folder: the next start hashes it again
                record_digest(path, got)
    if todo and not bad:  # else the caller names the damaged ones
        took, size = time.perf_counter() - started, sum(p.stat().st_size for p in todo)
        print(f"latents: hashed {len(todo)} shard(s), {size / 2**20:,.0f} MiB in {took:.1f} s: whole", flush=True)
    return bad


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset of its data (8 + header length)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DataError(f"{path} is not a safetensors file (it has {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise DataError(f"{path} is not a safetensors file (a header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(f"{path} is not a safetensors file (its header is not JSON)") from None
    return header, 8 + n


def map_tensor(path: Path, name: str, dtype: np.dtype) -> np.ndarray:
    """The tensor ``name`` of a safetensors file as a read-only numpy memory map."""
    header, start = safetensors_header(path)
    if name not in header:
        raise DataError(f"{path} holds no tensor {name!r}")
    entry = header[name]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or start + end > path.stat().st_size:
        raise DataError(f"{path} is damaged: tensor {name!r} does not fit its file ({path.stat().st_size} bytes)")
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def read_index(root: Path) -> dict[str, Any]:
    """The index of a latents folder; DataError saying how to make one."""
    path = root / INDEX
    if not path.is_file():
        hint = " (an extraction was started there: run the same extract_latents.py command again to finish it)"
        started = any(root.glob("shard-*.safetensors")) if root.is_dir() else False
        raise DataError(
            f"no latents in {root}: {INDEX} is missing{hint if started else ''}; make them with "
            f"python extract_latents.py --data-path IMAGES --out {root}"
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a latents index ({type(e).__name__})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not a latents index of format {FORMAT}")
    return index


class LatentDataset(ImageDataset):
    """An extraction's latents: items (float16 (2, C, h, w) of the image and of its mirror, label)."""

    in_memory = True  # ImageNet's 21 GB fit on a training GPU; --no-data-on-device reads the mapped shards

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.index = read_index(self.root)
        self.space = self.index["latent_space"]  # models.vae.LatentSpace as a dict
        self.latent_shape = tuple(int(v) for v in self.space["latent_shape"])
        self.classes = list(self.index["classes"])
        self.num_classes = len(self.classes)
        self.has_images = bool(self.index.get("images", False))
        again = f"; run the extract_latents.py command that made {self.root} again to encode it anew"
        self._latents, self._crops, labels, starts, paths = [], [], [], [0], []
        for shard in self.index["shards"]:
            path = self.root / shard["file"]
            if not path.is_file():
                raise DataError(f"latents shard {path} is missing (listed in {self.root / INDEX}){again}")
            if path.stat().st_size != shard.get("bytes", path.stat().st_size):  # older indexes list no size
                raise DataError(
                    f"latents shard {path} is damaged: it has {path.stat().st_size} bytes, {INDEX} lists "
                    f"{shard['bytes']}{again}"
                )
            paths.append(path)
            latents = map_tensor(path, "latents", np.float16)
            if latents.shape != (shard["count"], 2, *self.latent_shape):
                raise DataError(
                    f"latents shard {path} holds {latents.shape}, its index says "
                    f"({shard['count']}, 2, {', '.join(map(str, self.latent_shape))})"
                )
            self._latents.append(latents)
            if self.has_images:
                self._crops.append(map_tensor(path, "images", np.uint8))
            labels.append(np.asarray(map_tensor(path, "labels", np.int64)))
            starts.append(starts[-1] + shard["count"])
        bad = damaged_shards({p: s["sha256"] for p, s in zip(paths, self.index["shards"], strict=True)})
        if bad:
            path, why = next(iter(bad.items()))
            more = f" (and {len(bad) - 1} other shard(s))" if len(bad) > 1 else ""
            raise DataError(f"latents shard {path} is damaged: {why}{more}{again}")
        self._starts = np.asarray(starts)
        self.labels = torch.from_numpy(np.concatenate(labels)) if labels else torch.empty(0, dtype=torch.long)
        if len(self.labels) != self.index["count"] or len(self.labels) == 0:
            raise DataError(
                f"{self.root / INDEX} lists {self.index['count']} latents; its shards hold {len(self.labels)}"
            )
        self._shift = torch.tensor(self.space["shift"], dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = torch.tensor(self.space["scale"], dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def build(cls, root: Path, image_size: int, channels: int, train: bool, download: bool) -> LatentDataset:
        dataset = cls(root)
        want = cls.native_size(root)
        if (image_size, channels) != want:
            raise DataError(
                f"the latents in {root} encode {want[1]}-channel {want[0]}px images; got --image-size "
                f"{image_size} --channels {channels} (leave both unset to take the index's)"
            )
        return dataset

    @classmethod
    def native_size(cls, root: Path) -> tuple[int, int]:
        space = read_index(Path(root).expanduser())["latent_space"]
        return int(space["image_size"]), int(space["image_channels"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return torch.from_numpy(np.array(self._latents[k][index - self._starts[k]])), int(self.labels[index])

    def image(self, index: int) -> torch.Tensor:
        """The uint8 (C, S, S) centre crop that item index's latents encode (before any flip)."""
        if not self.has_images:
            raise DataError(
                f"the latents in {self.root} hold no images; run extract_latents.py with --images (into a new --out) "
                "to store the centre crops REPA's encoder needs"
            )
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return torch.from_numpy(np.array(self._crops[k][index - self._starts[k]]))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All latents float16 (N, 2, C, h, w) (read into memory once) and labels int64 (N,)."""
        return torch.from_numpy(np.concatenate(self._latents)), self.labels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.latent_shape  # type: ignore[return-value]

    def training_batch(self, x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Latent pairs (B, 2, C, h, w) and flip bits (B,) -> the chosen view, normalised: float32 (B, C, h, w)."""
        view = x[torch.arange(x.shape[0], device=x.device), flip.long()].float()
        return (view - self._shift.to(x.device)) * self._scale.to(x.device)

    def latent_space(self) -> dict[str, Any]:
        return dict(self.space)

    def fingerprint(self) -> str:
        """A hash of the index, which lists every shard's sha256."""
        return hashlib.sha256((self.root / INDEX).read_bytes()).hexdigest()[:16]

    def fid_images(self) -> tuple[str, Path, ImageDataset]:
        """The source folder of the latents, centre-cropped the same way."""
        source = Path(self.index["source"]["data_path"])
        if not source.is_dir():
            raise DataError(
                f"the images the latents in {self.root} came from ({source}) are not on this machine; "
                "pass reference statistics (--fid-ref-stats, e.g. ADM's VIRTUAL_imagenet256_labeled.npz)"
            )
        size, channels = int(self.space["image_size"]), int(self.space["image_channels"])
        return "folder", source, ImageFolderDataset(source, size, channels)
