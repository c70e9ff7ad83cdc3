"""A training run's settings: the flags (``TrainConfig``), the named presets and recipes, and how they resolve."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data import DATASETS
from models import ModelConfig
from models.config import network_size
from objectives import ObjectiveConfig
from utils.config import arg, fill_unset, settings
from utils.device import PRECISIONS, resolve_precision
from utils.phema import SigmaRels
from utils.runlog import WANDB_MODES

# The digits that ship inside scikit-learn (8x8, 10 classes): a small DiT that trains on a laptop CPU.
DIGITS = dict(
    dataset="digits",
    image_size=8,
    channels=1,
    flip=False,
    model="DiT-XS/2",
    hidden_size=128,
    depth=4,
    num_heads=4,
    steps=3000,
    batch_size=128,
    lr=1e-3,
    warmup=100,
    ema_decay=0.999,
    sample_every=1000,
    ckpt_every=1000,
    log_every=100,
    sample_steps=1,
    fid_every=0,
    num_workers=0,
)
PRESETS: dict[str, dict[str, Any]] = {
    # Recognisable digits within a few minutes on a 2-core laptop CPU (README, "Quick start").
    "digits-quick": DIGITS
    | dict(hidden_size=64, depth=3, steps=2000, sample_every=500, ckpt_every=500, log_every=50, sample_steps=20)
    | dict(out="runs/digits-quick"),
    # One-step generation on the digits (docs/one-step.md): a MeanFlow DiT sampled in 1 NFE.
    "digits-meanflow": DIGITS | dict(objective="meanflow", out="runs/digits-meanflow"),
    # One step at a guidance scale chosen when sampling (docs/one-step.md): an iMF DiT on the digits.
    "digits-imf": DIGITS
    | dict(objective="imf", cfg_scales=(1.0, 2.0, 4.0), out="runs/digits-imf")
    | dict(imf_equal_fraction=0.75, imf_guidance_fraction=0.5, imf_guidance_max=4.0),
    # DiT-XL/2 on ImageNet 256x256 latents (docs/latents.md): the DiT paper's optimisation (AdamW lr 1e-4 constant,
    # no warm-up or weight decay, global batch 256, EMA 0.9999, flips), 400k steps = 80 epochs; 8 GPUs.
    "imagenet256-xl2": dict(
        dataset="latents",
        data_path="latents/imagenet256",
        model="DiT-XL/2",
        batch_size=256,
        lr=1e-4,
        warmup=0,
        ema_decay=0.9999,
        steps=400_000,
        ckpt_every=10_000,
        sample_every=20_000,
        cfg_scales=(1.0, 1.5, 4.0),
        sample_classes=10,
        fid_every=50_000,
        fid_samples=10_000,
        fid_cfg_scale=1.5,
        num_workers=8,
        out="runs/imagenet256-xl2",
    ),
}

# --recipe: values for the flags a run leaves unset (None), resolved into config.json and the checkpoints. dit is
# the DiT paper's block and optimizer; lightning is LightningDiT's (Table 1's last row: AdamW beta2 0.95, cosine
# loss, SwiGLU, RMSNorm, RoPE), measured in docs/recipes.md; JiT's class tokens stay an option (--class-tokens).
RECIPES: dict[str, dict[str, Any]] = {
    "dit": dict(mlp="gelu", norm="layernorm", rope=False, class_tokens=0, adam_beta2=0.999, cosine_loss_weight=0.0),
    "lightning": dict(mlp="swiglu", norm="rmsnorm", rope=True, class_tokens=0, adam_beta2=0.95, cosine_loss_weight=1.0),
}
REPA_SETTINGS = ("repa_weight", "repa_encoder", "repa_depth", "repa_projector_dim", "repa_until")
# Settings that define the weights: a resume takes the checkpoint's values of those it is not given.
WEIGHT_SETTINGS = ("recipe", "hidden_size", "depth", "num_heads", *RECIPES["dit"], *REPA_SETTINGS)


@dataclass(kw_only=True)
class TrainConfig(ModelConfig, ObjectiveConfig):
    """Every setting of a training run; the resolved copy is saved in OUT/config.json and every checkpoint."""

    recipe: str | None = arg(
        None,
        "defaults of the block, loss and optimizer flags left unset: dit (the DiT paper, the default) or lightning "
        "(LightningDiT's changes; docs/recipes.md); a resume keeps the checkpoint's",
        choices=RECIPES,
        group="recipe",
    )
    dataset: str = arg("cifar10", "training set", choices=DATASETS, group="data")
    data_path: str = arg(
        "./datasets",
        "CIFAR-10 download folder, the folder of class sub-folders for 'folder', or "
        "the output folder of extract_latents.py for 'latents'",
    )
    image_size: int | None = arg(
        None,
        "image side in pixels; the patch size must divide it (default 32; for latents "
        "the size of the images they encode, from their index)",
        min=1,
    )
    channels: int | None = arg(
        None, "image channels, 1 gray or 3 RGB (default 3; for latents the images')", choices=(1, 3)
    )
    flip: bool = arg(True, "random horizontal flips")
    num_workers: int = arg(4, "data loader processes (unused with --data-on-device)", min=0)
    data_on_device: bool | None = arg(None, "hold the whole set on the device (default: yes, except for folder)")
    vae: str | None = arg(None, "latents: a copy of the index's VAE (folder or hub id), e.g. when it moved")
    steps: int = arg(200_000, "total optimizer steps", min=1, group="optimisation")
    batch_size: int = arg(128, "global batch size, split over DDP processes", min=1)
    lr: float = arg(1e-4, "AdamW learning rate, constant after warm-up", gt=0)
    warmup: int = arg(1000, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = arg(0.0, "AdamW weight decay", min=0)
    adam_beta2: float | None = arg(
        None, "AdamW beta2 (default: the recipe's: 0.999 for dit, 0.95 for lightning)", gt=0, lt=1
    )
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: no clipping)", min=0)
    ema_decay: float = arg(0.9999, "EMA decay (warmed up as min(decay, (1+n)/(10+n)))", min=0, lt=1)
    phema: tuple[float, ...] = arg(
        (),
        "also track power-function EMAs of these lengths (sigma_rel; --phema alone: EDM2's 0.05 0.10) and write "
        "snapshots to OUT/phema for posthoc_ema.py (docs/posthoc-ema.md)",
        nargs="*",
        action=SigmaRels,
    )
    phema_every: int = arg(5000, "steps between --phema snapshots (and one at the last step)", min=1)
    repa_weight: float | None = arg(
        None,
        "weight of REPA's representation alignment loss (default 0: off; REPA's 0.5; docs/repa.md)",
        min=0,
        group="REPA",
    )
    repa_encoder: str | None = arg(
        None,
        "frozen encoder: a torch.hub DINOv2 name (default dinov2_vitb14), a timm ViT name, or a torch.export .pt2 file "
        "mapping images (B, C, H, W) in [0, 1] to tokens (B, N, D) or vectors (B, D)",
    )
    repa_depth: int | None = arg(
        None, "align the tokens after this block (default: depth / 3 rounded up, at most 8)", min=1
    )
    repa_projector_dim: int | None = arg(
        None, "hidden width of the projector MLP (default: REPA's 2048, at most hidden size x depth / 2)", min=1
    )
    repa_until: int | None = arg(None, "stop aligning at this step (HASTE; default: never)", min=1)
    nan_patience: int = arg(5, "stop after this many non-finite losses in a row", min=1)
    cfg_scales: tuple[float, ...] = arg(
        (1.0, 2.5, 5.0), "guidance scales of the periodic EMA samples", group="samples and FID"
    )
    sample_every: int = arg(5000, "steps between EMA samples (0: never)", min=0)
    samples_per_class: int = arg(8, "samples per class (one row per class)", min=1)
    sample_classes: int = arg(
        10,
        "classes in the sample grids, spread evenly over all classes and the same at every "
        "step: class i * num_classes // N (0: every class)",
        min=0,
    )
    sample_steps: int = arg(
        50, "steps of the periodic samples and of FID, with the objective's solver (heun for flow)", min=1
    )
    fid_every: int = arg(20_000, "steps between FID evaluations of the EMA model (0: never)", min=0)
    fid_samples: int = arg(10_000, "generated images per FID evaluation (report this n)", min=2)
    fid_cfg_scale: float = arg(1.0, "guidance scale of the FID samples")
    fid_ref_stats: str | None = arg(
        None,
        "FID reference statistics: an npz with mu and sigma, e.g. ADM's "
        "VIRTUAL_imagenet256_labeled.npz (default: computed from the training images)",
    )
    ckpt_every: int = arg(10_000, "steps between checkpoints (0: only at the end)", min=0, group="run")
    keep_checkpoints: int = arg(3, "keep this many newest numbered checkpoints besides last.pt (0: all)", min=0)
    log_every: int = arg(100, "steps between loss read-backs and logs", min=1)
    out: str | None = arg(None, "run folder (default runs/<dataset>)")
    seed: int = arg(0, "global seed (process r uses seed + r)")
    resume: str = arg(
        "no",
        "no: a fresh run; yes (--resume alone): continue from OUT/checkpoints/last.pt; auto: "
        "continue when it exists, else start fresh; PATH: continue from that checkpoint, into OUT "
        "(which must hold no run when PATH lies outside it)",
        nargs="?",
        const="yes",
        metavar="no|yes|auto|PATH",
    )
    time_limit: float | None = arg(None, "minutes this job may run: checkpoint and stop (exit 124) before then", gt=0)
    wandb: str = arg(
        os.environ.get("WANDB_MODE") if os.environ.get("WANDB_MODE") in WANDB_MODES else "online",
        "online (falls back to offline without credentials), offline, disabled; default $WANDB_MODE or online",
        choices=WANDB_MODES,
    )
    wandb_project: str = arg("dit-flow-matching", "wandb project name")
    compile: bool | None = arg(
        None, "torch.compile the model (default: on CUDA, off on CPU, where compiling takes minutes)"
    )
    precision: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS)
    device: str = arg("auto", "auto: cuda:LOCAL_RANK when available", choices=("auto", "cpu", "cuda"))
    dist_timeout: float = arg(30.0, "DDP: minutes a process may wait for the others in a collective", gt=0)


def resolve(cfg: TrainConfig, device: torch.device, old: dict[str, Any] | None = None) -> TrainConfig:
    """The settings a run trains with: the unset ones that define the weights from ``old`` (the run config of the
    checkpoint a run resumes), then from the recipe; what depends on the machine (precision, data placement,
    compilation); the output folder; every setting of the objective (so config.json records them all)."""
    if old is not None:  # a resume: what the user did not give is the checkpoint's (the recipe's cosine loss too)
        kept = {k: old[k] for k in WEIGHT_SETTINGS if k in old}
        cfg = fill_unset(cfg, kept | {k: v for k, v in old.get("objective_args", {}).items() if k in WEIGHT_SETTINGS})
    cfg = fill_unset(dataclasses.replace(cfg, recipe=cfg.recipe or "dit"), RECIPES[cfg.recipe or "dit"])
    cfg = dataclasses.replace(cfg, repa_weight=cfg.repa_weight or 0.0)
    if cfg.repa_weight:
        cfg = fill_unset(cfg, repa_defaults(cfg))
    size, channels = cfg.image_size, cfg.channels
    if size is None or channels is None:  # the data's own (latents: the images they encode), else 32 px RGB
        native = DATASETS[cfg.dataset].native_size(Path(cfg.data_path)) or (32, 3)
        size, channels = size or native[0], channels or native[1]
    # Sets that sit in memory anyway are indexed directly; image folders, and the clean images REPA needs beside
    # latents, are read by loader workers.
    on_device = DATASETS[cfg.dataset].in_memory and not (cfg.repa_weight and cfg.dataset == "latents")
    return dataclasses.replace(
        cfg,
        out=str(run_folder(cfg)),
        precision=resolve_precision(cfg.precision, device),
        image_size=size,
        channels=channels,
        objective_args=settings(cfg.build_objective()),
        device=device.type,
        data_on_device=on_device if cfg.data_on_device is None else cfg.data_on_device,
        compile=device.type == "cuda" if cfg.compile is None else cfg.compile,  # compiling on a CPU takes minutes
    )


def repa_defaults(cfg: ModelConfig) -> dict[str, Any]:
    """REPA's settings (DINOv2-B, a 2048-wide projector, block 8 of SiT-XL/2's 28 and of SiT-L/2's 24, block 4 of
    SiT-B/2's 12), scaled down to smaller DiTs."""
    hidden, depth, _ = network_size(cfg)
    projector = min(2048, hidden * depth // 2)
    return dict(repa_encoder="dinov2_vitb14", repa_depth=min(8, math.ceil(depth / 3)), repa_projector_dim=projector)


def run_folder(cfg: TrainConfig) -> Path:
    """OUT: --out, else runs/DATASET."""
    return Path(cfg.out or f"runs/{cfg.dataset}")
