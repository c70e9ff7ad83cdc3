"""FID of a trained DiT checkpoint against its real training set (the standard, comparable number).

    python evaluate.py --ckpt runs/x/ckpt.pt --num-samples 50000 --cfg-scale 1.5 --steps 35 --method heun

Samples ``--num-samples`` images with class-balanced labels from the EMA weights (``--no-ema`` for the
raw ones), computes their Inception features and compares them with the cached statistics of the
un-augmented real set (``utils/fid.py`` has the protocol). The dataset, its path, image size and
channels default to those stored in the checkpoint. Prints the FID and writes a JSON with every
setting, the NFE, the sample count and the wall time beside the checkpoint (``--out-json`` elsewhere);
an existing file is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import add_sampling_args
from utils.fid import FIDError, compute_fid, load_inception, real_statistics

DEFAULT_DATASET = "cifar10"
DEFAULT_DATA_PATH = "./datasets"


@dataclass
class EvalConfig:
    """Everything evaluate.py needs; None means "from the checkpoint" (dataset) or "automatic"."""

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
    device: str | None = None
    num_workers: int = 0
    progress: bool = True
    # Sampling flags shared with sampler.py (utils.cli.add_sampling_args).
    cfg_scale: float = 1.0
    steps: int = 50
    method: str = "heun"
    grid: str = "uniform"
    grid_shift: float = 3.0
    guidance_interval: tuple[float, float] = field(default=(0.0, 1.0))
    batch_size: int = 256
    seed: int = 0
    rtol: float = 1e-5
    atol: float = 1e-5

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sampler.Sampler``."""
        return dict(
            steps=self.steps, method=self.method, grid=self.grid, cfg_scale=self.cfg_scale,
            guidance_interval=tuple(self.guidance_interval), batch_size=self.batch_size, rtol=self.rtol,
            atol=self.atol, grid_shift=self.grid_shift,
        )  # fmt: skip


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="FID of a DiT checkpoint's samples against the real training set (Inception-v3, legacy protocol).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and output")
    g.add_argument("--ckpt", required=True, help="training checkpoint (.pt) written by train.py")
    g.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights")
    g.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights instead of the EMA")
    g.add_argument("--num-samples", type=_positive_int, default=50_000, help="generated images (50000 in papers)")
    g.add_argument("--out-json", default=None, help="result file (default: beside the checkpoint, named by settings)")
    g.add_argument("--overwrite", action="store_true", help="replace the result file if it exists")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    g = p.add_argument_group("real statistics")
    g.add_argument("--dataset", default=None, help="real set: cifar10, folder or digits (default: the checkpoint's)")
    g.add_argument("--data-path", default=None, help="dataset root or image folder (default: the checkpoint's)")
    g.add_argument("--split", default="train", choices=("train", "test"), help="real split (CIFAR-10 only)")
    g.add_argument("--real-images", type=_positive_int, default=None, help="real images to use (default: all)")
    g.add_argument("--stats-dir", default=None, help="cache of real statistics (default: ~/.cache/dit/fid_stats)")
    g.add_argument("--inception-weights", default=None, help="local copy of torch-fidelity's Inception weights")
    g.add_argument("--num-workers", type=int, default=0, help="data loader workers for image folders")
    add_sampling_args(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    """Parse command-line flags into an EvalConfig."""
    args = build_parser().parse_args(argv)
    args.guidance_interval = tuple(args.guidance_interval)
    return EvalConfig(**vars(args))


def settings_name(cfg: EvalConfig, dataset: str, data_path: str) -> str:
    """Result file name: the checkpoint's stem, the main settings, and a hash of all that change the number."""
    keys = {k: v for k, v in asdict(cfg).items() if k not in ("out_json", "overwrite", "device", "num_workers",
                                                               "progress", "stats_dir")}  # fmt: skip
    keys.update(dataset=dataset, data_path=str(Path(data_path).expanduser().resolve()))
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:8]
    steps = "" if cfg.method == "dopri5" else str(cfg.steps)
    weights = "ema" if cfg.ema else "raw"
    return (
        f"{Path(cfg.ckpt).stem}.fid{cfg.num_samples}-{cfg.method}{steps}-cfg{cfg.cfg_scale:g}-{weights}-{digest}.json"
    )


def _write_json(path: Path, data: dict[str, Any], overwrite: bool) -> None:
    """Write JSON atomically; refuse to replace an existing file unless overwrite."""
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    from sampler import Sampler  # sampler.py imports utils.cli, which imports sampler lazily: keep it local

    if cfg.num_samples < 2:
        raise FIDError(f"--num-samples must be >= 2; got {cfg.num_samples}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = load_checkpoint(cfg.ckpt)
    run_cfg = state.get("config") or {}
    dataset = cfg.dataset or run_cfg.get("dataset") or DEFAULT_DATASET
    data_path = cfg.data_path or run_cfg.get("data_path") or DEFAULT_DATA_PATH
    out_json = Path(cfg.out_json) if cfg.out_json else Path(cfg.ckpt).parent / settings_name(cfg, dataset, data_path)
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
        "versions": _versions(),
        "config": asdict(cfg),
    }
    _write_json(out_json, result, cfg.overwrite)
    print(
        f"FID {fid:.4f} ({cfg.num_samples} samples vs {info['num_images']} real {dataset} {cfg.split} images, "
        f"{sampler.method} NFE {nfe}, cfg {sampler.cfg_scale:g}, {'EMA' if cfg.ema else 'raw'} weights, "
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
