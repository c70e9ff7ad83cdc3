"""Sample quality against cost on the 8x8 digits: pixel Fréchet distance and class accuracy by NFE.

    python -m benchmarks.few_step --ckpt runs/digits-flow/checkpoints/last.pt --methods euler:1,2,4,8,16,64
    python -m benchmarks.few_step --ckpt CKPT --methods mean:1,2 euler:1,2,4,8    # CKPT: an average-velocity model

For each solver and step count it draws ``--n`` class-balanced samples (the same noise for every setting) from
the EMA weights and reports the Fréchet distance between their flattened pixels (64-d, in [0, 1]) and the real
digits' (float64, ``evaluation.fid.frechet_distance``) and the accuracy of a logistic regression fitted on the real
digits at classifying each sample as the class it was asked for. No Inception: the digits are too small for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from evaluation.fid import frechet_distance
from sampling.sampler import Sampler, seeded_noise
from sampling.solvers import METHODS


def digits_quality(sampler: Sampler, methods: dict[str, list[int]], n: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (method, steps): NFE, pixel Fréchet distance to the real digits, class accuracy."""
    digits = load_digits()
    real = digits.data / 16.0  # (1797, 64) in [0, 1]
    clf = LogisticRegression(max_iter=2000).fit(real, digits.target)
    y = torch.arange(n) % sampler.num_classes
    noise = seeded_noise(seed, range(n), (sampler.in_channels, sampler.input_size, sampler.input_size))
    rows = []
    for method, steps_list in methods.items():
        for steps in steps_list:
            out = sampler.generate(n, y, noise=noise, method=method, steps=steps, cfg_scale=1.0)
            pixels = out.images.reshape(n, -1).double().cpu().numpy()
            fd = frechet_distance(real.mean(0), np.cov(real, rowvar=False), pixels.mean(0), np.cov(pixels, rowvar=False))
            accuracy = float((clf.predict(pixels) == y.numpy()).mean())
            rows.append({"method": method, "steps": steps, "nfe": out.nfe, "fd": fd, "accuracy": accuracy})
            print(f"{method:>8s} {steps:3d} steps  NFE {out.nfe:3d}  pixel FD {fd:.3f}  accuracy {accuracy:.3f}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: the rows of ``digits_quality`` for --methods, printed and optionally written as JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.few_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a digits checkpoint of train.py (8x8, 1 channel, 10 classes)")
    p.add_argument("--methods", nargs="+", default=["euler:1,2,4,8,16,64"], help="METHOD:STEPS,STEPS,...")
    p.add_argument("--n", type=int, default=2000, help="samples per setting (class-balanced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    methods = {m: [int(s) for s in steps.split(",")] for m, steps in (x.split(":") for x in args.methods)}
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    rows = digits_quality(Sampler.from_checkpoint(args.ckpt, device="cpu"), methods, args.n, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
