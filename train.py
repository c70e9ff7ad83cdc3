"""Train a class-conditional DiT with flow matching: logit-normal t, EMA, wandb, GIFs, exact resume, DDP.

    python train.py                                       # DiT-S/2 on CIFAR-10, the reference run
    python train.py --preset digits-quick                 # CPU quick start on the embedded 8x8 digits
    python train.py --out runs/cifar10 --resume           # continue from runs/cifar10/checkpoints/last.pt
    torchrun --nproc_per_node 8 train.py --batch-size 1024   # DDP; --batch-size is the global batch

The objectives live in objectives/ (``--objective``, each with its own flags); the time convention (t = 0 noise,
t = 1 data, target x1 - x0) in objectives/flow.py. One training step is ``utils.optim.TrainStep``.
OUT holds config.json, metrics.jsonl, samples/ (PNG grids and GIFs), checkpoints/ (last.pt and the
--keep-checkpoints newest numbered files; utils/checkpoint.py lists what they hold) and wandb/. A resumed run
keeps config.json as the first run wrote it and records its own settings in config-resume-STEP.json.

Exact resume: every random draw of training comes from torch's, numpy's and python's global generators plus
the data stream's position, all stored in every checkpoint; samples and FID never move them (evaluation/monitor.py).
SIGTERM, SIGINT and SIGUSR1 stop the run after the step in progress with a checkpoint, as does --time-limit
(utils/preemption.py), and abandon sample grids and FID between chunks (evaluation/monitor.py); the exit code
tells why: 0 done, 1 failed, 2 bad input, 130 SIGINT, 143 SIGTERM, 138 SIGUSR1, 124 time limit. ``--resume auto``
continues a run when it has a checkpoint, for requeued jobs; ``--resume PATH`` continues from any checkpoint. One run
per folder: OUT/.lock is held for the life of the run, and a fresh run refuses a folder that holds a run's files
(utils/runfolder.py).

No host sync per step: the loss, gradient norm and skip counters stay on the device and are read back at
--log-every steps and checkpoints (utils/optim.py), where --nan-patience non-finite steps in a row stop the
run without writing a checkpoint. DDP: rank 0 alone writes the run folder, logs and draws the sample grids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data import DATASETS, BatchStream, DataError, build_dataset
from evaluation.monitor import Monitor
from models import ModelConfig, build_model
from models.vae import LatentCodec, LatentSpace, VAEError
from objectives import OBJECTIVES, ObjectiveConfig
from utils.checkpoint import (
    CheckpointError,
    changed_settings,
    check_resume,
    restore_training_state,
    save_training_checkpoint,
    training_state,
)
from utils.config import ConfigError, arg, fill_unset, parse, settings
from utils.device import PRECISIONS, allow_tf32, compile_or_eager, resolve_precision
from utils.distributed import (
    DistInfo,
    PeerError,
    all_gather_object,
    all_ok,
    cleanup,
    first_then_others,
    init_distributed,
)
from utils.ema import EMA
from utils.io import write_json_atomic
from utils.optim import StepStats, TrainStep, build_adamw, learning_rate
from utils.phema import PowerEMA, SigmaRels
from utils.preemption import EXIT_CODES, REASONS, SetupInterrupted, StopRequest, signals_end_setup
from utils.rng import rng_state, seed_everything, set_rng_state, training_seed
from utils.runfolder import LAST_CHECKPOINT, hold_run_folder, outside, resume_state
from utils.runlog import WANDB_MODES, RunLogger

PRESETS: dict[str, dict[str, Any]] = {
    # Recognisable digits within a few minutes on a 2-core laptop CPU (see README).
    "digits-quick": dict(
        dataset="digits",
        image_size=8,
        channels=1,
        flip=False,
        model="DiT-XS/2",
        hidden_size=64,
        depth=3,
        num_heads=4,
        steps=2000,
        batch_size=128,
        lr=1e-3,
        warmup=100,
        ema_decay=0.999,
        sample_every=500,
        ckpt_every=500,
        log_every=50,
        sample_steps=20,
        fid_every=0,
        num_workers=0,
        out="runs/digits-quick",
    ),
    # One-step generation on the digits (README, "One-step generation"): a MeanFlow DiT sampled in 1 NFE.
    "digits-meanflow": dict(
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
        objective="meanflow",
        sample_every=1000,
        ckpt_every=1000,
        log_every=100,
        sample_steps=1,
        fid_every=0,
        num_workers=0,
        out="runs/digits-meanflow",
    ),
    # One step at a guidance scale chosen when sampling (README, "One-step generation"): an iMF DiT on the digits.
    "digits-imf": dict(
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
        objective="imf",
        imf_equal_fraction=0.75,
        imf_guidance_fraction=0.5,
        imf_guidance_max=4.0,
        cfg_scales=(1.0, 2.0, 4.0),
        sample_every=1000,
        ckpt_every=1000,
        log_every=100,
        sample_steps=1,
        fid_every=0,
        num_workers=0,
        out="runs/digits-imf",
    ),
    # DiT-XL/2 on ImageNet 256x256 latents (README, "ImageNet 256x256"): the DiT paper's optimisation (AdamW lr 1e-4
    # constant, no warm-up or weight decay, global batch 256, EMA 0.9999, flips), 400k steps = 80 epochs; 8 GPUs.
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

# --recipe: values for the flags it names that a run leaves unset (None), resolved into config.json and the
# checkpoints. dit is the DiT paper's block and optimizer; lightning is LightningDiT's (Table 1's last row: AdamW
# beta2 0.95, cosine loss, SwiGLU, RMSNorm, RoPE), the best measured within 1.15x DiT's time per step (README,
# "Faster convergence"); JiT's in-context class tokens stay an option (--class-tokens). The cosine weight applies to
# objectives that have it (flow matching).
RECIPES: dict[str, dict[str, Any]] = {
    "dit": dict(mlp="gelu", norm="layernorm", rope=False, class_tokens=0, adam_beta2=0.999, cosine_loss_weight=0.0),
    "lightning": dict(mlp="swiglu", norm="rmsnorm", rope=True, class_tokens=0, adam_beta2=0.95, cosine_loss_weight=1.0),
}


@dataclass(kw_only=True)
class TrainConfig(ModelConfig, ObjectiveConfig):
    """Every setting of a training run; the resolved copy is saved in OUT/config.json and every checkpoint."""

    recipe: str = arg(
        "dit",
        "defaults of the block, loss and optimizer flags left unset: dit (the DiT paper) or "
        'lightning (LightningDiT\'s changes; README, "Faster convergence")',
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


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class Run:
    """The objects of a run, built by ``setup``."""

    cfg: TrainConfig
    dist: DistInfo
    model: torch.nn.Module  # the plain network, whose weights are saved
    net: torch.nn.Module  # what the loss calls: the model, maybe inside DDP and torch.compile
    ema: EMA
    phema: PowerEMA | None  # --phema's profiles
    opt: torch.optim.Optimizer
    stream: BatchStream
    step_fn: TrainStep
    logger: RunLogger
    monitor: Monitor
    step: int
    skipped_before: int  # skipped steps of the runs before a resume
    started: float  # time.monotonic() when main() began: --time-limit counts from there
    latent_space: dict[str, Any] | None  # latent data: what decodes samples (checkpoints record it); None: pixels


def main(cfg: TrainConfig, fid_extractor: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train as cfg says. Returns the final step, the logged (step, loss) pairs, skipped steps, OUT, the models and
    the reason it stopped early (None when it reached --steps). fid_extractor replaces Inception (tests)."""
    started = time.monotonic()
    try:
        with signals_end_setup():
            dist = init_distributed(cfg.device, cfg.dist_timeout)
    except ValueError as e:  # e.g. --device cuda on a machine without one
        raise ConfigError(str(e)) from None
    try:
        cfg = resolve(cfg, dist.device)
        with hold_run_folder(Path(cfg.out), dist.is_main):  # one run per folder (utils/runfolder.py)
            with signals_end_setup():
                run = setup(cfg, dist, fid_extractor, started)
            return train(run)
    finally:
        cleanup()


def resolve(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill in the recipe's values of the flags left unset, what depends on the machine (precision, data placement,
    compilation), the output folder and every setting of the objective (its defaults too, so that config.json and
    the checkpoints record them all)."""
    cfg = fill_unset(cfg, RECIPES[cfg.recipe])
    size, channels = cfg.image_size, cfg.channels
    if size is None or channels is None:  # the data's own (latents: the images they encode), else 32 px RGB
        native = DATASETS[cfg.dataset].native_size(Path(cfg.data_path)) or (32, 3)
        size, channels = size or native[0], channels or native[1]
    return dataclasses.replace(
        cfg,
        out=cfg.out or f"runs/{cfg.dataset}",
        precision=resolve_precision(cfg.precision, device),
        image_size=size,
        channels=channels,
        objective_args=settings(cfg.build_objective()),
        device=device.type,
        # sets that sit in memory anyway are indexed directly; image folders go through loader workers.
        data_on_device=DATASETS[cfg.dataset].in_memory if cfg.data_on_device is None else cfg.data_on_device,
        compile=device.type == "cuda" if cfg.compile is None else cfg.compile,  # compiling on a CPU takes minutes
    )


def setup(cfg: TrainConfig, dist: DistInfo, fid_extractor: torch.nn.Module | None, started: float) -> Run:
    """Everything before the first step. What can fail on bad input fails before anything is written."""
    out, device = Path(cfg.out), dist.device
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by {dist.world_size} processes")
    state, state_path = resume_state(out, cfg.resume)
    foreign = state_path is not None and outside(state_path, out)  # a fork of another folder's run
    with first_then_others(dist.is_main):  # only one process downloads
        dataset = build_dataset(cfg.dataset, cfg.data_path, cfg.image_size, cfg.channels, train=True)
    shape, latent_space = dataset.sample_shape, dataset.latent_space()  # latents: (C, h, w) of the VAE's
    if latent_space is None and shape != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ConfigError(f"--channels {cfg.channels} --image-size {cfg.image_size} do not match the data {shape}")
    objective = cfg.build_objective()
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    try:
        model = build_model(cfg, shape[-1], shape[0], dataset.num_classes, **objective.network_options())
        model.to(device)
    except ValueError as e:
        at = f"--image-size {cfg.image_size}" if latent_space is None else f"latents {'x'.join(map(str, shape))}"
        raise ConfigError(f"--model {cfg.model} at {at}: {e}") from None
    if state is not None:
        state["config"] = upgraded_run_config(state["config"])
        check_resume(state, dataclasses.asdict(cfg), model.config, latent_space)
        if dist.is_main:  # they apply from here on, so say which (config-resume-STEP.json records them all)
            changed = [
                f"{flag} {a} -> {b}" for _, flag, a, b in changed_settings(state["config"], dataclasses.asdict(cfg))
            ]
            print(f"resume: step {state['step']} of {state_path}; settings changed: {', '.join(changed) or 'none'}")

    decoder = None
    if latent_space is not None and (cfg.sample_every or cfg.fid_every):  # the diagnostics decode their samples
        try:
            with first_then_others(dist.local_rank == 0):  # one process per node downloads the VAE
                decoder = LatentCodec.from_space(LatentSpace.from_dict(latent_space), device)
        except VAEError as e:
            raise ConfigError(
                f"{e} (sample grids and FID decode through it; --sample-every 0 --fid-every 0 train without it)"
            ) from None
    allow_tf32(device)
    ema = EMA(model, cfg.ema_decay)
    meta = dict(model_config=model.config, config=dataclasses.asdict(cfg), latent_space=latent_space)
    phema = PowerEMA(model, cfg.phema, meta | {"sample_method": objective.sample_method}) if cfg.phema else None
    opt = build_adamw(model.parameters(), cfg.lr, cfg.weight_decay, betas=(0.9, cfg.adam_beta2))
    stream = BatchStream(
        dataset,
        cfg.batch_size // dist.world_size,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        device=device,
        flip=cfg.flip,
        on_device=cfg.data_on_device,
        num_workers=cfg.num_workers,
    )
    resumed = None
    if state is not None:
        resumed = restore_training_state(
            state,
            model=model,
            ema=ema,
            phema=phema,
            optimizer=opt,
            stream=stream,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    net = model
    if dist.distributed:  # LOCAL_RANK's GPU (utils/device.py)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = compile_or_eager(net, stream.batch_size, cfg.precision, verbose=dist.is_main)

    step = resumed.step if resumed else 0
    error = None
    if dist.is_main:  # the run folder: rank 0 alone writes
        try:  # a resume keeps the first run's config.json and records its own settings beside it
            name = f"config-resume-{step:07d}.json" if state and not foreign else "config.json"
            write_json_atomic(dataclasses.asdict(cfg), out / name)
        except OSError as e:  # e.g. --out under a file; the others must not wait for rank 0 in a collective
            error = e
    if not all_ok(error is None):
        raise error or PeerError("rank 0 could not write the run folder")
    if phema and dist.is_main:
        print(phema.plan(cfg.steps, cfg.phema_every, out / "phema"))
    logger = RunLogger(
        out,
        cfg.wandb,
        cfg.wandb_project,
        name=out.name,
        config=dataclasses.asdict(cfg),
        run_id=resumed.wandb_id if resumed and not foreign else None,  # a fork: its own wandb run
        enabled=dist.is_main,
        start_step=step,
    )
    # Randomness is set last, so nothing above (model init, compile) shifts it between fresh and resumed runs.
    seed = training_seed(cfg.seed, dist.rank, step)
    if resumed and resumed.rng is not None:
        set_rng_state(resumed.rng, device, cuda_seed=seed)
    else:
        if resumed and dist.is_main:
            print(f"resume: {state['world_size']} processes before, {dist.world_size} now: new epoch, reseeded")
        seed_everything(seed)
    if resumed and dist.is_main and stream.resized_since(state["data_state"]):  # e.g. a damaged image removed
        print(
            f"resume: the data set has {state['data_state']['num_samples']} images before, {stream.num_samples} "
            f"now: its order changes, so the run goes on from a new epoch (epoch {stream.epoch})"
        )
    step_fn = TrainStep(net, objective, opt, ema, StepStats(device), cfg.precision, cfg.grad_clip)
    monitor = Monitor(cfg, out, logger, dist, objective.sample_method, fid_extractor, decoder, dataset)
    return Run(
        cfg,
        dist,
        model,
        net,
        ema,
        phema,
        opt,
        stream,
        step_fn,
        logger,
        monitor,
        step,
        resumed.skipped_steps if resumed else 0,
        started,
        latent_space,
    )


def upgraded_run_config(old: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's run config in today's terms: versions before objectives owned their flags kept them at the
    top level, so they are gathered into objective_args (then compared, and reported when they change)."""
    if "objective_args" in old or old.get("objective", "flow") not in OBJECTIVES:
        return old
    names = {f.name for f in dataclasses.fields(OBJECTIVES[old.get("objective", "flow")])}
    return {k: v for k, v in old.items() if k not in names} | {"objective_args": {k: old[k] for k in names if k in old}}


def last_checkpoint(cfg: TrainConfig) -> Path:
    """OUT/checkpoints/last.pt: what --resume continues from."""
    return Path(cfg.out) / LAST_CHECKPOINT


def train(run: Run) -> dict[str, Any]:
    """The training loop: a step, then logs, checkpoints and diagnostics when due; stops early on a signal."""
    cfg, model, step = run.cfg, run.model, run.step
    stats, history, stop = run.step_fn.stats, [], StopRequest(cfg.time_limit, run.started)
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not run.dist.is_main,
        dynamic_ncols=True,
        desc="train",
        mininterval=0.5 if sys.stderr.isatty() else 60,
    )  # a redirected log gets a line a minute
    clock, reason = Clock(step), None
    if step >= cfg.steps and run.dist.is_main:
        print(f"already at step {step} of {cfg.steps}; nothing to do (raise --steps to train on)")
    model.train()
    try:
        while step < cfg.steps and reason is None:
            started = time.perf_counter()
            x, y = next(run.stream)
            lr = learning_rate(step, cfg.lr, cfg.warmup)
            run.step_fn(x, y, lr)
            step += 1
            if run.phema:
                run.phema.update(step)
            bar.update()
            reason = stop.check()
            last = step == cfg.steps
            save = last or reason is not None or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
            if step % cfg.log_every == 0 or save:
                history += log(run, step, stats, lr, clock, bar)
            with clock.paused():  # checkpoints and diagnostics do not count against throughput
                if save:
                    checkpoint(run, step, stats)
                if run.phema and run.dist.is_main and (step % cfg.phema_every == 0 or last):
                    run.phema.save_snapshot(Path(cfg.out) / "phema", step)
                stop.time_taken(time.perf_counter() - started)  # a step and its checkpoint: what the budget keeps
                if reason is None:
                    run.monitor(step, model, run.ema.model, last, stop)  # abandoned on a stop request
    except DataError as e:  # a damaged image met mid-run: keep what was learned before it
        raise save_before_data_error(run, step, clock, bar, e) from None
    finally:  # also when stopped by non-finite losses: flush wandb's files
        stop.close()
        bar.close()
        run.logger.finish()
    last_ckpt = last_checkpoint(cfg)
    if reason is not None and run.dist.is_main:
        print(
            f"train.py: stopped by {REASONS[reason]} after step {step}; checkpoint {last_ckpt}; continue with the "
            "same command and --resume (or --resume auto)",
            file=sys.stderr,
            flush=True,
        )
    return {
        "step": step,
        "losses": history,
        "skipped_steps": run.skipped_before + int(stats.skipped.item()),
        "out": Path(cfg.out),
        "model": model,
        "ema": run.ema.model,
        "checkpoint": last_ckpt,
        "stopped_by": reason,
    }


def save_before_data_error(run: Run, step: int, clock: Clock, bar: tqdm, e: DataError) -> DataError:
    """The DataError of a file met mid-run, after a log and a checkpoint of the last finished step (unless it has
    them already), so that the user can remove the file and resume; the same stream up to there, so it is exact.

    Single-process only: under DDP the other processes wait in the step's collectives, so none can be written."""
    cfg, stats = run.cfg, run.step_fn.stats
    if run.dist.distributed:
        if not run.dist.is_main:  # only this process met the file: say so here, rank 0 never hears of it
            print(f"train.py: error (rank {run.dist.rank}): {e}", file=sys.stderr, flush=True)
        return e
    if step == run.step:  # nothing learned since the start or the checkpoint resumed from
        return e
    if not (cfg.ckpt_every and step % cfg.ckpt_every == 0):  # the loop wrote none at this step
        if step % cfg.log_every:
            log(run, step, stats, learning_rate(step - 1, cfg.lr, cfg.warmup), clock, bar)
        checkpoint(run, step, stats)
    return DataError(
        f"{e}; checkpoint of step {step}: {last_checkpoint(cfg)}. Remove or replace the file, then "
        "continue with the same command and --resume"
    )


def log(run: Run, step: int, stats: StepStats, lr: float, clock: Clock, bar: tqdm) -> list[tuple[int, float]]:
    """Read the statistics back (one host sync), stop on too many non-finite losses, log; the (step, loss) kept."""
    s = stats.read()
    if s["worst_streak"] >= run.cfg.nan_patience:
        last = last_checkpoint(run.cfg)
        raise NonFiniteLossError(
            f"{int(s['worst_streak'])} non-finite losses in a row by step {step}; stopped "
            f"without saving. Last good checkpoint: {last if last.exists() else 'none'}"
        )
    steps_per_s = clock.rate(step)
    img_per_s = steps_per_s * run.cfg.batch_size
    metrics = {
        "train/loss": s["loss"],
        "train/grad_norm": s["grad_norm"],
        "train/lr": lr,
        "train/steps_per_s": steps_per_s,
        "train/img_per_s": img_per_s,
        "train/skipped_steps": run.skipped_before + s["skipped"],
        "train/epoch": run.stream.epoch,
    }
    metrics.update({f"loss_by_t/t{i}": v for i, v in enumerate(s["loss_by_t"])})
    if run.dist.device.type == "cuda":
        metrics["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated(run.dist.device) / 2**30
    run.logger.log(metrics, step)
    bar.set_postfix(loss=f"{s['loss']:.4f}", steps_s=f"{steps_per_s:.2f}", img_s=f"{img_per_s:.0f}")
    return [(step, s["loss"])] if s["good_steps"] else []


def checkpoint(run: Run, step: int, stats: StepStats) -> None:
    """Write the training state (rank 0; every process sends its generator states)."""
    rng = all_gather_object(rng_state(run.dist.device))  # a collective: every process takes part
    if run.dist.is_main:
        state = training_state(
            model=run.model,
            ema=run.ema,
            phema=run.phema,
            optimizer=run.opt,
            stream=run.stream,
            step=step,
            skipped_steps=run.skipped_before + int(stats.skipped.item()),
            config=dataclasses.asdict(run.cfg),
            rng=rng,
            world_size=run.dist.world_size,
            wandb_id=run.logger.run_id,
            latent_space=run.latent_space,
        )
        save_training_checkpoint(state, last_checkpoint(run.cfg).parent, run.cfg.keep_checkpoints)


class Clock:
    """Training steps per second between two reads, leaving out the time spent in ``paused`` blocks."""

    def __init__(self, step: int):
        self.step, self.time = step, time.perf_counter()

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.time += time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig; a --preset sets defaults that explicit flags override."""
    return parse(TrainConfig, argv, "train.py", __doc__.split("\n\n")[0], PRESETS)


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: bad input and stopped runs end with one line on stderr and the exit codes above."""
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        result = main(parse_args(argv))
    except (ConfigError, DataError, CheckpointError) as e:
        if rank0:
            print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        if rank0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. --out under a file, a full disk: may hit one process only, so each one says it
        who = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"train.py: error{who}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except PeerError:  # another process failed and said why
        return 1
    except SetupInterrupted as e:  # nothing to save yet: exit now, with the code of the signal, as a stop would
        if rank0:
            print(
                f"train.py: stopped by {e} during set-up, before any step; nothing to save: run the same command "
                "again to start (or continue)",
                file=sys.stderr,
            )
        return EXIT_CODES[e.signum]
    return 0 if result["stopped_by"] is None else EXIT_CODES[result["stopped_by"]]


if __name__ == "__main__":
    sys.exit(cli())
