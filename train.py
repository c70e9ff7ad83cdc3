"""Train a class-conditional DiT with flow matching: logit-normal t, EMA, wandb, GIFs, exact resume, DDP.

    python train.py                                       # DiT-S/2 on CIFAR-10, the reference run
    python train.py --preset digits-quick                 # CPU quick start on the embedded 8x8 digits
    python train.py --out runs/cifar10 --resume           # continue from runs/cifar10/checkpoints/last.pt
    torchrun --nproc_per_node 8 train.py --batch-size 1024   # DDP; --batch-size is the global batch

Exact resume: every random draw comes from the global generators and the data stream's position, all in every
checkpoint (training/resume.py); diagnostics never move them (evaluation/monitor.py). A signal or --time-limit stops
the run with a checkpoint (utils/preemption.py; exit codes in docs/reliability.md). No host sync per step: the
statistics stay on the device until --log-every (utils/optim.py). Under DDP rank 0 alone writes the run folder.
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

from data import BatchStream, DataError, build_dataset
from evaluation.fid import check_reference_statistics
from evaluation.monitor import Monitor, MonitorConfig
from models import build_model
from models.vae import LatentCodec, LatentSpace, VAEError
from objectives.repa import representation_alignment
from training.config import PRESETS, TrainConfig, resolve, run_folder
from training.resume import changed_settings, check_resume, restore_training_state, training_state, upgraded_run_config
from utils.checkpoint import CheckpointError, save_training_checkpoint
from utils.config import ConfigError, parse
from utils.device import allow_tf32, compile_or_eager
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
from utils.phema import PowerEMA
from utils.preemption import EXIT_CODES, REASONS, SetupInterrupted, StopRequest, signals_end_setup
from utils.rng import rng_state, seed_everything, set_rng_state, training_seed
from utils.runfolder import LAST_CHECKPOINT, hold_run_folder, outside, resume_state
from utils.runlog import RunLogger, warn

SKIPPED_WARNING = 0.01  # the console hears of skipped steps past this fraction of the steps


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
    skipped_said: int = 0  # skipped steps the console was last told of


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
        with hold_run_folder(run_folder(cfg), dist.is_main):  # one run per folder (utils/runfolder.py)
            with signals_end_setup():
                run = setup(cfg, dist, fid_extractor, started)
            return train(run)
    finally:
        cleanup()


def setup(cfg: TrainConfig, dist: DistInfo, fid_extractor: torch.nn.Module | None, started: float) -> Run:
    """Everything before the first step, from the flags as given. What can fail on bad input fails before anything
    is written."""
    out, device = run_folder(cfg), dist.device
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by {dist.world_size} processes")
    if cfg.fid_ref_stats:  # checked now, not at the first FID
        check_reference_statistics(cfg.fid_ref_stats, fid_extractor, "--fid-ref-stats")
    state, state_path = resume_state(out, cfg.resume)
    if state is not None:
        state["config"] = upgraded_run_config(state["config"])
    cfg = resolve(cfg, device, state and state["config"])  # a resume keeps the checkpoint's unset weight settings
    foreign = state_path is not None and outside(state_path, out)  # a fork of another folder's run
    with first_then_others(dist.is_main):  # only one process downloads
        dataset = build_dataset(cfg.dataset, cfg.data_path, cfg.image_size, cfg.channels, train=True)
    shape, latent_space = dataset.sample_shape, dataset.latent_space()  # latents: (C, h, w) of the VAE's
    if latent_space is None and shape != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ConfigError(f"--channels {cfg.channels} --image-size {cfg.image_size} do not match the data {shape}")
    objective, projector = cfg.build_objective(), {}
    if cfg.repa_weight:  # the encoder loads (and may fail) before anything is written
        objective, projector = representation_alignment(cfg, objective, shape[-1], device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    try:
        model = build_model(cfg, shape[-1], shape[0], dataset.num_classes, **objective.network_options(), **projector)
        model.to(device)
    except ValueError as e:
        at = f"--image-size {cfg.image_size}" if latent_space is None else f"latents {'x'.join(map(str, shape))}"
        raise ConfigError(f"--model {cfg.model} at {at}: {e}") from None
    if state is not None:
        check_resume(state, dataclasses.asdict(cfg), model.config, latent_space)
        if dist.is_main:  # they apply from here on, so say which (config-resume-STEP.json records them all)
            changed = [
                f"{flag} {a} -> {b}" for _, flag, a, b in changed_settings(state["config"], dataclasses.asdict(cfg))
            ]
            print(f"resume: step {state['step']} of {state_path}; settings changed: {', '.join(changed) or 'none'}")

    if cfg.vae and latent_space is None:
        raise ConfigError(f"--vae decodes latents; --dataset {cfg.dataset} holds images")
    decoder = None
    if latent_space is not None and (cfg.sample_every or cfg.fid_every or cfg.vae):  # the diagnostics decode samples
        try:
            with first_then_others(dist.local_rank == 0):  # one process per node downloads the VAE
                decoder = LatentCodec.from_space(LatentSpace.from_dict(latent_space), device, vae=cfg.vae)
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
        with_images=bool(cfg.repa_weight),  # the clean images REPA's encoder sees
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
    monitor = Monitor(
        MonitorConfig.of(cfg), out, logger, dist, objective.sample_method, fid_extractor, decoder, dataset
    )
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
            x, y, *images = next(run.stream)  # with REPA, the clean images too
            lr = learning_rate(step, cfg.lr, cfg.warmup)
            run.step_fn(x, y, lr, images=images[0] if images and step < (cfg.repa_until or cfg.steps) else None)
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
        **({"train/repa_loss": s["align"]} if run.cfg.repa_weight else {}),
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
    skipped = metrics["train/skipped_steps"]
    if run.dist.is_main and skipped > max(SKIPPED_WARNING * step, 2 * run.skipped_said):  # said again as it doubles
        run.skipped_said = skipped
        warn(f"{skipped:.0f} of {step} steps skipped for a non-finite loss: check the data and the learning rate")
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
