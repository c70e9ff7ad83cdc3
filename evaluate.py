"""FID of a trained DiT checkpoint against its real training set (the standard, comparable number).

    python evaluate.py --ckpt runs/cifar10/checkpoints/last.pt --num-samples 50000 --cfg-scale 1.5 --steps 35
    python evaluate.py --ckpt runs/imagenet256/checkpoints/last.pt --num-samples 50000 --cfg-scale 1.5 --steps 250 \
        --ref-stats VIRTUAL_imagenet256_labeled.npz --save-npz samples50k.npz      # ImageNet 256, ADM's protocol

Samples ``--num-samples`` images with class-balanced labels from the EMA weights (``--no-ema`` for the raw
ones), computes their Inception features and compares them with the cached statistics of the un-augmented
real set (``evaluation/fid.py`` has the protocol), or with ``--ref-stats`` against given statistics (ADM's reference
batch). The dataset and its path default to those stored in the checkpoint, and the method to its objective's
(``--method`` unset). A latent DiT's samples are decoded by its VAE and quantised to uint8 like any image; its real
set is the image folder its latents were extracted from, centre-cropped the same way. The Inception Score
(torch-fidelity's, 10 splits) is computed from the same images; ``--save-npz`` writes them in the ADM format
(``arr_0`` uint8 NHWC, ``arr_1`` labels), so ADM's evaluator can score exactly these images. Prints the FID and writes a JSON with every
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

import numpy as np
import torch
import torch.nn as nn

from data import DATASETS, build_dataset
from evaluation.fid import (
    compute_fid,
    extract_features,
    extractor_id,
    inception_score,
    load_inception,
    load_inception_logits,
    real_statistics,
    reference_statistics,
)
from evaluation.images import to_uint8
from models import model_from_checkpoint
from sampling.sampler import Sampler, SamplingOptions, checkpoint_decoder, checkpoint_sample_method, sampling_options
from sampling.solvers import ADAPTIVE
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, arg, parse
from utils.device import resolve_device, resolve_precision
from utils.io import atomic_write, write_json_atomic

PROTOCOL = (
    "torchmetrics FrechetInceptionDistance Inception-v3 (torch-fidelity weights), pool 2048, uint8, antialias=False"
)


@dataclass(kw_only=True)
class EvalConfig(SamplingOptions):
    """Everything evaluate.py needs: the sampling options plus the FID settings."""

    ckpt: str = arg(
        None,
        "training checkpoint written by train.py, e.g. runs/cifar10/checkpoints/last.pt",
        group="model and output",
        required=True,
    )
    ema: bool = arg(True, "use the EMA weights (--no-ema: the raw weights)")
    num_samples: int = arg(50_000, "generated images (50000 in papers)", min=2)
    seed: int = arg(0, "seed of the noise (sample i starts from noise i)", min=0)
    out_json: str | None = arg(None, "result file (default: beside the checkpoint, named by the settings)")
    overwrite: bool = arg(False, "replace the result file if it exists")
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    progress: bool = arg(True, "show progress bars")
    dataset: str | None = arg(
        None, f"real set: {', '.join(DATASETS)} (default: the checkpoint's)", group="real statistics"
    )
    data_path: str | None = arg(None, "dataset root or image folder (default: the checkpoint's)")
    split: str = arg("train", "real split (CIFAR-10 only)", choices=("train", "test"))
    real_images: int | None = arg(None, "real images to use (default: all)", min=2)
    stats_dir: str | None = arg(None, "cache of real statistics (default: ~/.cache/dit/fid_stats)")
    inception_weights: str | None = arg(None, "local copy of torch-fidelity's Inception weights")
    num_workers: int = arg(0, "data loader workers for image folders", min=0)
    ref_stats: str | None = arg(
        None,
        "reference statistics instead of the real set: an npz with mu and sigma (ADM's "
        "VIRTUAL_imagenet256_labeled.npz, or a cache file of evaluation/fid.py)",
    )
    inception_score: bool = arg(True, "also compute the Inception Score of the samples", group="outputs")
    save_npz: str | None = arg(
        None, "also write the samples here in ADM's format: arr_0 uint8 (N, H, W, 3), arr_1 labels"
    )
    vae: str | None = arg(None, "latent models: another copy of the checkpoint's VAE (a folder or hub id)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.save_npz is not None and Path(self.save_npz).suffix != ".npz":
            raise ConfigError(f"--save-npz {self.save_npz} must end in .npz")
        if self.save_npz is not None and Path(self.save_npz).exists() and not self.overwrite:
            raise ConfigError(f"{self.save_npz} already exists; pass --overwrite to replace it")


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


def main(
    cfg: EvalConfig, *, extractor: nn.Module | None = None, logits_extractor: nn.Module | None = None
) -> dict[str, Any]:
    """Compute the FID described by cfg, print it and write the JSON; returns the JSON's contents.

    ``extractor`` replaces Inception-v3 (any module mapping uint8 (N, 3, H, W) to (N, D)) and ``logits_extractor``
    its class logits for the Inception Score (without it, an injected extractor means no Inception Score); tests
    use them.
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
    space = state.get("latent_space")
    decoder = checkpoint_decoder(state, device, cfg.vae)  # before the sampling: a missing VAE fails here
    sampler = Sampler(model, decoder, latent=bool(space), **{**sampling_options(cfg), "method": method, "decode": True})
    size, channels = (space["image_size"], space["image_channels"]) if space else (model.input_size, model.in_channels)
    real_set = None
    if cfg.ref_stats is None:  # the real set first: missing data fails before Inception is loaded (or downloaded)
        real_set = build_dataset(dataset, data_path, image_size=size, channels=channels, train=cfg.split == "train")
        if (ref := real_set.fid_images()) is not None:  # latents: the images they encode
            dataset, data_path, real_set = ref
    protocol = "custom feature extractor" if extractor is not None else PROTOCOL
    injected = extractor is not None
    extractor = extractor or load_inception(device, cfg.inception_weights)
    if cfg.inception_score and logits_extractor is None and not injected:
        logits_extractor = load_inception_logits(device, cfg.inception_weights)

    t_real, info = time.perf_counter(), {}
    if cfg.ref_stats is not None:
        mu, sigma, what = reference_statistics(cfg.ref_stats, extractor)
        real = (mu, sigma)
        info.update(num_images=None, cache_path=None, cache_hit=None, extractor=extractor_id(extractor))
        reference = {"kind": "file", "path": str(Path(cfg.ref_stats).expanduser().resolve()), "about": what}
    else:
        real = real_statistics(
            dataset,
            data_path,
            size,
            channels,
            extractor=extractor,
            split=cfg.split,
            batch_size=cfg.batch_size,
            num_images=cfg.real_images,
            cache_dir=cfg.stats_dir,
            num_workers=cfg.num_workers,
            progress=cfg.progress,
            info=info,
            dataset=real_set,
        )
        reference = {
            "kind": "dataset",
            "dataset": dataset,
            "data_path": str(Path(data_path).expanduser().resolve()),
            "split": cfg.split,
            "images": info["num_images"],
        }
    kept: dict[str, list] = {"images": [], "labels": [], "logits": []}

    def keep(images: torch.Tensor, labels: torch.Tensor | None) -> None:
        if cfg.save_npz is not None:
            kept["images"].append(to_uint8(images))
            kept["labels"].append(np.full(len(images), -1) if labels is None else labels.cpu().numpy())
        if logits_extractor is not None and cfg.inception_score:
            kept["logits"].append(extract_features(logits_extractor, images).double().cpu())

    t_gen = time.perf_counter()
    fid, nfe = compute_fid(
        sampler, real, cfg.num_samples, extractor=extractor, seed=cfg.seed, progress=cfg.progress, on_batch=keep
    )
    t_end = time.perf_counter()
    score = inception_score(torch.cat(kept["logits"])) if kept["logits"] else None
    if cfg.save_npz is not None:
        arrays = {"arr_0": np.concatenate(kept["images"]), "arr_1": np.concatenate(kept["labels"]).astype(np.int64)}
        if arrays["arr_0"].shape[-1] == 1:  # ADM's evaluator reads RGB
            arrays["arr_0"] = np.repeat(arrays["arr_0"], 3, axis=-1)
        atomic_write(cfg.save_npz, lambda f: np.savez(f, **arrays))
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
        "image_size": size,
        "channels": channels,
        "real_images": info["num_images"],
        "real_stats_cache": info["cache_path"],
        "real_stats_cache_hit": info["cache_hit"],
        "feature_extractor": info["extractor"],
        "reference": reference,
        "inception_score": None if score is None else score[0],
        "inception_score_std": None if score is None else score[1],
        "latent_space": space,
        "samples_npz": None if cfg.save_npz is None else str(Path(cfg.save_npz).resolve()),
        "feature_dim": int(real[0].shape[0]),
        "protocol": protocol,
        "method": method,
        "device": str(device),
        "precision": precision,
        "config": asdict(cfg),
        "versions": {"torch": torch.__version__, **{lib: version(lib) for lib in ("torchmetrics", "numpy", "scipy")}},
    }
    if out_json.exists() and not cfg.overwrite:  # written meanwhile by another run
        raise ConfigError(f"{out_json} already exists; pass --overwrite to replace it (or choose --out-json)")
    write_json_atomic(result, out_json)
    against = (
        f"{info['num_images']} real {dataset} {cfg.split} images"
        if cfg.ref_stats is None
        else f"the statistics of {cfg.ref_stats}"
    )
    is_text = "" if score is None else f", IS {score[0]:.2f} ± {score[1]:.2f}"
    print(
        f"FID {fid:.4f}{is_text} ({cfg.num_samples} samples vs {against}, "
        f"{method} NFE {nfe}, cfg {cfg.cfg_scale:g}, {precision}, {'EMA' if cfg.ema else 'raw'} weights, "
        f"{t_end - t_start:.1f}s) -> {out_json}"
    )
    return result


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point: known errors become one line on stderr and a non-zero exit."""
    try:
        main(parse_args(argv))
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, DataError and FIDError are ValueErrors
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])
