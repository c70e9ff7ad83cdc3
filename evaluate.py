"""FID of a trained DiT checkpoint against its real training set (the standard, comparable number).

    python evaluate.py --ckpt runs/cifar10/checkpoints/last.pt --num-samples 50000 --cfg-scale 1.5 --steps 35

Samples ``--num-samples`` images with class-balanced labels from the EMA weights (``--no-ema`` for the raw
ones), computes their Inception features and compares them with the cached statistics of the un-augmented
real set (``evaluation/fid.py`` has the protocol). The dataset and its path default to those stored in the
checkpoint, and the method to its objective's (``--method`` unset). Prints the FID and writes a JSON with every
setting as given ("config"), the method and network precision they resolved to, the NFE, the sample count and the
wall time beside the checkpoint (``--out-json`` elsewhere), named by the main settings; an existing file is never
replaced without ``--overwrite``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from data import DATASETS, build_dataset
from evaluation.fid import compute_fid, load_inception, real_statistics
from sampling.sampler import Sampler, SamplingOptions, checkpoint_sample_method, sampling_options
from sampling.solvers import ADAPTIVE
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import ConfigError, arg, parse
from utils.device import resolve_device, resolve_precision
from utils.io import write_json_atomic

PROTOCOL = "torchmetrics FrechetInceptionDistance Inception-v3 (torch-fidelity weights), pool 2048, uint8, antialias=False"


@dataclass(kw_only=True)
class EvalConfig(SamplingOptions):
    """Everything evaluate.py needs: the sampling options plus the FID settings."""

    ckpt: str = arg(None, "training checkpoint written by train.py, e.g. runs/cifar10/checkpoints/last.pt",
                    group="model and output", required=True)  # fmt: skip
    ema: bool = arg(True, "use the EMA weights (--no-ema: the raw weights)")
    num_samples: int = arg(50_000, "generated images (50000 in papers)", min=2)
    seed: int = arg(0, "seed of the noise (sample i starts from noise i)", min=0)
    out_json: str | None = arg(None, "result file (default: beside the checkpoint, named by the settings)")
    overwrite: bool = arg(False, "replace the result file if it exists")
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    progress: bool = arg(True, "show progress bars")
    dataset: str | None = arg(None, f"real set: {', '.join(DATASETS)} (default: the checkpoint's)",
                              group="real statistics")  # fmt: skip
    data_path: str | None = arg(None, "dataset root or image folder (default: the checkpoint's)")
    split: str = arg("train", "real split (CIFAR-10 only)", choices=("train", "test"))
    real_images: int | None = arg(None, "real images to use (default: all)", min=2)
    stats_dir: str | None = arg(None, "cache of real statistics (default: ~/.cache/dit/fid_stats)")
    inception_weights: str | None = arg(None, "local copy of torch-fidelity's Inception weights")
    num_workers: int = arg(0, "data loader workers for image folders", min=0)


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    """Command-line flags -> EvalConfig."""
    return parse(EvalConfig, argv, "evaluate.py", __doc__.split("\n\n")[0])


def result_path(cfg: EvalConfig, method: str, precision: str) -> Path:
    """Where the JSON goes: --out-json, or beside the checkpoint, named by the settings that change the number
    (method and precision as resolved)."""
    if cfg.out_json:
        return Path(cfg.out_json)
    steps = "" if method in ADAPTIVE else str(cfg.steps)
    weights = "ema" if cfg.ema else "raw"
    name = f"{Path(cfg.ckpt).stem}.fid{cfg.num_samples}-{method}{steps}-cfg{cfg.cfg_scale:g}-{weights}-{precision}"
    return Path(cfg.ckpt).parent / f"{name}-seed{cfg.seed}.json"


def main(cfg: EvalConfig, *, extractor: nn.Module | None = None) -> dict[str, Any]:
    """Compute the FID described by cfg, print it and write the JSON; returns the JSON's contents.

    ``extractor`` replaces Inception-v3 (any module mapping uint8 (N, 3, H, W) to (N, D)); tests use it.
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    state = load_checkpoint(cfg.ckpt)
    method = cfg.method or checkpoint_sample_method(state)
    out_json = result_path(cfg, method, precision)
    if out_json.exists() and not cfg.overwrite:  # fail before the work, not after it
        raise ConfigError(f"{out_json} already exists; pass --overwrite to replace it (or choose --out-json)")
    dataset = cfg.dataset or state.get("config", {}).get("dataset", "cifar10")
    data_path = cfg.data_path or state.get("config", {}).get("data_path", "./datasets")
    model = model_from_checkpoint(state, ema=cfg.ema, device=device)
    sampler = Sampler(model, **{**sampling_options(cfg), "method": method})
    size, channels = model.input_size, model.in_channels
    # the real set first: missing data fails before Inception is loaded (or downloaded)
    real_set = build_dataset(dataset, data_path, image_size=size, channels=channels, train=cfg.split == "train")
    protocol = "custom feature extractor" if extractor is not None else PROTOCOL
    extractor = extractor or load_inception(device, cfg.inception_weights)

    t_real, info = time.perf_counter(), {}
    real = real_statistics(
        dataset, data_path, size, channels, extractor=extractor, split=cfg.split, batch_size=cfg.batch_size,
        num_images=cfg.real_images, cache_dir=cfg.stats_dir, num_workers=cfg.num_workers, progress=cfg.progress,
        info=info, dataset=real_set,
    )  # fmt: skip
    t_gen = time.perf_counter()
    fid, nfe = compute_fid(sampler, real, cfg.num_samples, extractor=extractor, seed=cfg.seed, progress=cfg.progress)
    t_end = time.perf_counter()
    result = {
        "fid": fid, "num_samples": cfg.num_samples, "nfe": nfe, "wall_time_s": t_end - t_start,
        "real_stats_time_s": t_gen - t_real, "sampling_time_s": t_end - t_gen,
        "checkpoint": str(Path(cfg.ckpt).resolve()), "step": state.get("step"), "ema": cfg.ema,
        "num_classes": sampler.num_classes, "class_balanced": sampler.num_classes > 0, "dataset": dataset,
        "data_path": str(Path(data_path).expanduser().resolve()), "split": cfg.split, "image_size": size,
        "channels": channels, "real_images": info["num_images"], "real_stats_cache": info["cache_path"],
        "real_stats_cache_hit": info["cache_hit"], "feature_extractor": info["extractor"],
        "feature_dim": int(real[0].shape[0]), "protocol": protocol, "method": method,
        "device": str(device), "precision": precision, "config": asdict(cfg),
        "versions": {"torch": torch.__version__, **{lib: version(lib) for lib in ("torchmetrics", "numpy", "scipy")}},
    }  # fmt: skip
    if out_json.exists() and not cfg.overwrite:  # written meanwhile by another run
        raise ConfigError(f"{out_json} already exists; pass --overwrite to replace it (or choose --out-json)")
    write_json_atomic(result, out_json)
    print(f"FID {fid:.4f} ({cfg.num_samples} samples vs {info['num_images']} real {dataset} {cfg.split} images, "
          f"{method} NFE {nfe}, cfg {cfg.cfg_scale:g}, {precision}, {'EMA' if cfg.ema else 'raw'} weights, "
          f"{t_end - t_start:.1f}s) -> {out_json}")  # fmt: skip
    return result


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point: known errors become one line on stderr and a non-zero exit."""
    try:
        main(parse_args(argv))
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, DataError and FIDError are ValueErrors
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])
