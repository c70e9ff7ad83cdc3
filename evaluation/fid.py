"""Fréchet Inception Distance (Heusel et al. 2017) of generated samples against a real image set.

Protocol (the published, "legacy" one, so numbers compare with papers): 2048-d pool features of
torch-fidelity's Inception-v3 (the TensorFlow 2015-12-05 weights) through torchmetrics'
``FrechetInceptionDistance`` feature extractor, fed uint8 RGB images (N, 3, H, W) and resized to 299
the TensorFlow-1 way, i.e. with ``antialias=False`` (torchmetrics >= 1.8 antialiases by default, which
departs from the original). Grayscale images are repeated to 3 channels. Generated images in [0, 1]
are rounded to uint8 like saved PNGs. The distance itself is computed here in float64 with numpy.

Real statistics (mean and covariance, float64) are computed from the un-augmented dataset of
``data.build_dataset`` -- never from the training stream -- and cached on disk as npz, keyed by
dataset, split, resolution, channels, the data's content, the feature extractor and the image count,
so a change to any of them recomputes them.

Typical use, from train.py with an in-memory EMA model::

    extractor = load_inception(device)
    real = real_statistics("cifar10", "./datasets", 32, 3, extractor=extractor)
    fid, nfe = compute_fid(Sampler(ema_model, steps=50), real, 10_000, extractor=extractor)  # sampling.sampler

Any ``nn.Module`` mapping uint8 (N, 3, H, W) to features (N, D) can replace Inception (tests inject
small ones); nothing here downloads except ``load_inception``, and that only when the weight file is
not already in torch.hub's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from data import ImageDataset, build_dataset
from data.loader import usable_workers
from sampling.sampler import Sampler, SamplingStopped, seeded_noise
from utils.device import module_device_dtype
from utils.distributed import PeerError, all_reduce_, collective_device, is_initialized
from utils.io import atomic_write

# torch-fidelity's Inception-v3 weights (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3);
# torch.hub.load_state_dict_from_url keeps them as <torch.hub.get_dir()>/checkpoints/<file name>.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = 2048
# Bump when the way statistics are computed changes, so old cache files are not reused.
STATS_VERSION = 1


class FIDError(ValueError):
    """FID cannot be computed: weights unavailable, too few images, or settings that do not fit."""


def default_cache_dir() -> Path:
    """Where real statistics are cached unless told otherwise: $XDG_CACHE_HOME/dit/fid_stats (~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dit" / "fid_stats"


def inception_weights_path() -> Path:
    """The file torch.hub reads the Inception weights from (and downloads them to)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


#################################################################################
#                               The distance                                    #
#################################################################################


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    mu: (D,), sigma: (D, D), both covariances symmetric positive semi-definite.

    The trace of the root is computed without a general matrix square root: with A = sigma1^(1/2),
    sigma1 sigma2 is similar to the symmetric PSD matrix A sigma2 A, so tr (sigma1 sigma2)^(1/2) is the sum
    of the square roots of its eigenvalues. Two symmetric eigendecompositions are exact up to round-off,
    need no eps for singular covariances (fewer samples than dimensions), and take seconds at D = 2048
    where scipy.linalg.sqrtm takes about a minute.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs means (D,) and covariances (D, D) of one D; got {mu1.shape}, "
            f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance got non-finite statistics (NaN or inf features?)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (sigma1 sigma2)^(1/2) for symmetric PSD (D, D) matrices, through symmetric eigendecompositions."""
    # Symmetrise first: covariances accumulated in float64 are symmetric only up to round-off.
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # sigma1^(1/2)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())  # negative eigenvalues are round-off


class FeatureStats:
    """Running float64 mean and covariance of features (N, D), added a batch at a time.

    It keeps sums (count, sum of x, sum of x x^T), so statistics of disjoint sample sets combine by adding
    them: ``merge_`` in one process, ``all_reduce_`` across the processes of a DDP run.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None  # (D,)
        self.outer: torch.Tensor | None = None  # (D, D), sum of x x^T

    def update(self, features: torch.Tensor) -> None:
        """Add features (N, D) (any float dtype or device)."""
        if features.dim() != 2:
            raise ValueError(f"features must be (N, D); got shape {tuple(features.shape)}")
        x = features.detach().to(device="cpu", dtype=torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        elif x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"feature size changed from {self.sum.shape[0]} to {x.shape[1]}")
        if not torch.isfinite(x).all():
            raise FIDError("the feature extractor returned NaN or inf")
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def merge_(self, other: FeatureStats) -> FeatureStats:
        """Add other's sums to these (in place; returns self): the statistics of both sample sets together."""
        if other.sum is None:
            return self
        if self.sum is None:
            self.sum, self.outer = other.sum.clone(), other.outer.clone()
        elif other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge statistics of {other.sum.shape[0]} and {self.sum.shape[0]} features")
        else:
            self.sum += other.sum
            self.outer += other.outer
        self.count += other.count
        return self

    def all_reduce_(self) -> FeatureStats:
        """Sum count, sum and outer-product sum over every process, in float64 (in place; returns self).

        A collective: every process must call it, also one that saw no features. A no-op in one process.
        """
        if not is_initialized():
            return self
        device = collective_device()
        dim = torch.tensor([0 if self.sum is None else self.sum.shape[0]], device=device)
        all_reduce_(dim, "max")  # a process with no samples learns D from the others
        d = int(dim.item())
        if d == 0:
            return self
        if self.sum is None:
            self.sum = torch.zeros(d, dtype=torch.float64)
            self.outer = torch.zeros(d, d, dtype=torch.float64)
        count = torch.tensor([float(self.count)], dtype=torch.float64)  # exact up to 2**53 samples
        packed = torch.cat([count, self.sum, self.outer.reshape(-1)]).to(device)
        all_reduce_(packed, "sum")
        packed = packed.cpu()
        self.count = int(packed[0].item())
        self.sum = packed[1 : d + 1].clone()
        self.outer = packed[d + 1 :].reshape(d, d).clone()
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D), float64 (np.cov's N - 1 normalisation, as torchmetrics)."""
        if self.count < 2:
            raise FIDError(f"FID needs at least 2 images per set; got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), sigma.numpy()


#################################################################################
#                            Feature extraction                                 #
#################################################################################


def load_inception(device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None) -> nn.Module:
    """torchmetrics' FID Inception-v3 (2048-d pool features, torch-fidelity weights), legacy resize, on device.

    The module maps uint8 (N, 3, H, W) to float32 (N, 2048). Weights come from ``weights_path`` or torch.hub's
    cache, downloaded there on first use; when that is impossible a FIDError says where to put the file.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    kwargs: dict[str, Any] = {"feature": INCEPTION_FEATURES, "normalize": False, "antialias": False}
    if weights_path is not None:
        weights_path = Path(weights_path).expanduser()
        if not weights_path.is_file():
            raise FIDError(f"Inception weights not found: {weights_path} (expected {INCEPTION_FILENAME})")
        kwargs["feature_extractor_weights_path"] = str(weights_path)
    try:
        metric = FrechetInceptionDistance(**kwargs)
    except (ModuleNotFoundError, ImportError) as e:
        raise FIDError(f"FID needs torch-fidelity: pip install torch-fidelity ({e})") from None
    except Exception as e:  # urllib, http and hub errors all mean: the weights could not be fetched
        if weights_path is not None:  # one line: a mismatch would list every key of both state dicts
            try:
                held = torch.load(weights_path, map_location="cpu", weights_only=True)
            except Exception:
                held = None
            what = (
                "it is a training checkpoint of this project (pass it as --ckpt), not the Inception weights"
                if isinstance(held, dict) and {"model_config", "model"} <= held.keys()
                else f"not torch-fidelity's Inception-v3 weights ({type(e).__name__})"
            )
            raise FIDError(
                f"cannot load Inception weights from {weights_path}: {what}; expected {INCEPTION_FILENAME} "
                f"from {INCEPTION_URL}"
            ) from None
        target = inception_weights_path()
        raise FIDError(
            f"cannot get the Inception-v3 weights for FID ({type(e).__name__}: {e}); download {INCEPTION_URL} "
            f"and put it in {target.parent}/ as {target.name} (or pass its path with --inception-weights)"
        ) from None
    inception = metric.inception
    inception.num_features = INCEPTION_FEATURES
    return inception.to(device).eval()


def load_inception_logits(
    device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None
) -> nn.Module:
    """The same Inception-v3 giving its 1008 class logits ("logits_unbiased", torch-fidelity's Inception Score
    feature), legacy resize, on device; weights as for ``load_inception``."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    weights = str(Path(weights_path).expanduser()) if weights_path is not None else None
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["logits_unbiased"],
            feature_extractor_weights_path=weights,
            antialias=False,
        )
    except Exception as e:
        raise FIDError(
            f"cannot get the Inception-v3 weights for the Inception Score ({type(e).__name__}: {e}); "
            f"download {INCEPTION_URL} into {inception_weights_path().parent}/"
        ) from None
    return net.to(device).eval()


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of class logits (N, K): exp(E_x KL(p(y|x) || p(y))) on each of
    ``splits`` equal parts, float64; returns the mean and standard deviation over the parts, as torch-fidelity."""
    p = torch.softmax(logits.double(), dim=1)
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part, log_part in zip(p.chunk(splits), log_p.chunk(splits), strict=True):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (log_part - marginal.log())).sum(1).mean()
        scores.append(kl.exp())
    scores_t = torch.stack(scores)
    return float(scores_t.mean()), float(scores_t.std(unbiased=True)) if len(scores) > 1 else 0.0


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W), C in {1, 3}, float in [0, 1] or uint8 -> uint8 (N, 3, H, W), gray repeated."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float in [0, 1]; got {images.dtype}")
        images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)  # like saving a PNG
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features (N, D) of images (N, C, H, W) (uint8, or float in [0, 1]) on the extractor's device."""
    feats = extractor(to_uint8_rgb(images).to(module_device_dtype(extractor)[0]))
    if feats.dim() == 1:
        feats = feats.unsqueeze(0)
    if feats.dim() != 2 or feats.shape[0] != images.shape[0]:
        raise FIDError(f"feature extractor must return (N, D) for N={images.shape[0]}; got {tuple(feats.shape)}")
    return feats


def extractor_id(extractor: nn.Module) -> str:
    """Identity of a feature extractor for the stats cache: class, protocol options and a state_dict hash."""
    h = hashlib.sha256()
    for name, t in sorted(extractor.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    parts = [type(extractor).__module__ + "." + type(extractor).__qualname__]
    for attr in ("features_list", "use_antialias", "INPUT_IMAGE_SIZE"):  # torchmetrics' Inception options
        if hasattr(extractor, attr):
            parts.append(f"{attr}={getattr(extractor, attr)}")
    parts.append(h.hexdigest()[:16])
    return ",".join(parts)


#################################################################################
#                               Real statistics                                 #
#################################################################################


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """The dataset's own content hash (its ``fingerprint()``, a short hex string), the data part of the cache key."""
    try:
        fingerprint = dataset.fingerprint
    except AttributeError:
        raise FIDError(f"cannot fingerprint a {type(dataset).__name__} for the stats cache") from None
    return fingerprint()


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
    """Feature mean (D,) and covariance (D, D), float64, of a dataset of (uint8 (C, H, W), label) items.

    ``num_images`` < len(dataset) takes a fixed random subset (seed 0), so a class-sorted folder is not cut
    to its first classes. Batches come from a plain DataLoader: a dataset held in memory fetches each with one
    gather (``__getitems__``) in this process; one read from disk uses ``num_workers`` loader processes.
    should_stop: asked before each batch; True raises ``SamplingStopped`` (a training run's stop request).
    """
    n_total = len(dataset)
    n = n_total if num_images is None else int(num_images)
    if not 2 <= n <= n_total:
        raise FIDError(f"real statistics need 2..{n_total} images (the dataset's size); got {n}")
    indices = None if n == n_total else torch.randperm(n_total, generator=torch.Generator().manual_seed(0))[:n]
    extractor.eval()
    stats = FeatureStats()
    bar = tqdm(total=n, desc="FID real images", unit="img", disable=not progress, dynamic_ncols=True)
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices.tolist())
    workers = 0 if dataset.in_memory else usable_workers(num_workers)  # workers would only copy what is in memory
    for images, _ in torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers):
        if should_stop is not None and should_stop():
            bar.close()
            raise SamplingStopped(f"stopped after {stats.count} of {n} real images")
        stats.update(extract_features(extractor, images))
        bar.update(images.shape[0])
    bar.close()
    return stats.mean_cov()


def real_statistics(
    dataset_name: str,
    root: str | os.PathLike,
    image_size: int,
    channels: int,
    *,
    extractor: nn.Module,
    split: str = "train",
    batch_size: int = 250,
    num_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    num_workers: int = 0,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    dataset: Any | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean (D,) and covariance (D, D), float64, of the un-augmented real set, cached on disk.

    The dataset comes from ``data.build_dataset`` (a fresh one: the training stream is never touched).
    The cache file in ``cache_dir`` (default ``default_cache_dir()``) is reused only when dataset name, split,
    image size, channels, data content, extractor (``extractor_id``) and image count all match; otherwise the
    statistics are recomputed and written. Images go to the extractor's device. ``info``, when given, is
    filled with the cache path, whether it was a hit, the image count and the extractor id. ``dataset``: the
    dataset these arguments build, when the caller already has it (it is fingerprinted all the same).
    ``should_stop``: as for ``dataset_statistics`` (nothing is cached then).
    """
    if dataset is None:
        dataset = build_dataset(
            dataset_name,
            root=root,
            image_size=image_size,
            channels=channels,
            train=split == "train",
            download=download,
        )
    n = len(dataset) if num_images is None else int(num_images)
    key = dict(
        version=STATS_VERSION,
        dataset=dataset_name,
        split=split,
        image_size=int(image_size),
        channels=int(channels),
        data=dataset_fingerprint(dataset),
        extractor=extractor_id(extractor),
        num_images=n,
    )
    key_json = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
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
    mu, sigma = dataset_statistics(
        dataset,
        extractor,
        batch_size=batch_size,
        num_images=n,
        num_workers=num_workers,
        progress=progress,
        should_stop=should_stop,
    )
    # Written atomically (utils.io), so a killed run leaves no half file.
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, key=np.array(key_json)))
    info["seconds"] = time.perf_counter() - start
    return mu, sigma


def reference_statistics(
    path: str | os.PathLike, extractor: nn.Module | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Feature mean (D,) and covariance (D, D), float64, from an npz with ``mu`` and ``sigma``, and what it is.

    Takes the reference batches of ADM's evaluation suite (``VIRTUAL_imagenet256_labeled.npz``: its ``mu`` and
    ``sigma`` are the pool features of the same TF Inception-v3 weights as ours, of 50k centre-cropped ImageNet
    training images) and this module's own cache files. With ``extractor`` its feature size must match."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise FIDError(f"{path} holds no reference statistics (mu and sigma); it has {', '.join(f.files)}")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            what = str(f["key"]) if "key" in f.files else f"{path.name} (mu, sigma)"
    except (OSError, ValueError, EOFError) as e:
        raise FIDError(f"cannot read reference statistics {path}: {type(e).__name__}: {e}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    dim = getattr(extractor, "num_features", None)
    if dim is not None and mu.shape[0] != dim:
        raise FIDError(f"{path} has {mu.shape[0]}-d statistics; the feature extractor gives {dim}")
    return mu, sigma, what


#################################################################################
#                          Generated statistics and FID                         #
#################################################################################


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor | None:
    """Class-balanced labels arange(n) % num_classes (N,), or None for an unconditional model."""
    return torch.arange(num_samples) % num_classes if num_classes > 0 else None


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
    on_batch: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Feature mean (D,), covariance (D, D) and NFE per sample of ``num_samples`` images from ``sampler``.

    Labels are class-balanced (``balanced_labels``) for a conditional model. Sample i starts from the noise
    ``python sampler.py --seed SEED`` gives sample i, whatever the batch size. ``options`` override the sampler's
    sampling options (``batch_size`` among them: images per batch). NFE is the batches' mean ``Samples.nfe``.

    In a DDP run every process calls this with its ``rank`` and the ``world_size``: process r draws the samples
    i = r, r + world_size, ... (each with sample i's noise and label), and the feature sums are all-reduced in
    float64, so every process returns the statistics of the same num_samples images as a single process would
    (equal up to float64 round-off from the order of the sums). When sampling fails on any process, all of them
    raise: the failing one its own error, the others ``PeerError``.

    on_batch: called with each batch's images (b, C, H, W) in [0, 1] and labels (evaluate.py keeps them for the ADM
    npz and the Inception Score).

    should_stop: asked before each batch; True raises ``SamplingStopped`` (a training run's stop request). Under DDP
    it must be a collective that gives every process the same answer (``StopRequest.check``): every process asks it
    the same number of times (the batches of the largest share, and once after them), so none is left waiting in a
    collective alone. step_stop: asked between solver steps (``Sampler.generate``'s should_stop); under DDP as often
    as each process samples, with should_stop a meeting that waits for the others (``utils.preemption.AgreedStop``).
    """
    if num_samples < 2:
        raise FIDError(f"FID needs at least 2 generated samples; got {num_samples}")
    shape = (sampler.in_channels, sampler.input_size, sampler.input_size)
    labels = balanced_labels(num_samples, sampler.num_classes)
    indices = torch.arange(num_samples)[rank::world_size]  # this process's share (empty if num_samples <= rank)
    batch_size = options.get("batch_size", sampler.options.batch_size)
    extractor.eval()
    chunks = [idx for idx in indices.split(batch_size) if len(idx)]
    largest_share = -(-num_samples // world_size)
    chunks += [indices[:0]] * (-(-largest_share // batch_size) - len(chunks))  # as many on every process
    stats, nfes, error = FeatureStats(), [], None
    bar = tqdm(total=len(indices), desc="FID generated images", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for idx in [*chunks, None]:  # None: a last meeting, so that no process leaves while another samples
            if should_stop is not None and should_stop():  # the same answer everywhere: all leave here together
                raise SamplingStopped(f"stopped after {bar.n} of {len(indices)} samples")
            if idx is None or error is not None or not len(idx):  # a failed process goes on asking, without sampling
                continue
            try:
                noise = seeded_noise(seed, idx.tolist(), shape)  # (b, C, H, W)
                y = None if labels is None else labels[idx]
                out = sampler.generate(len(idx), y, noise=noise, should_stop=step_stop, **options)  # (b, C, H, W)
                nfes.append(out.nfe)
                stats.update(extract_features(extractor, out.images))
                if on_batch is not None:
                    on_batch(out.images, out.labels)
                bar.update(len(idx))
            except Exception as e:
                if world_size == 1:
                    raise
                error = e  # raised below, after the others have heard of it: none may wait in a collective alone
    finally:
        bar.close()
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
    sampler: Sampler,
    real_stats: tuple[np.ndarray, np.ndarray] | None,
    num_samples: int,
    *,
    extractor: nn.Module,
    **kwargs: Any,
) -> tuple[float | None, int]:
    """FID of ``num_samples`` samples from ``sampler`` against real (mu (D,), sigma (D, D)); returns (fid, nfe).

    ``kwargs`` are those of ``generated_statistics`` (seed, progress, rank, world_size, sampling options).
    ``extractor`` must be the one that produced ``real_stats``. In a DDP run every process calls it; one without
    the real statistics (None) samples its share and gets (None, nfe).
    """
    mu, sigma, nfe = generated_statistics(sampler, num_samples, extractor=extractor, **kwargs)
    if real_stats is None:
        return None, nfe
    if mu.shape != np.shape(real_stats[0]):
        raise FIDError(f"real statistics have {np.shape(real_stats[0])} features, the extractor gives {mu.shape}")
    return frechet_distance(real_stats[0], real_stats[1], mu, sigma), nfe
