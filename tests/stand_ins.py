"""Stand-ins shared by several test files (importable: pytest puts tests/ on sys.path)."""

import torch


class Features(torch.nn.Module):
    """A small fixed feature extractor standing in for Inception: uint8 (N, 3, H, W) -> (N, 12)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = torch.nn.Conv2d(3, 12, 3)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean((2, 3))
