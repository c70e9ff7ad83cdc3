"""Evaluate a trained DiT as papers do (ADM's suite: FID, sFID, Inception Score, precision, recall), or score any
ADM sample batch; docs/evaluation.md reproduces a paper's table.

    python evaluate.py --ckpt runs/cifar10/checkpoints/last.pt --num-samples 50000 --cfg-scale 1.5 --steps 35
    torchrun --nproc_per_node 8 evaluate.py --ckpt runs/imagenet256-xl2/checkpoints/last.pt --cfg-scale 1.5 \\
        --steps 250 --ref-batch VIRTUAL_imagenet256_labeled.npz --save-npz samples50k.npz
    python evaluate.py --samples samples50k.npz --ref-batch VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from data import DATASETS, build_dataset
from evaluation.adm import METRICS, check_reference, image_shape, read_images, score, write_batch
from evaluation.fid import balanced_labels, real_statistics, reference_statistics
from evaluation.inception import SUITE_FEATURES, InceptionSuite, extract_features, extractor_id, load_inception
from evaluation.metrics import FIDError
from evaluation.shards import draw_shards, open_folder, read_shards
from sampling.options import SamplingOptions, SamplingStopped, sampling_options
from sampling.sampler import Sampler
from sampling.solvers import ADAPTIVE
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, arg, parse, script_exit
from utils.device import resolve_precision
from utils.distributed import DistInfo, all_ok, cleanup, init_distributed
from utils.io import write_json_atomic
from utils.preemption import EXIT_CODES, REASONS, StopRequest

PROTOCOL = "torch-fidelity Inception-v3 (TF 2015 weights), uint8, TF-1 bilinear resize (antialias=False); ADM's metrics"
FEATURE = {"fid": "pool", "sfid": "spatial", "is": "logits", "pr": "pool"}  # what each metric is computed from
NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision", "recall": "recall"}


@dataclass(kw_only=True)
class EvalConfig(SamplingOptions):
    """Everything evaluate.py needs: the sampling options plus the evaluation settings."""

    ckpt: str | None = arg(None, "training checkpoint written by train.py (or --samples)", group="model and output")
    samples: str | None = arg(None, "score this ADM sample batch (arr_0: uint8 NHWC) instead of a checkpoint")
    ema: bool = arg(True, "use the EMA weights (--no-ema: the raw weights)")
    num_samples: int = arg(50_000, "generated images (50000 in papers)", min=2)
    seed: int = arg(0, "seed of the noise (sample i starts from noise i)", min=0)
    out_json: str | None = arg(None, "result file (default: beside the checkpoint, named by the settings)")
    overwrite: bool = arg(False, "replace the result file if it exists")
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    progress: bool = arg(True, "show progress bars")
    metrics: str | None = arg(None, "of fid,sfid,is,pr (default: all with --ref-batch, else fid,is)", group="scores")
    ref_batch: str | None = arg(None, "ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    ref_stats: str | None = arg(None, "FID reference statistics instead of the real set: an npz with mu and sigma")
    dataset: str | None = arg(None, f"real set: {', '.join(DATASETS)} (default: the checkpoint's)", group="real set")
    data_path: str | None = arg(None, "dataset root or image folder (default: the checkpoint's)")
    split: str = arg("train", "real split (CIFAR-10 only)", choices=("train", "test"))
    real_images: int | None = arg(None, "real images to use (default: all)", min=2)
    stats_dir: str | None = arg(None, "cache of real statistics (default: ~/.cache/dit/fid_stats)")
    inception_weights: str | None = arg(None, "local copy of torch-fidelity's Inception weights")
    num_workers: int = arg(0, "data loader workers for image folders", min=0)
    save_npz: str | None = arg(None, "also write the samples here as an ADM batch: arr_0 uint8 NHWC, arr_1 labels")
    vae: str | None = arg(None, "latent models: another copy of the checkpoint's VAE (a folder or hub id)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.ckpt is None) == (self.samples is None):
            raise ConfigError("pass --ckpt (sample and score) or --samples (score a sample batch)")
        if self.samples is not None and (self.ref_batch is None) == (self.ref_stats is None):
            raise ConfigError("--samples needs one reference: --ref-batch or --ref-stats")
        if self.ref_batch is not None and self.ref_stats is not None:
            raise ConfigError("--ref-batch and --ref-stats exclude each other")
        if not self.decode:
            raise ConfigError("--no-decode does not apply: FID scores images (sampler.py --no-decode writes latents)")
        names = self.metrics.split(",") if self.metrics else METRICS if self.ref_batch else ("fid", "is")
        if unknown := [m for m in names if m not in METRICS]:
            raise ConfigError(f"--metrics {','.join(unknown)} unknown; choose from {', '.join(METRICS)}")
        if self.ref_batch is None and (wanted := [m for m in names if m in ("sfid", "pr")]):
            raise ConfigError(f"--metrics {','.join(wanted)} need a reference batch with images: pass --ref-batch")
        self.metrics = ",".join(names)
        if self.save_npz is not None and Path(self.save_npz).suffix != ".npz":
            raise ConfigError(f"--save-npz {self.save_npz} must end in .npz")


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    return parse(EvalConfig, argv, "evaluate.py", __doc__.split("\n\n")[0])


def result_path(cfg: EvalConfig, method: str, precision: str) -> Path:
    """--out-json, or beside the checkpoint (the sample batch), named by the settings that change the numbers."""
    if cfg.out_json:
        return Path(cfg.out_json)
    if cfg.samples:
        samples = Path(cfg.samples)
        return samples.with_name(f"{samples.stem}.vs-{Path(cfg.ref_batch or cfg.ref_stats).stem}.json")
    steps = "" if method in ADAPTIVE else str(cfg.steps)
    weights = "ema" if cfg.ema else "raw"
    name = f"{Path(cfg.ckpt).stem}.fid{cfg.num_samples}-{method}{steps}-cfg{cfg.cfg_scale:g}-{weights}-{precision}"
    return Path(cfg.ckpt).parent / f"{name}-seed{cfg.seed}.json"


def refuse_existing(path: Path, cfg: EvalConfig) -> None:
    if path.exists() and not cfg.overwrite:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it (or choose --out-json)")


def main(
    cfg: EvalConfig,
    *,
    extractor: nn.Module | None = None,
    logits_extractor: nn.Module | None = None,
    spatial_extractor: nn.Module | None = None,
) -> dict[str, Any]:
    """The JSON's contents on the main process ({} on the others); the extractors stand in for Inception's (tests)."""
    t_start, dist = time.perf_counter(), init_distributed(cfg.device)
    given = {"pool": extractor, "logits": logits_extractor, "spatial": spatial_extractor}
    try:
        return evaluate(cfg, dist, given, t_start)
    finally:
        cleanup()


def evaluate(cfg: EvalConfig, dist: DistInfo, given: dict[str, nn.Module | None], t_start: float) -> dict[str, Any]:
    """``main`` inside the process group; bad input fails before the sampling."""
    injected = given["pool"] is not None
    metrics = [m for m in cfg.metrics.split(",") if not injected or given[FEATURE[m]] is not None]
    flag, ref_file = ("--ref-batch", cfg.ref_batch) if cfg.ref_batch else ("--ref-stats", cfg.ref_stats)
    try:
        if cfg.ref_batch:
            dims = {k: getattr(m, "num_features", None) for k, m in given.items()} if injected else SUITE_FEATURES
            reference = check_reference(cfg.ref_batch, metrics, dims)
        else:
            reference = {"fid": reference_statistics(cfg.ref_stats, given["pool"])} if cfg.ref_stats else {}
        flag, count = "--samples", image_shape(cfg.samples)[0] if cfg.samples else cfg.num_samples
    except FIDError as e:
        raise ConfigError(f"{flag} {e}") from None
    out = {"num_samples": count, "metrics": metrics, "protocol": "custom feature extractor" if injected else PROTOCOL}
    out["reference"] = {"kind": "file", "path": str(Path(ref_file).resolve())} if ref_file else {}
    if cfg.samples:
        refuse_existing(out_json := result_path(cfg, "", ""), cfg)
        features, pool = build_features(given, dist.device, cfg.inception_weights)
        scores = score(read_images(cfg.samples), features, metrics, reference, cfg.ref_batch, dist.device, cfg.progress)
        return finish(cfg, out | {"samples": str(Path(cfg.samples).resolve())}, scores, pool, out_json, t_start, "")

    state = load_checkpoint(cfg.ckpt)
    sampler = Sampler.from_checkpoint(state, cfg.ema, dist.device, cfg.vae, **sampling_options(cfg))  # and its VAE
    run, space = state.get("config", {}), state.get("latent_space")
    size, channels = (
        (space["image_size"], space["image_channels"]) if space else (sampler.input_size, sampler.in_channels)
    )
    dataset = cfg.dataset or run.get("dataset", "cifar10")
    data_path = cfg.data_path or run.get("data_path", "./datasets")
    real_set = None
    if "fid" in metrics and not ref_file and dist.is_main:  # the real set now: missing data fails first
        real_set = build_dataset(dataset, data_path, image_size=size, channels=channels, train=cfg.split == "train")
        dataset, data_path, real_set = real_set.fid_images() or (dataset, data_path, real_set)  # latents: their images
    method, precision = sampler.options.method, resolve_precision(cfg.precision, dist.device)
    refuse_existing(out_json := result_path(cfg, method, precision), cfg)
    parts = out_json.with_suffix(".parts")  # the shards, until the JSON is written
    if cfg.save_npz and not parts.is_dir():  # with the shards there, the file is this evaluation's own
        refuse_existing(Path(cfg.save_npz), cfg)
    checkpoint = str(Path(cfg.ckpt).resolve())
    settings = {"checkpoint": checkpoint, "step": state.get("step"), "ema": cfg.ema, "seed": cfg.seed}
    settings |= {**sampling_options(cfg), "method": method, "precision": precision, "num_samples": count}
    open_folder(parts, settings, cfg.overwrite, dist.is_main)
    features, pool = build_features(given, dist.device, cfg.inception_weights) if dist.is_main else (None, None)
    stop, t_sampling = StopRequest(), time.perf_counter()
    try:
        asked = lambda: stop.requested() is not None
        draw_shards(sampler, parts, count, cfg.seed, cfg.batch_size, dist, asked, cfg.progress and dist.is_main)
    except SamplingStopped:
        if dist.is_main:
            print(f"evaluate.py: stopped by {REASONS[stop.signum]}; run the same command to continue", file=sys.stderr)
        return {"stopped_by": stop.signum}
    finally:
        stop.close()
    all_ok(True)  # every process has written its shards; the main one scores them outside the group
    cleanup()
    if not dist.is_main:
        return {}
    t_scoring, info = time.perf_counter(), {"num_images": None}
    if "fid" in metrics and not ref_file:
        kw = {"split": cfg.split, "batch_size": cfg.batch_size, "num_images": cfg.real_images, "info": info}
        kw |= {"cache_dir": cfg.stats_dir, "num_workers": cfg.num_workers, "progress": cfg.progress}
        reference["fid"] = real_statistics(dataset, data_path, size, channels, extractor=pool, dataset=real_set, **kw)
        path = str(Path(data_path).expanduser().resolve())
        out["reference"] = {"kind": "dataset", "dataset": dataset, "data_path": path, "split": cfg.split, **info}
    if cfg.save_npz:
        labels = balanced_labels(count, sampler.num_classes)
        labels = np.full(count, -1) if labels is None else labels.numpy()
        write_batch(cfg.save_npz, (im for im, _ in read_shards(parts, count, cfg.batch_size)), count, labels)
    nfes: list[int] = []
    batches = (nfes.append(nfe) or im for im, nfe in read_shards(parts, count, cfg.batch_size))
    scores = score(batches, features, metrics, reference, cfg.ref_batch, dist.device, cfg.progress)
    out |= {"nfe": round(sum(nfes) / len(nfes)), "checkpoint": checkpoint, "step": state.get("step")}
    out |= {"ema": cfg.ema, "num_classes": sampler.num_classes, "class_balanced": sampler.num_classes > 0}
    out |= {"real_images": info["num_images"], "image_size": size, "channels": channels, "latent_space": space}
    out |= {"samples_npz": cfg.save_npz and str(Path(cfg.save_npz).resolve()), "method": method}
    out |= {"network_precision": precision, "world_size": dist.world_size, "sampling_time_s": t_scoring - t_sampling}
    how = f", {method} NFE {out['nfe']}, cfg {cfg.cfg_scale:g}, {precision}, {'EMA' if cfg.ema else 'raw'} weights"
    result = finish(cfg, out, scores, pool, out_json, t_start, how)
    shutil.rmtree(parts)
    return result


def build_features(given: dict[str, nn.Module | None], device: torch.device, weights: str | None) -> tuple[Any, Any]:
    """The features (uint8 (N, 3, H, W) -> {"pool": (N, D), ...}) and the pool extractor: Inception's or those given."""
    if given["pool"] is None:
        suite = InceptionSuite(load_inception(device, weights))
        return (lambda x: suite(x.to(device))), suite.pool
    return (lambda x: {k: extract_features(m, x) for k, m in given.items() if m is not None}), given["pool"]


def finish(cfg: EvalConfig, out: dict, scores: dict, pool: Any, out_json: Path, t_start: float, how: str) -> dict:
    """Write the JSON (the scores, what was scored, every setting) and print the numbers."""
    result = {name: scores.get(name) for name in (*NAMES, "inception_score_std")} | out
    result |= {"feature_extractor": extractor_id(pool), "wall_time_s": time.perf_counter() - t_start}
    libs = {lib: version(lib) for lib in ("torchmetrics", "numpy", "scipy")}
    result |= {"config": asdict(cfg), "versions": {"torch": torch.__version__, **libs}}
    refuse_existing(out_json, cfg)  # written meanwhile by another run
    write_json_atomic(result, out_json)
    text = ", ".join(f"{label} {result[name]:.4f}" for name, label in NAMES.items() if result[name] is not None)
    print(f"{text} ({result['num_samples']} samples{how}, {result['wall_time_s']:.1f}s) -> {out_json}")
    return result


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point: a known error is one line on stderr (exit 2: bad input, 1: a failed write)."""
    try:
        result = main(parse_args(argv))
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, DataError and FIDError are ValueErrors
        raise script_exit("evaluate.py", e) from None
    if result.get("stopped_by") is not None:
        raise SystemExit(EXIT_CODES[result["stopped_by"]])


if __name__ == "__main__":
    cli(sys.argv[1:])
