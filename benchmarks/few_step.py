"""Sample quality against cost on the 8x8 digits: pixel Fréchet distance and class accuracy by NFE and guidance.

    python -m benchmarks.few_step --ckpt runs/digits-flow/checkpoints/last.pt --methods euler:1,2,4,8,16,64
    python -m benchmarks.few_step --ckpt A B C --methods mean:1,2,4 euler:1,2,4,8,16 --cfg-scales 1 2 2.5

For each checkpoint, solver, step count and guidance scale it draws ``--n`` class-balanced samples (the same noise
for every setting) from the EMA weights (``--no-ema``: the raw ones) and reports the Fréchet distance between their
flattened pixels (64-d, in [0, 1]) and the real digits' (float64, ``evaluation.fid.frechet_distance``) and the
accuracy of a logistic regression fitted on the real digits at classifying each sample as the class it was asked
for, and the total variance of their pixels (the real digits': 4.70; under-dispersed samples have less). No
Inception: the digits are too small for it. A method a model cannot run (``mean`` on a flow model) and a scale
outside a guidance-input model's trained range are left out.

NFE counts network passes per sample honestly: a classifier-free guided step runs the conditional and the
unconditional pass (one batched pass of 2N: NFE 2 per step), a network with the scale as an input one pass.
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
from sampling.options import seeded_noise
from sampling.sampler import Sampler
from sampling.solvers import METHODS, SOLVERS
from utils.checkpoint import load_checkpoint


def passes_per_evaluation(sampler: Sampler, cfg_scale: float) -> int:
    """Network passes per sample in one velocity evaluation: 2 for classifier-free guidance (conditional and
    unconditional, over the whole time range), 1 unguided or with the scale as a network input."""
    return 2 if cfg_scale != 1.0 and sampler.guidance_range is None and sampler.num_classes > 0 else 1


def digits_quality(
    sampler: Sampler,
    methods: dict[str, list[int]],
    n: int = 2000,
    seed: int = 0,
    cfg_scales: tuple[float, ...] = (1.0,),
) -> list[dict]:
    """One row per (method, steps, cfg scale) the model can run: NFE, pixel Fréchet distance to the real digits,
    class accuracy and the samples' total pixel variance (the trace of their covariance; the real digits' 4.70)."""
    digits = load_digits()
    real = digits.data / 16.0  # (1797, 64) in [0, 1]
    clf = LogisticRegression(max_iter=2000).fit(real, digits.target)
    y = torch.arange(n) % sampler.num_classes
    noise = seeded_noise(seed, range(n), (sampler.in_channels, sampler.input_size, sampler.input_size))
    rows = []
    for method, steps_list in methods.items():
        solver = SOLVERS.get(method)
        if solver is not None and solver.average_velocity and not sampler.average_velocity:
            continue
        for scale in cfg_scales:
            lo, hi = sampler.guidance_range or (-np.inf, np.inf)
            if not lo <= scale <= hi:
                continue
            for steps in steps_list:
                out = sampler.generate(n, y, noise=noise, method=method, steps=steps, cfg_scale=scale)
                nfe = out.nfe * passes_per_evaluation(sampler, scale)
                pixels = out.images.reshape(n, -1).double().cpu().numpy()
                cov = np.cov(pixels, rowvar=False)
                fd = frechet_distance(real.mean(0), np.cov(real, rowvar=False), pixels.mean(0), cov)
                accuracy = float((clf.predict(pixels) == y.numpy()).mean())
                variance = float(np.trace(cov))  # the real digits': 4.70; lower is under-dispersed
                rows.append(
                    {
                        "method": method,
                        "steps": steps,
                        "cfg_scale": scale,
                        "nfe": nfe,
                        "fd": fd,
                        "accuracy": accuracy,
                        "variance": variance,
                    }
                )
                print(
                    f"{method:>8s} {steps:3d} steps  cfg {scale:<4g} NFE {nfe:3d}  pixel FD {fd:.3f}  "
                    f"accuracy {accuracy:.3f}  variance {variance:.2f}",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: the rows of ``digits_quality`` for each checkpoint, printed and optionally written as JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.few_step", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ckpt", required=True, nargs="+", help="digits checkpoints of train.py (8x8, 1 channel, 10 classes)"
    )
    p.add_argument("--methods", nargs="+", default=["euler:1,2,4,8,16,64"], help="METHOD:STEPS,STEPS,...")
    p.add_argument("--cfg-scales", nargs="+", type=float, default=[1.0], help="guidance scales (1: none)")
    p.add_argument("--n", type=int, default=2000, help="samples per setting (class-balanced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (--no-ema: raw)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    methods = {m: [int(s) for s in steps.split(",")] for m, steps in (x.split(":") for x in args.methods)}
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    rows = []
    for ckpt in args.ckpt:
        objective = (load_checkpoint(ckpt).get("config") or {}).get("objective", "flow")
        print(f"{ckpt} ({objective}, {'EMA' if args.ema else 'raw'} weights)", flush=True)
        sampler = Sampler.from_checkpoint(ckpt, ema=args.ema, device="cpu")
        found = digits_quality(sampler, methods, args.n, args.seed, tuple(args.cfg_scales))
        rows += [{"checkpoint": ckpt, "objective": objective, "ema": args.ema, **row} for row in found]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
