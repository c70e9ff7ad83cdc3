"""ADM's evaluation suite (Dhariwal & Nichol 2021, openai/guided-diffusion evaluations/evaluator.py) in PyTorch.
A sample batch is an npz of uint8 images ``arr_0`` (N, H, W, 3) and labels ``arr_1``; a reference batch also holds
``mu``/``sigma`` (pool) and ``mu_s``/``sigma_s`` (spatial). Batches are streamed (50k images at 256 px: 9.8 GB)."""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from evaluation.fid import npz_statistics, open_npz
from evaluation.metrics import FeatureStats, FIDError, frechet_distance, inception_score, precision_recall
from utils.io import atomic_write

METRICS = ("fid", "sfid", "is", "pr")
STATISTICS = {"fid": ("pool", ("mu", "sigma")), "sfid": ("spatial", ("mu_s", "sigma_s"))}  # feature, npz keys
STAMP = (1980, 1, 1, 0, 0, 0)  # zip entry time: np.savez stamps the current one, so its bytes change every run
Features = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # uint8 (N, 3, H, W) -> {"pool": (N, D), ...}


@contextlib.contextmanager
def npy_in_npz(path: str | os.PathLike, name: str) -> Iterator[tuple[tuple[int, ...], np.dtype, IO[bytes]]]:
    """Shape, dtype and the data stream of the array ``name`` of an npz; a one-line FIDError otherwise."""
    with open_npz(path) as npz:
        if name not in npz.files:
            raise FIDError(f"{path} has no {name}")
        with npz.zip.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
            yield shape, dtype, f


def image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape (N, H, W, 3) of the images ``arr_0`` of a batch, checked."""
    with npy_in_npz(path, "arr_0") as (shape, dtype, _):
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise FIDError(f"{path}: arr_0 is {dtype} {shape}, not uint8 images (N, H, W, 3)")
        return shape


def read_images(path: str | os.PathLike, batch_size: int = 250) -> Iterator[np.ndarray]:
    """The images ``arr_0`` of a batch in batches (b, H, W, 3) uint8, read as a stream."""
    image_shape(path)
    with npy_in_npz(path, "arr_0") as (shape, dtype, f):
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            try:
                data = f.read(n * row)
            except zipfile.BadZipFile as e:  # a CRC error
                raise FIDError(f"{path} is damaged ({e})") from None
            if len(data) != n * row:
                raise FIDError(f"{path} is truncated: arr_0 ends after {start} + {len(data) // row} images")
            yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def write_batch(path: str | os.PathLike, images: Iterable[np.ndarray], count: int, labels: np.ndarray) -> None:
    """Write ``count`` images from batches (b, H, W, 3) uint8 and labels (N,) as a batch, same arrays, same bytes."""

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", allowZip64=True) as z:
            with z.open(zipfile.ZipInfo("arr_0.npy", STAMP), "w", force_zip64=True) as g:
                for i, batch in enumerate(images):
                    if i == 0:
                        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *batch.shape[1:])}
                        np.lib.format.write_array_header_1_0(g, header)
                    g.write(np.ascontiguousarray(batch, np.uint8).tobytes())
            with z.open(zipfile.ZipInfo("arr_1.npy", STAMP), "w", force_zip64=True) as g:
                np.lib.format.write_array(g, np.asarray(labels, np.int64), allow_pickle=False)

    atomic_write(path, write)


def check_reference(path: str | os.PathLike, metrics: Iterable[str], dims: dict[str, int | None]) -> dict[str, Any]:
    """{metric: (mu, sigma)} a reference batch holds, checked; a metric without them (or pr) needs its images arr_0."""
    with open_npz(path) as f:
        files = set(f.files)
        found = {
            m: npz_statistics(f, path, keys, dims[feature])
            for m, (feature, keys) in STATISTICS.items()
            if m in metrics and set(keys) <= files
        }
    needs = {"fid": "mu and sigma or the images arr_0", "sfid": "mu_s and sigma_s or arr_0", "pr": "the images arr_0"}
    if missing := [m for m in metrics if m in needs and m not in found and "arr_0" not in files]:
        what = "; ".join(f"{m} needs {needs[m]}" for m in missing)
        raise FIDError(f"{path} lacks what {', '.join(missing)} need ({what}); it holds {', '.join(sorted(files))}")
    if any(m in needs and m not in found for m in metrics):
        image_shape(path)
    return found


@torch.no_grad()
def summarise(
    batches: Iterable[np.ndarray], features: Features, stats: set[str], keep: set[str], desc: str, progress: bool
) -> tuple[dict[str, FeatureStats], dict[str, torch.Tensor]]:
    """The ``FeatureStats`` of the features ``stats`` and the features ``keep`` (on the CPU) of batches (b, H, W, 3)."""
    summed, kept = {k: FeatureStats() for k in stats}, {k: [] for k in keep}
    for images in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        out = features(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2))  # (b, 3, H, W), a writable copy
        for k in stats:
            summed[k].update(out[k])
        for k in keep:
            kept[k].append(out[k].float().cpu())
    return summed, {k: torch.cat(v) for k, v in kept.items()}


def score(
    samples: Iterable[np.ndarray],
    features: Features,
    metrics: Iterable[str],
    reference: dict[str, Any],
    ref_batch: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """ADM's ``metrics`` of uint8 sample batches (IS in 10 parts, precision/recall k = 3) against ``reference``'s
    (mu, sigma) and the images of ``ref_batch``."""
    metrics = set(metrics)
    stats = {STATISTICS[m][0] for m in metrics & set(STATISTICS)}
    keep = ({"pool"} if "pr" in metrics else set()) | ({"logits"} if "is" in metrics else set())
    summed, kept = summarise(samples, features, stats, keep, "scoring samples", progress)
    result: dict[str, float] = {}
    lacking = {STATISTICS[m][0] for m in metrics & set(STATISTICS) if m not in reference}
    if lacking or "pr" in metrics:
        ref_stats, ref_kept = summarise(
            read_images(ref_batch), features, lacking, {"pool"} if "pr" in metrics else set(), "reference", progress
        )
        reference = {**reference, **{m: ref_stats[f].mean_cov() for m, (f, _) in STATISTICS.items() if f in lacking}}
        if "pr" in metrics:
            real, fake = ref_kept["pool"].to(device), kept["pool"].to(device)
            result["precision"], result["recall"] = precision_recall(real, fake, k=3)
    for m in metrics & set(STATISTICS):
        result[m] = frechet_distance(*reference[m], *summed[STATISTICS[m][0]].mean_cov())
    if "is" in metrics:
        result["inception_score"], result["inception_score_std"] = inception_score(kept["logits"])
    return result
