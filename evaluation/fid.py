"""FID (Heusel et al. 2017) against real statistics of the un-augmented dataset, cached under a key of all that
changes them."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from data import ImageDataset, build_dataset
from data.loader import usable_workers
from evaluation.inception import INCEPTION_FEATURES, extract_features, extractor_id
from evaluation.inception import load_inception as load_inception  # where evaluation.monitor finds it
from evaluation.metrics import FeatureStats, FIDError, frechet_distance
from sampling.options import Samples, SamplingStopped, seeded_noise
from sampling.sampler import Sampler
from utils.config import ConfigError
from utils.distributed import PeerError, all_reduce_, collective_device
from utils.io import atomic_write

STATS_VERSION = 1  # bump when the way statistics are computed changes, so old cache files are not reused


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """The dataset's content hash, the data part of the cache key."""
    if not hasattr(dataset, "fingerprint"):
        raise FIDError(f"cannot fingerprint a {type(dataset).__name__} for the stats cache")
    return dataset.fingerprint()


@torch.no_grad()
def dataset_statistics(
    dataset: ImageDataset,
    extractor: nn.Module,
    *,
    batch_size: int = 250,
    num_images: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean (D,) and covariance (D, D), float64, of a dataset of (uint8 (C, H, W), label) items; fewer
    ``num_images`` are a fixed random subset, so a class-sorted folder is not cut to its first classes."""
    n_total = len(dataset)
    n = n_total if num_images is None else int(num_images)
    if not 2 <= n <= n_total:
        raise FIDError(f"real statistics need 2..{n_total} images (the dataset's size); got {n}")
    indices = None if n == n_total else torch.randperm(n_total, generator=torch.Generator().manual_seed(0))[:n]
    extractor.eval()
    stats = FeatureStats()
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices.tolist())
    workers = 0 if dataset.in_memory else usable_workers(num_workers)  # workers would only copy what is in memory
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers)
    with tqdm(total=n, desc="FID real images", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images, _ in loader:
            if should_stop is not None and should_stop():  # a training run's stop request
                raise SamplingStopped(f"stopped after {stats.count} of {n} real images")
            stats.update(extract_features(extractor, images))
            bar.update(images.shape[0])
    return stats.mean_cov()


def real_statistics(
    dataset_name: str,
    root: str | os.PathLike,
    image_size: int,
    channels: int,
    *,
    extractor: nn.Module,
    split: str = "train",
    num_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    info: dict[str, Any] | None = None,
    dataset: Any | None = None,
    **kw: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """``dataset_statistics`` of the real set (``kw``: its batch_size, num_workers, progress, should_stop), cached
    (default $XDG_CACHE_HOME/dit/fid_stats); ``info`` gets details."""
    if dataset is None:
        dataset = build_dataset(dataset_name, root, image_size, channels, train=split == "train", download=download)
    n = len(dataset) if num_images is None else int(num_images)
    key = {"version": STATS_VERSION, "dataset": dataset_name, "split": split, "image_size": int(image_size)}
    key |= {"channels": int(channels), "data": dataset_fingerprint(dataset), "extractor": extractor_id(extractor)}
    key["num_images"] = n
    key_json = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "dit" / "fid_stats").expanduser()
    path = cache_dir / f"{dataset_name}-{split}-{image_size}px-{channels}ch-{n}img-{digest}.npz"
    info = {} if info is None else info
    info.update(cache_path=str(path), cache_hit=False, num_images=n, extractor=key["extractor"])
    try:  # a cache file written for exactly this key; a missing, damaged or foreign one is recomputed
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) == key_json:
                info["cache_hit"] = True
                return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, ValueError, KeyError, EOFError):
        pass
    start = time.perf_counter()
    mu, sigma = dataset_statistics(dataset, extractor, num_images=n, **kw)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, key=np.array(key_json)))
    info["seconds"] = time.perf_counter() - start
    return mu, sigma


def open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """An npz file opened lazily (use it in a with block); a one-line FIDError when it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FIDError(f"{path} not found")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # random bytes: numpy's own message suggests allow_pickle, which would run code
        raise FIDError(f"{path} is not an npz file ({type(e).__name__})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise FIDError(f"{path} holds a single array (.npy), not an npz of named arrays")
    return f


def npz_statistics(
    f: np.lib.npyio.NpzFile, path: str | os.PathLike, keys: tuple[str, str], dim: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Checked float64 mean (D,) and covariance (D, D) under ``keys`` of an open npz; a one-line FIDError if bad."""
    m, s = keys
    if missing := [k for k in keys if k not in f.files]:
        raise FIDError(
            f"{path} holds no reference statistics ({', '.join(missing)} missing; it holds {', '.join(f.files)})"
        )
    try:
        mu, sigma = f[m].astype(np.float64), f[s].astype(np.float64)
    except Exception as e:
        raise FIDError(f"cannot read {m} and {s} of {path} ({type(e).__name__})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{path}: {m} {mu.shape} and {s} {sigma.shape} are not a mean (D,) and its covariance (D, D)")
    if dim is not None and mu.shape[0] != dim:
        raise FIDError(f"{path} has {mu.shape[0]}-d statistics; the feature extractor gives {dim}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: {m} or {s} holds NaN or inf")
    scale = np.abs(sigma).max()
    if np.abs(sigma - sigma.T).max() > 1e-5 * scale:
        raise FIDError(f"{path}: {s} is not symmetric, so not a covariance")
    if (low := np.linalg.eigvalsh(sigma)[0]) < -1e-4 * scale:
        raise FIDError(f"{path}: {s} has the eigenvalue {low:.3g} < 0, so it is not a covariance")
    return mu, sigma


def reference_statistics(path: str | os.PathLike, extractor: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``mu``, ``sigma`` (D: the extractor's) of ADM's reference batch or a cache file."""
    dim = INCEPTION_FEATURES if extractor is None else getattr(extractor, "num_features", None)
    with open_npz(path) as f:
        return npz_statistics(f, path, ("mu", "sigma"), dim)


def check_reference_statistics(path: str | os.PathLike, extractor: nn.Module | None = None, flag: str = "") -> None:
    """``reference_statistics``' checks at start-up: a ConfigError naming the flag."""
    try:
        reference_statistics(path, extractor)
    except FIDError as e:
        raise ConfigError(f"{flag} {e}".strip()) from None


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor | None:
    """Class-balanced labels arange(n) % num_classes (N,), or None for an unconditional model."""
    return torch.arange(num_samples) % num_classes if num_classes > 0 else None


def balanced_samples(sampler: Sampler, indices: Sequence[int], seed: int, **options: Any) -> Samples:
    """Samples ``indices`` of a class-balanced set: sample i from the noise (seed, i), of the class i % num_classes
    (as ``balanced_labels``); ``options`` as for ``Sampler.generate``."""
    y = torch.as_tensor(indices) % sampler.num_classes if sampler.num_classes > 0 else None
    noise = seeded_noise(seed, indices, (sampler.in_channels, sampler.input_size, sampler.input_size))
    return sampler.generate(len(indices), y, noise=noise, **options)  # (b, C, H, W)


@torch.no_grad()
def generated_statistics(
    sampler: Sampler,
    num_samples: int,
    *,
    extractor: nn.Module,
    seed: int = 0,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    should_stop: Callable[[], bool] | None = None,
    step_stop: Callable[[], bool] | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Feature mean (D,), covariance (D, D) and NFE per sample of ``num_samples`` class-balanced images. Under DDP
    process r draws samples r, r + world_size, ...; all ask ``should_stop`` equally often and fail together."""
    if num_samples < 2:
        raise FIDError(f"FID needs at least 2 generated samples; got {num_samples}")
    indices = torch.arange(num_samples)[rank::world_size]  # this process's share (empty if num_samples <= rank)
    batch_size = options.get("batch_size", sampler.options.batch_size)
    extractor.eval()
    chunks = [idx for idx in indices.split(batch_size) if len(idx)]
    largest_share = -(-num_samples // world_size)
    chunks += [indices[:0]] * (-(-largest_share // batch_size) - len(chunks))  # as many on every process
    stats, nfes, error = FeatureStats(), [], None
    with tqdm(
        total=len(indices), desc="FID generated images", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for idx in [*chunks, None]:  # None: a last meeting, so that no process leaves while another samples
            if should_stop is not None and should_stop():  # the same answer everywhere: all leave here together
                raise SamplingStopped(f"stopped after {bar.n} of {len(indices)} samples")
            if idx is None or error is not None or not len(idx):  # a failed process goes on asking, without sampling
                continue
            try:
                out = balanced_samples(sampler, idx.tolist(), seed, should_stop=step_stop, **options)
                nfes.append(out.nfe)
                stats.update(extract_features(extractor, out.images))
                bar.update(len(idx))
            except Exception as e:
                if world_size == 1:
                    raise
                error = e  # raised below, after the others have heard of it: none may wait in a collective alone
    # One collective for the failure flag and the NFE sums (a no-op in one process), then the feature sums.
    totals = torch.tensor([float(error is not None), sum(nfes), len(nfes)], dtype=torch.float64)
    failed, nfe_sum, batches = all_reduce_(totals.to(collective_device())).tolist()
    if error is not None:
        raise error
    if failed:
        raise PeerError("sampling for FID failed on another process")
    mu, sigma = stats.all_reduce_().mean_cov()
    return mu, sigma, round(nfe_sum / batches)


def compute_fid(
    sampler: Sampler, real_stats: tuple[np.ndarray, np.ndarray] | None, num_samples: int, **kwargs: Any
) -> tuple[float | None, int]:
    """(FID against ``real_stats``, NFE); keywords as for ``generated_statistics``. A DDP process without the real
    statistics (None) gets (None, nfe)."""
    mu, sigma, nfe = generated_statistics(sampler, num_samples, **kwargs)
    if real_stats is None:
        return None, nfe
    if mu.shape != np.shape(real_stats[0]):
        raise FIDError(f"real statistics have {np.shape(real_stats[0])} features, the extractor gives {mu.shape}")
    return frechet_distance(real_stats[0], real_stats[1], mu, sigma), nfe
