"""FID of a trained DiT checkpoint against its real training set (the standard, comparable number).

    python evaluate.py --ckpt runs/cifar10/checkpoints/last.pt --num-samples 50000 --cfg-scale 1.5 --steps 35

(train.py writes OUT/checkpoints/last.pt, OUT defaulting to runs/DATASET.)

Samples ``--num-samples`` images with class-balanced labels from the EMA weights (``--no-ema`` for the
raw ones), computes their Inception features and compares them with the cached statistics of the
un-augmented real set (``utils/fid.py`` has the protocol). The dataset, its path, image size and
channels default to those stored in the checkpoint. Prints the FID and writes a JSON with every
setting, the resolved network precision (``--precision auto`` is bf16 autocast on CUDA, fp32 elsewhere),
the NFE, the sample count and the wall time beside the checkpoint (``--out-json`` elsewhere); an existing
file is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sampler import Sampler, resolve_precision
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import SamplingConfig, add_sampling_args, non_negative_int, parse_device, positive_int
from utils.fid import FIDError, compute_fid, load_inception, real_statistics
from utils.io import write_json_atomic

DEFAULT_DATASET = "cifar10"
DEFAULT_DATA_PATH = "./datasets"


@dataclass(kw_only=True)
class EvalConfig(SamplingConfig):
    """Everything evaluate.py needs: the shared sampling flags (``SamplingConfig``) plus the FID settings.

    None means "from the checkpoint" (dataset, data_path) or "automatic"."""

    ckpt: str
    num_samples: int = 50_000
    ema: bool = True
    dataset: str | None = None
    data_path: str | None = None
    split: str = "train"
    real_images: int | None = None
    stats_dir: str | None = None
    inception_weights: str | None = None
    out_json: str | None = None
    overwrite: bool = False
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="FID of a DiT checkpoint's samples against the real training set (Inception-v3, legacy protocol).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and output")
    g.add_argument(
        "--ckpt", required=True, help="training checkpoint written by train.py, e.g. runs/cifar10/checkpoints/last.pt"
    )
    g.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights")
    g.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights instead of the EMA")
    g.add_argument("--num-samples", type=positive_int, default=50_000, help="generated images (50000 in papers)")
    g.add_argument("--out-json", default=None, help="result file (default: beside the checkpoint, named by settings)")
    g.add_argument("--overwrite", action="store_true", help="replace the result file if it exists")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    g = p.add_argument_group("real statistics")
    g.add_argument("--dataset", default=None, help="real set: cifar10, folder or digits (default: the checkpoint's)")
    g.add_argument("--data-path", default=None, help="dataset root or image folder (default: the checkpoint's)")
    g.add_argument("--split", default="train", choices=("train", "test"), help="real split (CIFAR-10 only)")
    g.add_argument("--real-images", type=positive_int, default=None, help="real images to use (default: all)")
    g.add_argument("--stats-dir", default=None, help="cache of real statistics (default: ~/.cache/dit/fid_stats)")
    g.add_argument("--inception-weights", default=None, help="local copy of torch-fidelity's Inception weights")
    g.add_argument("--num-workers", type=non_negative_int, default=0, help="data loader workers for image folders")
    add_sampling_args(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    """Parse command-line flags into an EvalConfig."""
    return EvalConfig(**vars(build_parser().parse_args(argv)))


def settings_name(cfg: EvalConfig, dataset: str, data_path: str, precision: str) -> str:
    """Result file name: the checkpoint's stem, the main settings, and a hash of all that change the number.

    precision is the resolved one ("bf16" or "fp32"): "auto" means different things on different machines.
    """
    keys = {k: v for k, v in asdict(cfg).items() if k not in ("out_json", "overwrite", "device", "num_workers",
                                                               "progress", "stats_dir")}  # fmt: skip
    keys.update(dataset=dataset, data_path=str(Path(data_path).expanduser().resolve()), precision=precision)
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:8]
    steps = "" if cfg.method == "dopri5" else str(cfg.steps)
    weights = "ema" if cfg.ema else "raw"
    return (
        f"{Path(cfg.ckpt).stem}.fid{cfg.num_samples}-{cfg.method}{steps}-cfg{cfg.cfg_scale:g}-{weights}-{precision}-"
        f"{digest}.json"
    )


def _versions() -> dict[str, str]:
    import numpy
    import scipy
    import torchmetrics

    out = {"torch": torch.__version__, "torchmetrics": torchmetrics.__version__, "numpy": numpy.__version__,
           "scipy": scipy.__version__}  # fmt: skip
    try:
        import torch_fidelity

        out["torch_fidelity"] = torch_fidelity.__version__
    except ImportError:
        pass
    return out


def main(cfg: EvalConfig, *, extractor: nn.Module | None = None) -> dict[str, Any]:
    """Compute the FID described by cfg, print it and write the JSON; returns the JSON's contents.

    ``extractor`` replaces Inception-v3 (any module mapping uint8 (N, 3, H, W) to (N, D)); tests use it.
    """
    t_start = time.perf_counter()
    if cfg.num_samples < 2:
        raise FIDError(f"--num-samples must be >= 2; got {cfg.num_samples}")
    device = parse_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    state = load_checkpoint(cfg.ckpt)
    run_cfg = state.get("config") or {}
    dataset = cfg.dataset or run_cfg.get("dataset") or DEFAULT_DATASET
    data_path = cfg.data_path or run_cfg.get("data_path") or DEFAULT_DATA_PATH
    out_json = (
        Path(cfg.out_json)
        if cfg.out_json
        else Path(cfg.ckpt).parent / settings_name(cfg, dataset, data_path, precision)
    )
    if out_json.exists() and not cfg.overwrite:  # fail before the work, not after it
        raise ValueError(f"{out_json} already exists; pass --overwrite to replace it (or choose --out-json)")

    model = model_from_checkpoint(state, ema=cfg.ema, device=device)
    sampler = Sampler(model, **cfg.sampler_kwargs())  # validates the sampling flags before the real pass
    image_size, channels = int(model.input_size), int(model.in_channels)
    from data import build_dataset

    # the real set first: missing data fails before Inception is loaded (or downloaded)
    real_set = build_dataset(dataset, data_path, image_size=image_size, channels=channels, train=cfg.split == "train")
    if extractor is None:
        extractor = load_inception(device, cfg.inception_weights)
        protocol = "torchmetrics FrechetInceptionDistance Inception-v3 (torch-fidelity weights), pool 2048, uint8, antialias=False"
    else:
        protocol = "custom feature extractor"

    t_real = time.perf_counter()
    info: dict[str, Any] = {}
    real = real_statistics(
        dataset, data_path, image_size, channels, extractor=extractor, split=cfg.split, batch_size=cfg.batch_size,
        num_images=cfg.real_images, cache_dir=cfg.stats_dir, num_workers=cfg.num_workers, progress=cfg.progress,
        info=info, dataset=real_set,
    )  # fmt: skip
    t_gen = time.perf_counter()
    fid, nfe = compute_fid(
        sampler, real, cfg.num_samples, extractor=extractor, batch_size=cfg.batch_size, seed=cfg.seed,
        progress=cfg.progress,
    )  # fmt: skip
    t_end = time.perf_counter()

    result = {
        "fid": fid,
        "num_samples": cfg.num_samples,
        "nfe": nfe,
        "wall_time_s": t_end - t_start,
        "real_stats_time_s": t_gen - t_real,
        "sampling_time_s": t_end - t_gen,
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "step": state.get("step"),
        "ema": cfg.ema,
        "num_classes": sampler.num_classes,
        "class_balanced": sampler.num_classes > 0,
        "dataset": dataset,
        "data_path": str(Path(data_path).expanduser().resolve()),
        "split": cfg.split,
        "image_size": image_size,
        "channels": channels,
        "real_images": info["num_images"],
        "real_stats_cache": info["cache_path"],
        "real_stats_cache_hit": info["cache_hit"],
        "feature_extractor": info["extractor"],
        "feature_dim": int(real[0].shape[0]),
        "protocol": protocol,
        "sampling": {
            "method": sampler.method,
            "steps": sampler.steps,
            "grid": sampler.grid,
            "grid_shift": sampler.grid_shift,
            "cfg_scale": sampler.cfg_scale,
            "guidance_interval": list(sampler.guidance_interval),
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "rtol": sampler.rtol,
            "atol": sampler.atol,
        },  # fmt: skip
        "device": str(device),
        "precision": precision,
        "versions": _versions(),
        "config": asdict(cfg),
    }
    if out_json.exists() and not cfg.overwrite:  # written meanwhile by another run
        raise ValueError(f"{out_json} already exists; pass --overwrite to replace it (or choose --out-json)")
    write_json_atomic(result, out_json)
    print(
        f"FID {fid:.4f} ({cfg.num_samples} samples vs {info['num_images']} real {dataset} {cfg.split} images, "
        f"{sampler.method} NFE {nfe}, cfg {sampler.cfg_scale:g}, {precision}, {'EMA' if cfg.ema else 'raw'} weights, "
        f"{t_end - t_start:.1f}s) -> {out_json}"
    )
    return result


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point: known errors become one line on stderr and a non-zero exit."""
    cfg = parse_args(argv)
    try:
        main(cfg)
    except (ValueError, OSError) as e:  # CheckpointError, DataError and FIDError are ValueErrors
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])
