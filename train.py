"""Train a class-conditional DiT with flow matching: logit-normal t, EMA, wandb, GIFs, exact resume, DDP.

    python train.py                                       # DiT-S/2 on CIFAR-10, the reference run
    python train.py --preset digits-quick                 # CPU quick start on the embedded 8x8 digits
    python train.py --out runs/cifar10 --resume           # continue from runs/cifar10/checkpoints/last.pt
    torchrun --nproc_per_node 8 train.py --batch-size 1024   # DDP; --batch-size is the global batch

The objective and the time convention (t = 0 noise, t = 1 data, target x1 - x0) live in utils/flow.py.
OUT holds config.json, metrics.jsonl, samples/ (PNG grids and GIFs), checkpoints/ (last.pt and the
--keep-checkpoints newest numbered files) and wandb/. A resumed run leaves config.json as the first run
wrote it and records its own settings in config-resume-STEP.json (STEP: the checkpoint it resumed from);
it drops the metrics.jsonl rows that a crashed run logged after its last checkpoint. Randomness comes
from torch's, numpy's and python's global generators plus the data stream's position; all are stored in
every checkpoint, so a resumed CPU run is bit-identical to an uninterrupted one.

Non-finite losses: the update is skipped on the device, without a host sync, through fused AdamW's
``found_inf`` (the mechanism GradScaler uses); the EMA update is masked the same way. Counters stay on
the device and are read back with the loss at --log-every steps and before each checkpoint, where
--nan-patience non-finite steps in a row stop the run without writing a checkpoint.

DDP: rank 0 alone writes the run folder, logs, prints and draws the sample grids; FID runs on every
process (each samples its share). A collective that waits longer than --dist-timeout minutes ends the run
(see utils/distributed.py for what has to fit in it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data import DATASETS, BatchStream, DataError, build_dataset
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.cli import ModelConfig, add_model_args, build_model
from utils.distributed import (
    DistInfo,
    PeerError,
    all_gather_object,
    all_ok,
    all_reduce_,
    barrier,
    cleanup,
    init_distributed,
)
from utils.ema import EMA
from utils.flow import T_SAMPLERS, FlowMatching
from utils.io import write_json_atomic
from utils.logging import WANDB_MODES, RunLogger
from utils.monitor import FIDMonitor, sample_and_log
from utils.optim import StepStats, build_adamw, guarded_step
from utils.rng import rng_state, seed_everything, set_rng_state

# Test hook: tests/test_train.py sets this to a step number to SIGKILL the run right after that checkpoint.
KILL_AFTER_CHECKPOINT_ENV = "DIT_TRAIN_SIGKILL_AFTER_CKPT"

PRESETS: dict[str, dict[str, Any]] = {
    # Recognisable digits within a few minutes on a 2-core laptop CPU (see README).
    "digits-quick": dict(
        dataset="digits", image_size=8, channels=1, flip=False, model="DiT-XS/2", hidden_size=64, depth=3,
        num_heads=4, steps=2000, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999, sample_every=500,
        ckpt_every=500, log_every=50, sample_steps=20, fid_every=0, num_workers=0, out="runs/digits-quick",
    ),
}  # fmt: skip


class ConfigError(ValueError):
    """Flags that cannot work together or with the run folder."""


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class TrainConfig(ModelConfig):
    """Every setting of a training run; the resolved copy is saved in OUT/config.json and every checkpoint."""

    # data
    dataset: str = "cifar10"
    data_path: str = "./datasets"
    image_size: int = 32
    channels: int = 3
    flip: bool = True
    num_workers: int = 4
    data_on_device: bool | None = None
    # objective (utils/flow.py)
    t_sampler: str = "logit-normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    sigma: float = 0.0
    ot: bool = False
    # optimisation
    steps: int = 200_000
    batch_size: int = 128
    lr: float = 1e-4
    warmup: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    nan_patience: int = 5
    # samples
    cfg_scales: tuple[float, ...] = (1.0, 2.5, 5.0)
    sample_every: int = 5000
    samples_per_class: int = 8
    sample_steps: int = 50
    # FID of EMA samples against the training set (utils/fid.py)
    fid_every: int = 20_000
    fid_samples: int = 10_000
    fid_cfg_scale: float = 1.0
    # bookkeeping
    ckpt_every: int = 10_000
    keep_checkpoints: int = 3
    log_every: int = 100
    out: str | None = None
    seed: int = 0
    resume: bool = False
    wandb: str = "online"
    wandb_project: str = "dit-flow-matching"
    compile: bool | None = None
    precision: str = "auto"
    device: str = "auto"
    dist_timeout: float = 30.0
    preset: str | None = None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="named settings; explicit flags override them")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help="training set (default %(default)s)")
    g.add_argument("--data-path", help="CIFAR-10 download folder, or the folder of class sub-folders for 'folder'")
    g.add_argument("--image-size", type=int, help="image side in pixels; the patch size must divide it")
    g.add_argument("--channels", type=int, choices=(1, 3), help="image channels (1 gray, 3 RGB)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--num-workers", type=int, help="data loader processes (unused with --data-on-device)")
    g.add_argument(
        "--data-on-device",
        action=argparse.BooleanOptionalAction,
        help="hold the whole set on the device (default: not for folder)",
    )
    add_model_args(p)
    g = p.add_argument_group("objective")
    g.add_argument("--t-sampler", choices=T_SAMPLERS, help="training time distribution (default %(default)s)")
    g.add_argument("--t-mean", type=float, help="logit-normal location m in t = sigmoid(m + s n) (SD3)")
    g.add_argument("--t-std", type=float, help="logit-normal scale s in t = sigmoid(m + s n) (SD3)")
    g.add_argument("--sigma", type=float, help="Gaussian width of the probability path (0: straight lines)")
    g.add_argument("--ot", action=argparse.BooleanOptionalAction, help="exact minibatch OT pairing (OT-CFM)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="total optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, help="global batch size, split over DDP processes")
    g.add_argument("--lr", type=float, help="AdamW learning rate, constant after warm-up")
    g.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--ema-decay", type=float, help="EMA decay (warmed up as min(decay, (1+n)/(10+n)))")
    g.add_argument("--nan-patience", type=int, help="stop after this many non-finite losses in a row")
    g = p.add_argument_group("samples")
    g.add_argument("--cfg-scales", type=float, nargs="+", help="guidance scales of the periodic EMA samples")
    g.add_argument("--sample-every", type=int, help="steps between EMA samples (0: never)")
    g.add_argument("--samples-per-class", type=int, help="samples per class (one row per class)")
    g.add_argument("--sample-steps", type=int, help="Heun steps of the periodic samples and of FID")
    g.add_argument("--fid-every", type=int, help="steps between FID evaluations of the EMA model (0: never)")
    g.add_argument("--fid-samples", type=int, help="generated images per FID evaluation (report this n)")
    g.add_argument("--fid-cfg-scale", type=float, help="guidance scale of the FID samples")
    g = p.add_argument_group("run")
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints (0: only at the end)")
    g.add_argument(
        "--keep-checkpoints", type=int, help="keep this many newest numbered checkpoints besides last.pt (0: all)"
    )
    g.add_argument("--log-every", type=int, help="steps between loss read-backs and logs")
    g.add_argument("--out", help="run folder (default runs/<dataset>)")
    g.add_argument("--seed", type=int, help="global seed (process r uses seed + r)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    g.add_argument(
        "--wandb",
        choices=WANDB_MODES,
        help="online (falls back to offline without credentials), offline, disabled; default $WANDB_MODE or online",
    )
    g.add_argument("--wandb-project", help="wandb project name")
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model (default: on CUDA, where it pays; off on CPU, where compiling takes minutes)",
    )
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto: cuda:LOCAL_RANK when available")
    g.add_argument(
        "--dist-timeout",
        type=float,
        help="DDP: minutes a process may wait for the others in a collective before the run fails",
    )
    p.set_defaults(**dataclasses.asdict(d))
    if os.environ.get("WANDB_MODE") in WANDB_MODES:
        p.set_defaults(wandb=os.environ["WANDB_MODE"])
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig; a --preset sets defaults that explicit flags override."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = vars(parser.parse_args(argv))
    args["cfg_scales"] = tuple(args["cfg_scales"])
    return TrainConfig(**args)


def check_config(cfg: TrainConfig) -> None:
    """ConfigError for settings that cannot work, whatever the machine."""
    checks = [
        (cfg.steps >= 1, "--steps must be >= 1"), (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.lr > 0, "--lr must be > 0"), (cfg.warmup >= 0, "--warmup must be >= 0"),
        (0 <= cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"), (cfg.grad_clip >= 0, "--grad-clip must be >= 0"),
        (cfg.log_every >= 1, "--log-every must be >= 1"), (cfg.nan_patience >= 1, "--nan-patience must be >= 1"),
        (cfg.sample_every >= 0 and cfg.ckpt_every >= 0, "--sample-every and --ckpt-every must be >= 0"),
        (cfg.fid_every >= 0, "--fid-every must be >= 0"), (cfg.fid_samples >= 2, "--fid-samples must be >= 2"),
        (cfg.samples_per_class >= 1 and cfg.sample_steps >= 1, "--samples-per-class, --sample-steps must be >= 1"),
        (len(cfg.cfg_scales) > 0, "--cfg-scales needs at least one scale"), (cfg.image_size >= 1, "bad --image-size"),
        (cfg.num_workers >= 0, "--num-workers must be >= 0"), (cfg.dist_timeout > 0, "--dist-timeout must be > 0"),
        (cfg.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.t_std <= 0 or cfg.sigma < 0:
        raise ConfigError("--t-std must be > 0 and --sigma >= 0")


def resolve_config(cfg: TrainConfig, device: torch.device, verbose: bool = True) -> TrainConfig:
    """Check the settings and fill in what depends on the machine (output folder, precision).

    verbose: warn about settings this device changes (False on DDP ranks other than 0).
    """
    check_config(cfg)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    elif precision == "bf16" and device.type != "cuda":
        if verbose:
            warnings.warn("bf16 autocast is used on CUDA only; training in fp32 on this device", stacklevel=2)
        precision = "fp32"
    return dataclasses.replace(
        cfg, out=cfg.out or f"runs/{cfg.dataset}", precision=precision, device=device.type,
        # cifar10 and digits sit in memory anyway: index them directly; image folders go through loader workers.
        data_on_device=cfg.dataset != "folder" if cfg.data_on_device is None else cfg.data_on_device,
        compile=device.type == "cuda" if cfg.compile is None else cfg.compile,
    )  # fmt: skip


# Settings a resumed run must share with its checkpoint: they define the weights and the data stream.
RESUME_MUST_MATCH = ("dataset", "image_size", "channels", "flip", "batch_size", "seed")


def check_resume(state: dict[str, Any], cfg: TrainConfig, model_config: dict[str, Any], verbose: bool = True) -> None:
    """ConfigError unless the checkpoint fits these settings; other changed settings are reported if verbose."""
    old = state.get("config", {})
    if state["model_config"] != model_config:
        raise ConfigError(f"--resume: the checkpoint's model {state['model_config']} differs from {model_config}")
    bad = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH]
    bad = [b for k, b in zip(RESUME_MUST_MATCH, bad, strict=True) if old.get(k) != getattr(cfg, k)]
    if bad:
        raise ConfigError(f"--resume: these settings differ from the checkpoint's: {'; '.join(bad)}")
    skip = set(RESUME_MUST_MATCH) | {"resume"}
    changed = [k for k in dataclasses.asdict(cfg) if k not in skip and k in old and old[k] != getattr(cfg, k)]
    if changed and verbose:
        print(f"resume: using the new values of {', '.join(changed)}", flush=True)


def link_last(numbered: Path, last: Path, state: dict[str, Any]) -> None:
    """Point last.pt at the newest numbered checkpoint: a hard link renamed into place (atomic, no copy)."""
    tmp = last.with_name(f".{last.name}.{os.getpid()}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(numbered, tmp)
        os.replace(tmp, last)
    except OSError:  # a file system without hard links: write a second copy, atomically as well
        save_checkpoint(state, last)


NUMBERED = re.compile(r"(\d{7,})\.pt")  # f"{step:07d}.pt"


def prune_checkpoints(ckpt_dir: Path, keep: int, step: int) -> list[Path]:
    """Delete numbered checkpoints of steps <= step except the ``keep`` newest; returns the deleted paths.

    keep=0 keeps all. Never deleted: the numbered file that last.pt is a hard link to (whatever its step), and
    numbered files of later steps (left by a run rolled back to an earlier last.pt: not this run's to judge).
    """
    if keep <= 0:
        return []
    last = ckpt_dir / "last.pt"
    numbered = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := NUMBERED.fullmatch(p.name)) and p.is_file()
    )
    older = [p for n, p in numbered if n <= step][:-keep]
    removed = []
    for path in older:
        try:
            if last.exists() and os.path.samefile(path, last):
                continue
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def main(cfg: TrainConfig, fid_extractor: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train as cfg says. Returns the final step, the logged (step, loss) pairs, skipped steps, OUT, the models.

    fid_extractor replaces Inception for FID (tests inject a small one; None loads Inception when needed).
    """
    check_config(cfg)
    try:
        info = init_distributed(cfg.device, cfg.dist_timeout)
    except ValueError as e:  # e.g. --device cuda on a machine without one
        raise ConfigError(str(e)) from None
    try:
        return _train(resolve_config(cfg, info.device, verbose=info.is_main), info, fid_extractor)
    finally:
        cleanup()


def _prepare(cfg: TrainConfig, info: DistInfo) -> tuple[dict[str, Any] | None, Any, torch.nn.Module]:
    """Everything that can fail on bad input, before anything is written: resume state, data, model."""
    ckpt_dir = Path(cfg.out) / "checkpoints"
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by {info.world_size} processes")
    state = None
    if cfg.resume:
        if not (ckpt_dir / "last.pt").is_file():
            raise CheckpointError(f"--resume: no checkpoint at {ckpt_dir / 'last.pt'}")
        state = load_checkpoint(ckpt_dir / "last.pt")
        if not {"optimizer", "step", "rng", "data_state", *EMA.STATE_KEYS} <= state.keys():
            raise CheckpointError(f"--resume: {ckpt_dir / 'last.pt'} holds weights only, not a training state")
    elif ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt")):
        raise ConfigError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue, or choose another --out")
    for turn in (True, False):  # rank 0 first, so that only one process downloads
        if info.is_main == turn:
            dataset = build_dataset(cfg.dataset, cfg.data_path, cfg.image_size, cfg.channels, train=True)
        barrier()
    shape = tuple(dataset[0][0].shape)
    if shape != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ConfigError(f"--channels {cfg.channels} --image-size {cfg.image_size} do not match the data {shape}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    try:
        model = build_model(cfg, cfg.image_size, cfg.channels, dataset.num_classes)
    except ValueError as e:
        raise ConfigError(f"--model {cfg.model} at --image-size {cfg.image_size}: {e}") from None
    if state is not None:
        check_resume(state, cfg, model.config, verbose=info.is_main)
    return state, dataset, model


def _train(cfg: TrainConfig, info: DistInfo, fid_extractor: torch.nn.Module | None) -> dict[str, Any]:
    state, dataset, model = _prepare(cfg, info)
    device, out = info.device, Path(cfg.out)
    last = out / "checkpoints" / "last.pt"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = build_adamw(model.parameters(), cfg.lr, cfg.weight_decay)
    stream = BatchStream(
        dataset, cfg.batch_size // info.world_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
        device=device, flip=cfg.flip, on_device=cfg.data_on_device, num_workers=cfg.num_workers,
    )  # fmt: skip
    flow = FlowMatching(cfg.sigma, cfg.t_sampler, cfg.t_mean, cfg.t_std, cfg.ot)
    step, skipped_before = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict({k: state[k] for k in EMA.STATE_KEYS})
        opt.load_state_dict(state["optimizer"])
        step, skipped_before = state["step"], state.get("skipped_steps", 0)
        data_state = state["data_state"]
        if state.get("world_size", 1) != info.world_size:  # the split of an epoch over processes changed
            if info.is_main:
                print(f"resume: {state.get('world_size', 1)} processes before, {info.world_size} now; new data epoch")
            data_state = {"epoch": data_state["epoch"] + 1, "index": 0}
        stream.load_state_dict(data_state)
    net, agree, reduce = model, None, None
    if info.distributed:
        device_ids = [device.index] if device.type == "cuda" else None  # LOCAL_RANK's GPU (utils/distributed.py)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        agree = lambda ok: all_reduce_(ok.to(torch.int32), "min").bool()  # every process takes or skips the step
        reduce = all_reduce_
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    if cfg.compile:
        net = compile_or_eager(net, model, stream.batch_size, device, autocast, verbose=info.is_main)

    error = None
    if info.is_main:  # the run folder: rank 0 alone writes
        try:
            out.mkdir(parents=True, exist_ok=True)
            # A resume keeps the first run's config.json and records its own settings beside it.
            name = f"config-resume-{step:07d}.json" if state is not None else "config.json"
            write_json_atomic(dataclasses.asdict(cfg), out / name)
        except OSError as e:  # e.g. --out under a file; the others must not wait for rank 0 in a collective
            error = e
    if not all_ok(error is None):
        raise error if error is not None else PeerError("rank 0 could not write the run folder")
    logger = RunLogger(
        out, cfg.wandb, cfg.wandb_project, name=out.name, config=dataclasses.asdict(cfg),
        run_id=state.get("wandb_id") if state else None, enabled=info.is_main, start_step=step,
    )  # fmt: skip
    # Randomness is set last, so nothing above (model init, compile) shifts it between fresh and resumed runs.
    seed = cfg.seed + info.rank + 1_000_003 * step
    if state is not None and len(state["rng"]) == info.world_size:
        set_rng_state(state["rng"][info.rank], device, cuda_seed=seed)
    else:
        if state is not None and info.is_main:
            print(f"resume: {len(state['rng'])} processes saved RNG states, now {info.world_size}; reseeding")
        seed_everything(seed)

    def save(step: int) -> None:
        rng = all_gather_object(rng_state(device))  # a collective: every process takes part
        if info.is_main:
            ckpt = {
                "model_config": model.config, "model": model.state_dict(), **ema.state_dict(),
                "optimizer": opt.state_dict(), "step": step, "config": dataclasses.asdict(cfg), "rng": rng,
                "data_state": stream.state_dict(), "world_size": info.world_size,
                "skipped_steps": skipped_before + int(stats.skipped.item()), "wandb_id": logger.run_id,
            }  # fmt: skip
            numbered = last.with_name(f"{step:07d}.pt")
            save_checkpoint(ckpt, numbered)
            link_last(numbered, last, ckpt)
            prune_checkpoints(last.parent, cfg.keep_checkpoints, step)
            if os.environ.get(KILL_AFTER_CHECKPOINT_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)

    fid = FIDMonitor(
        cfg.dataset, cfg.data_path, cfg.image_size, cfg.channels, num_samples=cfg.fid_samples,
        steps=cfg.sample_steps, cfg_scale=cfg.fid_cfg_scale, seed=cfg.seed, num_workers=cfg.num_workers,
        extractor=fid_extractor, dist=info,
    )  # fmt: skip

    # ---- the loop: no host sync per step; the loss is read back at --log-every steps and checkpoints
    stats, history = StepStats(device), []
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    if step >= cfg.steps and info.is_main:
        print(f"already at step {step} of {cfg.steps}; nothing to do (raise --steps to train on)")
    bar = tqdm(
        total=cfg.steps, initial=step, disable=not info.is_main, dynamic_ncols=True, desc="train",
        mininterval=0.5 if sys.stderr.isatty() else 60,  # a redirected log gets a line a minute, not a flood
    )  # fmt: skip
    t_last, step_last = time.perf_counter(), step
    model.train()
    try:
        while step < cfg.steps:
            x, y = next(stream)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast():
                loss = flow.loss(net, x, y).loss
            loss.backward()
            ok, grad_norm = guarded_step(opt, params, loss, max_norm, agree)
            ema.update(model, mask=ok)
            stats.update(ok, loss, grad_norm)
            step += 1
            bar.update(1)

            is_last = step == cfg.steps
            do_ckpt = is_last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
            if step % cfg.log_every == 0 or do_ckpt:
                s = stats.read(reduce)
                if s["worst_streak"] >= cfg.nan_patience:
                    raise NonFiniteLossError(
                        f"{int(s['worst_streak'])} non-finite losses in a row by step {step}; stopped without saving. "
                        f"Last good checkpoint: {last if last.exists() else 'none'}"
                    )
                now = time.perf_counter()
                steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                if s["good_steps"]:
                    history.append((step, s["loss"]))
                logger.log(
                    {
                        "train/loss": s["loss"], "train/grad_norm": s["grad_norm"], "train/lr": lr,
                        "train/steps_per_s": steps_per_s, "train/img_per_s": steps_per_s * cfg.batch_size,
                        "train/skipped_steps": skipped_before + s["skipped"], "train/epoch": stream.epoch,
                    },
                    step,
                )  # fmt: skip
                img_s = steps_per_s * cfg.batch_size
                bar.set_postfix(loss=f"{s['loss']:.4f}", steps_s=f"{steps_per_s:.2f}", img_s=f"{img_s:.0f}")
            t_pause = time.perf_counter()
            if info.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or is_last):
                try:
                    sample_and_log(
                        ema.model, step, out, logger, samples_per_class=cfg.samples_per_class,
                        cfg_scales=cfg.cfg_scales, steps=cfg.sample_steps, seed=cfg.seed,
                    )  # fmt: skip
                except Exception as e:  # samples are diagnostics: a failure here must not end a days-long run
                    print(f"warning: sampling at step {step} failed: {type(e).__name__}: {e}", file=sys.stderr)
            if cfg.fid_every and (step % cfg.fid_every == 0 or is_last):  # every process: each samples a share
                try:
                    fid(ema.model, step, logger)
                except Exception as e:  # like the samples: report and train on (the failing process says why)
                    if not isinstance(e, PeerError) or info.is_main:
                        who = f" (rank {info.rank})" if info.distributed else ""
                        print(f"warning: FID at step {step} failed{who}: {type(e).__name__}: {e}", file=sys.stderr)
            if do_ckpt:
                save(step)
            t_last += time.perf_counter() - t_pause  # sampling and checkpoints do not count against throughput
    finally:  # also when stopped by non-finite losses: flush wandb's files
        bar.close()
        logger.finish()
    return {
        "step": step, "losses": history, "skipped_steps": skipped_before + int(stats.skipped.item()), "out": out,
        "model": model, "ema": ema.model, "checkpoint": last,
    }  # fmt: skip


def compile_or_eager(
    net: torch.nn.Module, model: torch.nn.Module, batch: int, device: torch.device, autocast, verbose: bool = True
):
    """torch.compile(net), probed with one forward and backward pass; the eager net if compiling fails."""
    try:
        compiled = torch.compile(net)
        x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            compiled(x, torch.full((batch,), 0.5, device=device), y).float().square().mean().backward()
        return compiled
    except Exception as e:
        if verbose:
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly", stacklevel=2)
        return net
    finally:
        model.zero_grad(set_to_none=True)


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: bad input and stopped runs end with one line on stderr and a non-zero status."""
    try:
        main(parse_args(argv))
    except (ConfigError, DataError, CheckpointError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. --out under a file, a full disk: may hit one process only, so each one says it
        who = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"train.py: error{who}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except PeerError:  # another process failed and said why
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
