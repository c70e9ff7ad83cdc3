"""A small frozen encoder of the 8x8 digits for REPA (train.py's ``--repa-encoder``), exported with torch.export.

    python -m benchmarks.digits_encoder --out runs/repa/digits-encoder.pt2            # seed 0, 10-20 s on one core

The encoder maps images (B, 1, 8, 8) in [0, 1] to tokens (B, 16, 64): three 3x3 convolutions (the second of stride
2) leave a 4x4 grid of 64-dimensional features, the DiT-XS/2's own patch grid on the digits, so REPA aligns token
to token without resampling. It learns on the digits only, as a classifier: the mean of its tokens goes through a
linear layer to the 10 classes, trained with cross-entropy and Adam on 80% of the set drawn by the seed (the same
uint8 images as ``--dataset digits``, scaled to [0, 1]); the other 20% only measure its accuracy. The head is then
dropped: REPA aligns to the tokens themselves. Training is seeded (weights and batches), so a seed gives the same
encoder. The file is an ExportedProgram (``torch.export.save``) with a dynamic batch dimension, written atomically.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import build_dataset

DIM = 64  # token width


class DigitsEncoder(nn.Module):
    """(B, 1, 8, 8) images in [0, 1] -> (B, 16, 64) tokens on a 4x4 grid, row by row."""

    def __init__(self, width: int = 32, dim: int = DIM):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, dim, 3, stride=2, padding=1),  # (B, dim, 4, 4)
            nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(2 * x - 1).flatten(2).transpose(1, 2)  # (B, 16, dim)


@dataclass
class TrainedEncoder:
    """The token trunk (eval mode, frozen) and its classifier's accuracy on the held-out fifth of the digits."""

    encoder: DigitsEncoder
    heldout_accuracy: float
    seconds: float


def digits_split(seed: int, heldout: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as float (N, 1, 8, 8) images in [0, 1] and labels, split at random by seed: train x, y, held-out
    x, y."""
    images, labels = build_dataset("digits", image_size=8, channels=1, download=False).tensors()
    images = images.float() / 255  # (1797, 1, 8, 8)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - heldout))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def train_encoder(seed: int = 0, steps: int = 500, batch_size: int = 128, lr: float = 4e-3) -> TrainedEncoder:
    """Train the encoder with a linear head (on its mean token) as a digit classifier; return the frozen trunk."""
    start = time.perf_counter()
    x, y, x_test, y_test = digits_split(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        encoder, head = DigitsEncoder(), nn.Linear(DIM, 10)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=lr)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = F.cross_entropy(head(encoder(x[batch]).mean(1)), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (head(encoder(x_test).mean(1)).argmax(1) == y_test).float().mean().item()
    return TrainedEncoder(encoder, accuracy, time.perf_counter() - start)


def export_encoder(module: nn.Module, path: str | Path) -> Path:
    """Save module as a torch.export ExportedProgram with a dynamic batch dimension, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module.eval(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".pt2", dir=path.parent)  # torch wants .pt2
    os.close(fd)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def cli(argv: list[str] | None = None) -> TrainedEncoder:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits_encoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .pt2 file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batches")
    p.add_argument("--steps", type=int, default=500, help="Adam steps of batch 128")
    args = p.parse_args(argv)
    if not args.out.endswith(".pt2"):
        p.error(f"--out must end in .pt2 (torch.export's archive); got {args.out}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1; got {args.steps}")
    trained = train_encoder(args.seed, args.steps)
    export_encoder(trained.encoder, args.out)
    print(
        f"digits encoder, seed {args.seed}, {args.steps} steps: held-out accuracy {trained.heldout_accuracy:.3f}, "
        f"trained in {trained.seconds:.1f} s; wrote {args.out}"
    )
    return trained


if __name__ == "__main__":
    cli()
