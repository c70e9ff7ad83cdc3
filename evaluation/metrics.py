"""The numbers of ADM's evaluation suite from features: the Fréchet distance (FID, sFID), the Inception Score and
improved precision and recall. Feature extraction lives in ``evaluation.inception``."""

from __future__ import annotations

import numpy as np
import torch

from utils.distributed import all_reduce_, collective_device, is_initialized

Array = torch.Tensor | np.ndarray


class FIDError(ValueError):
    """FID cannot be computed: weights unavailable, too few images, or settings that do not fit."""


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) of N(mu1, sigma1), N(mu2, sigma2), float64.
    With A = sigma1^(1/2), sigma1 sigma2 is similar to the symmetric PSD A sigma2 A, so tr (sigma1 sigma2)^(1/2) is the
    sum of the square roots of its eigenvalues: two symmetric eigendecompositions, exact up to round-off, need no eps
    for singular covariances (fewer samples than dimensions) and take seconds at D = 2048 (scipy's sqrtm: a minute)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        shapes = f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        raise ValueError(f"frechet_distance needs means (D,) and covariances (D, D) of one D; got {shapes}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance got non-finite statistics (NaN or inf features?)")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)  # symmetrised: float64 sums are symmetric up to round-off
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # sigma1^(1/2)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()  # negative eigenvalues are round-off
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class FeatureStats:
    """Running float64 sums of x and x x^T of features (N, D): disjoint sets combine by adding them."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None  # (D,)
        self.outer: torch.Tensor | None = None  # (D, D), sum of x x^T

    def update(self, features: torch.Tensor) -> None:
        if features.dim() != 2:
            raise ValueError(f"features must be (N, D); got shape {tuple(features.shape)}")
        x = features.detach().to(device="cpu", dtype=torch.float64)
        d = x.shape[1]
        if self.sum is None:
            self.sum, self.outer = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        elif x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"feature size changed from {self.sum.shape[0]} to {x.shape[1]}")
        if not torch.isfinite(x).all():
            raise FIDError("the feature extractor returned NaN or inf")
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def all_reduce_(self) -> FeatureStats:
        """Sum the sums over every process (in place); a collective, also for a process that saw no features."""
        if not is_initialized():
            return self
        device = collective_device()
        dim = torch.tensor([0 if self.sum is None else self.sum.shape[0]], device=device)
        all_reduce_(dim, "max")  # a process with no samples learns D from the others
        d = int(dim.item())
        if d == 0:
            return self
        if self.sum is None:
            self.sum, self.outer = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        count = torch.tensor([float(self.count)], dtype=torch.float64)  # exact up to 2**53 samples
        packed = torch.cat([count, self.sum, self.outer.reshape(-1)]).to(device)
        packed = all_reduce_(packed, "sum").cpu()
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


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) of logits (N, K): mean, std of the parts."""
    p = torch.softmax(logits.double(), dim=1)
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part, log_part in zip(p.chunk(splits), log_p.chunk(splits), strict=True):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (log_part - marginal.log())).sum(1).mean()
        scores.append(kl.exp())
    scores_t = torch.stack(scores)
    return float(scores_t.mean()), float(scores_t.std(unbiased=True)) if len(scores) > 1 else 0.0


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 (n, m) of rows a (n, D) and b (m, D): norms and one matmul, clamped at 0 against round-off."""
    return (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min_(0)


def knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance (N,) of each row of x (N, D) to its k-th nearest neighbour among the other rows."""
    if not 1 <= k < len(x):
        raise FIDError(f"precision and recall with k = {k} need more than {k} images per set; got {len(x)}")
    radii = []
    for i in range(0, len(x), batch_size):
        d = squared_distances(x[i : i + batch_size], x)  # (b, N)
        d[torch.arange(len(d)), torch.arange(i, i + len(d))] = torch.inf  # the point itself is no neighbour
        radii.append(d.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def precision_recall(real: Array, fake: Array, k: int = 3, batch_size: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them: the fraction of fake points in
    the real manifold (balls of k-th nearest neighbour radius) and of real points in the fake one."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    dtype = torch.promote_types(real.dtype, torch.float32)
    real, fake = real.to(dtype), fake.to(real.device, dtype)
    real_radii, fake_radii = knn_radii(real, k, batch_size), knn_radii(fake, k, batch_size)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    for i in range(0, len(real), batch_size):
        for j in range(0, len(fake), batch_size):
            d = squared_distances(real[i : i + batch_size], fake[j : j + batch_size])  # (b_real, b_fake)
            real_in[i : i + batch_size] |= (d <= fake_radii[j : j + batch_size]).any(1)
            fake_in[j : j + batch_size] |= (d <= real_radii[i : i + batch_size, None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()
