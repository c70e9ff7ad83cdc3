"""Stand-ins and comparisons shared by several test files (importable: pytest puts tests/ on sys.path)."""

import torch


class Features(torch.nn.Module):
    """A small fixed feature extractor standing in for Inception: uint8 (N, 3, H, W) -> (N, 12)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = torch.nn.Conv2d(3, 12, 3)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean((2, 3))


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """Elementwise |actual - expected| <= rel * max |expected|: a tolerance scaled to the magnitude of the
    values, so comparisons hold on any CPU (float kernels differ between Intel and AMD, AVX2 and AVX-512)."""
    scale = expected.detach().abs().max().double().clamp_min(1e-30)
    return (actual.detach().double() - expected.detach().double()).abs() <= rel * scale


def all_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    """``close`` everywhere."""
    return bool(close(actual, expected, rel).all())
