"""Training and sampling throughput of the DiT: img/s, time per phase, peak memory and MFU.

    python -m benchmarks.benchmark                                   # DiT-S/2, 32x32x3, batch 32, this machine
    python -m benchmarks.benchmark --batch-size 16 --reference       # also the official DiT of the same size
    python -m benchmarks.benchmark --device cuda --batch-size 256 --compile --json runs/bench/h100.json

Training runs train.py's own step, ``utils.optim.TrainStep``, seeded and set up as train.py sets it up: a batch
from data.BatchStream (a synthetic uint8 set of CIFAR-10's shape by default, held on the device), the loss of
the run's objective with its own settings (``--objective`` and its flags, as train.py takes them) under bf16
autocast on CUDA, backward, guarded_step (gradient clipping, fused AdamW) and the EMA update. The host syncs
are counted on the last warm-up step. Each phase (data, forward, backward, optimizer) is timed with the host
clock on CPU and with CUDA events on GPU, so the GPU run has no host synchronisation inside the timed steps.
Rates are medians over the timed steps. Model FLOPs utilisation (MFU): a trained image costs 3x the forward
FLOPs of models.cost.forward_flops (the forward plus a backward of twice its cost), taken against the device's
dense bf16 peak on GPU, or against a measured fp32 matmul rate on CPU.

Sampling runs sampler.Sampler at a fixed number of steps, without guidance (one pass of N per step) and
with it (one batched pass of 2N per step).

``--reference`` adds benchmarks/official_dit.py (the official DiT architecture: timm attention and MLP, no
registers, no qk-norm), trained twice: with the project's step, which isolates the network, and with the
official repository's step (torch's default AdamW and a per-parameter EMA loop). It never runs compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from benchmarks.measure import (
    PhaseTimer,
    count_host_syncs,
    gpu_bf16_peak,
    measure_matmul_flops,
    peak_memory,
    pool,
    reset_peak_memory,
    summarize,
    sync,
)
from benchmarks.official_dit import official_dit, official_update_ema
from data import BatchStream, DataError, build_dataset
from data.datasets import TensorImageDataset
from models import DiT, ModelConfig, build_model, count_params, forward_flops
from objectives import ObjectiveConfig
from objectives.repa import representation_alignment
from sampling import Sampler
from sampling.solvers import FIXED_GRID_SOLVERS
from training.config import repa_defaults
from utils.config import ConfigError, arg, fill_unset, flag_values, parse
from utils.device import PRECISIONS, allow_tf32, autocast, compile_or_eager, resolve_device, resolve_precision
from utils.ema import EMA
from utils.optim import StepStats, TrainStep, build_adamw
from utils.rng import seed_everything, training_seed


@dataclass(kw_only=True)
class BenchConfig(ModelConfig, ObjectiveConfig):
    """Every setting of a benchmark run; written into the JSON result."""

    image_size: int = arg(32, "image side", min=1, group="data")
    channels: int = arg(3, "image channels (4: synthetic latents of SD-VAE's shape)", choices=(1, 3, 4))
    num_classes: int = arg(10, "classes of the synthetic set", min=0)
    dataset: str = arg(
        "synthetic",
        "synthetic: random uint8 images of the given shape, no download; cifar10 needs --data-path",
        choices=("synthetic", "digits", "cifar10"),
    )
    data_path: str = arg("./datasets", "where CIFAR-10 lies (it is not downloaded here)")
    num_images: int = arg(10_000, "size of the synthetic set", min=1)
    data_on_device: bool = arg(True, "hold the set on the device")
    num_workers: int = arg(0, "loader processes without --data-on-device", min=0)
    flip: bool = arg(True, "random horizontal flips, as train.py")
    batch_size: int = arg(32, "images per step", min=1, group="training")
    steps: int = arg(10, "timed steps", min=1)
    warmup: int = arg(3, "untimed steps first (the last one counts the host syncs)", min=0)
    lr: float = arg(1e-4, "AdamW learning rate, as train.py after its warm-up", gt=0)
    weight_decay: float = arg(0.0, "AdamW weight decay, as train.py", min=0)
    ema_decay: float = arg(0.9999, "EMA decay, as train.py", min=0, lt=1)
    repeats: int = arg(1, "run every row this many times, alternating their order; pooled medians", min=1)
    grad_clip: float = arg(1.0, "as train.py (0: none)", min=0)
    compile: bool = arg(False, "torch.compile the model, as train.py")
    precision: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS)
    repa_weight: float = arg(0.0, "REPA's alignment, as train.py (0: off; pixel data only)", min=0)
    repa_encoder: str | None = arg(None, "as train.py (default dinov2_vitb14)")
    repa_depth: int | None = arg(None, "as train.py", min=1)
    repa_projector_dim: int | None = arg(None, "as train.py", min=1)
    reference: bool = arg(False, "also time the official DiT of the same size")
    train: bool = arg(True, "run the training benchmark")
    sample: bool = arg(True, "run the sampling benchmark", group="sampling")
    sample_n: int | None = arg(None, "images per sampling call (default: the batch size)", min=1)
    sample_steps: int = arg(10, "solver steps", min=1)
    sample_method: str = arg("euler", "fixed-grid solver", choices=FIXED_GRID_SOLVERS)
    cfg_scale: float = arg(4.0, "guidance scale of the guided run")
    device: str = arg("auto", "auto: CUDA when available", choices=("auto", "cpu", "cuda"), group="machine and output")
    threads: int | None = arg(None, "CPU threads for torch (default: torch's choice)", min=1)
    peak_tflops: float | None = arg(None, "the device's peak in TFLOP/s for MFU (default: table/measured)", gt=0)
    peak_seconds: float = arg(2.0, "seconds spent measuring the CPU matmul peak", gt=0)
    seed: int = arg(0, "seed of the data, the weights and the noise")
    json: str | None = arg(None, "write the results here (an existing file is never overwritten)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_images < self.batch_size:
            raise ConfigError("num_images must be at least batch_size")
        if not (self.train or self.sample):
            raise ConfigError("nothing to do: both --no-train and --no-sample")
        if self.reference and (self.num_classes == 0 or self.build_objective().network_options()):
            raise ConfigError("--reference needs a class-conditional model whose objective adds no network inputs")
        if self.repa_weight and (self.reference or self.channels == 4):
            raise ConfigError("--repa-weight times the project's step on pixel data: not with --reference or latents")
        if self.json and Path(self.json).exists():
            raise ConfigError(f"{self.json} already exists; choose another --json path")


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    return parse(BenchConfig, argv, "python -m benchmarks.benchmark", __doc__.split("\n\n")[0])


def command_line(cfg: BenchConfig) -> str:
    """The shortest command that reproduces cfg: its settings that differ from the defaults."""
    return " ".join(["python -m benchmarks.benchmark", *flag_values(cfg)])


# ---------------------------------------------------------------------------------------------- device


def device_info(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Device name, threads, torch version and the peak FLOP/s used for MFU with where it came from."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        peak, source = gpu_bf16_peak(info["name"]), "dense bf16 peak of the data sheet"
    else:
        info["name"] = platform.processor() or platform.machine()
        try:  # the model name of the first CPU, when Linux says it
            line = next(s for s in Path("/proc/cpuinfo").read_text().splitlines() if s.startswith("model name"))
            info["name"] = line.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            pass
        peak = measure_matmul_flops(device, cfg.peak_seconds)
        source = f"best fp32 2048x2048 matmul rate, measured before and after the runs, {info['threads']} threads"
    if cfg.peak_tflops is not None:
        peak, source = cfg.peak_tflops * 1e12, "--peak-tflops"
    info["peak_measured"] = device.type == "cpu" and cfg.peak_tflops is None
    info["peak_flops_samples"] = [peak] if info["peak_measured"] else []
    info["peak_flops"] = peak
    info["peak_source"] = source if peak else "unknown device: pass --peak-tflops for MFU"
    return info


# ---------------------------------------------------------------------------------------------- training


def synthetic_dataset(n: int, channels: int, size: int, num_classes: int, seed: int) -> TensorImageDataset:
    """Random uint8 images (n, channels, size, size) and labels: a dataset of CIFAR-10's shape, no download."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, max(num_classes, 1), (n,), generator=g)
    return TensorImageDataset(images, labels, [str(i) for i in range(max(num_classes, 1))])


def make_dataset(cfg: BenchConfig):
    if cfg.dataset == "synthetic":
        return synthetic_dataset(cfg.num_images, cfg.channels, cfg.image_size, cfg.num_classes, cfg.seed)
    dataset = build_dataset(cfg.dataset, cfg.data_path, cfg.image_size, cfg.channels, train=True, download=False)
    if dataset.num_classes != cfg.num_classes:
        raise ConfigError(f"--num-classes {cfg.num_classes}: the {cfg.dataset} set has {dataset.num_classes}")
    return dataset


def make_model(cfg: BenchConfig, impl: str, **projector: int) -> nn.Module:
    """The project's DiT ('dit'), built as train.py builds it for the objective (and REPA's projector), or the
    official architecture ('official') of the configured size."""
    if impl == "dit":
        options = cfg.build_objective().network_options()
        return build_model(cfg, cfg.image_size, cfg.channels, cfg.num_classes, **options, **projector)
    sizes = dict(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads)
    return official_dit(
        cfg.model,
        input_size=cfg.image_size,
        in_channels=cfg.channels,
        num_classes=cfg.num_classes,
        class_dropout_prob=cfg.class_dropout,
        **{k: v for k, v in sizes.items() if v is not None},
    )


def model_flops(cfg: BenchConfig, impl: str) -> int:
    """Forward FLOPs per image (models.cost.forward_flops); the official network counts as a DiT without registers."""
    with torch.device("meta"):  # shapes only
        model = make_model(dataclasses.replace(cfg, num_registers=0) if impl == "official" else cfg, "dit")
    return forward_flops(model)


def bench_train(
    cfg: BenchConfig, device: torch.device, precision: str, dataset, impl: str = "dit", step: str = "project"
) -> tuple[dict[str, Any], nn.Module]:
    """Time cfg.steps training steps after cfg.warmup; returns the result row and the trained model.

    step='project' is train.py's step (``utils.optim.TrainStep``, set up and seeded as train.py does with the same
    settings); step='official' is the official DiT repository's (default AdamW, no clipping, a per-parameter EMA
    loop), with the same data and loss.
    """
    objective, projector = cfg.build_objective(), {}
    if cfg.repa_weight:  # train.py's REPA: the encoder's forward and the projector are part of the step
        repa = fill_unset(cfg, repa_defaults(cfg))
        objective, projector = representation_alignment(repa, objective, cfg.image_size, device)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, impl, **projector).to(device).train()
    stream = BatchStream(
        dataset,
        cfg.batch_size,
        seed=cfg.seed,
        device=device,
        flip=cfg.flip,
        on_device=cfg.data_on_device,
        num_workers=cfg.num_workers,
        with_images=bool(cfg.repa_weight),
    )
    net = model
    if cfg.compile and impl == "dit":  # train.py's own probe-and-fall-back, so it compiles exactly as training does
        net = compile_or_eager(model, cfg.batch_size, precision)
    compiled = net is not model

    if step == "project":
        opt = build_adamw(model.parameters(), cfg.lr, cfg.weight_decay)
        step_fn = TrainStep(net, objective, opt, EMA(model, cfg.ema_decay), StepStats(device), precision, cfg.grad_clip)
    elif step == "official":
        ema_model = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0)

        def step_fn(x: torch.Tensor, y: torch.Tensor, lr: float, mark) -> None:
            with autocast(device, precision):
                loss = objective.loss(net, x, y).loss
            mark()
            loss.backward()
            mark()
            opt.step()
            opt.zero_grad()
            official_update_ema(ema_model, model)
            mark()
    else:
        raise ValueError(f"unknown step {step!r}")
    seed_everything(training_seed(cfg.seed, 0, 0))  # as train.py, right before its first step

    def train_step(timer: PhaseTimer | None) -> None:
        mark = timer.mark if timer else lambda: None
        x, y, *images = next(stream)
        mark()
        step_fn(x, y, cfg.lr, mark, *images)

    syncs = None
    for i in range(cfg.warmup):
        if i == cfg.warmup - 1 and step == "project" and device.type == "cuda":  # counted on CUDA only
            syncs = count_host_syncs(lambda: train_step(None), device)
        else:
            train_step(None)
    sync(device)
    reset_peak_memory(device)
    timer = PhaseTimer(device)
    timer.mark()
    for _ in range(cfg.steps):
        train_step(timer)
    phase_seconds = timer.seconds()
    row = summarize(phase_seconds, cfg.batch_size)
    mem, mem_kind = peak_memory(device)
    row.update(
        impl=impl,
        step=step,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        warmup=cfg.warmup,
        precision=precision,
        compiled=compiled,
        params=count_params(model),
        forward_flops_per_image=model_flops(cfg, impl),
        peak_memory_bytes=mem,
        peak_memory_kind=mem_kind,
        host_syncs_per_step=syncs,
        phase_seconds=phase_seconds,
    )
    row["train_flops_per_image"] = 3 * row["forward_flops_per_image"]
    row["achieved_flops"] = row["train_flops_per_image"] * row["img_per_s"]
    return row, model


# ---------------------------------------------------------------------------------------------- sampling


def bench_sample(
    cfg: BenchConfig, model: nn.Module, device: torch.device, precision: str, flops: int
) -> list[dict[str, Any]]:
    """Images/s of sampler.Sampler at cfg.sample_steps, without guidance and (conditional models) with it."""
    n = cfg.sample_n or cfg.batch_size
    sampler = Sampler(model, steps=cfg.sample_steps, method=cfg.sample_method, batch_size=n, precision=precision)
    y = torch.arange(n) % model.num_classes if model.num_classes else None
    scales = [1.0] + ([cfg.cfg_scale] if model.num_classes and cfg.cfg_scale != 1.0 else [])
    rows = []
    for scale in scales:
        sampler.sample(n, y, cfg_scale=scale, steps=1, seed=cfg.seed)  # warm-up: kernels, allocator
        reset_peak_memory(device)
        times = []
        for _ in range(cfg.repeats):
            sync(device)
            t0 = time.perf_counter()
            out = sampler.generate(n, y, cfg_scale=scale, seed=cfg.seed)
            sync(device)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        passes = 2 if scale != 1.0 else 1  # a guided evaluation is one batched pass of 2N
        mem, mem_kind = peak_memory(device)
        rows.append(
            dict(
                cfg_scale=scale,
                n=n,
                steps=cfg.sample_steps,
                method=cfg.sample_method,
                precision=out.precision,
                nfe=out.nfe,
                batch_per_nfe=passes * n,
                seconds=seconds,
                seconds_all=times,
                img_per_s=n / seconds,
                nfe_per_s=out.nfe / seconds,
                achieved_flops=passes * n * out.nfe * flops / seconds,
                peak_memory_bytes=mem,
                peak_memory_kind=mem_kind,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- report


def _mem(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _mfu(flops: float, peak: float | None) -> float | None:
    return flops / peak if peak else None


def format_report(result: dict[str, Any]) -> str:
    """The results as plain-text tables."""
    dev, m = result["device"], result["model"]
    peak = dev["peak_flops"]
    peak_text = f"{peak / 1e12:.3g} TFLOP/s" if peak and peak >= 1e12 else f"{(peak or 0) / 1e9:.1f} GFLOP/s"
    lines = [
        f"device: {dev['type']} ({dev['name']}, {dev['threads']} threads), torch {dev['torch']}",
        f"peak for MFU: {peak_text if peak else 'unknown'} ({dev['peak_source']})",
        f"model: {m['name']} {m['image_size']}x{m['image_size']}x{m['channels']}, {m['num_classes']} classes, "
        f"{m['config']['num_registers']} registers, qk-norm {m['config']['qk_norm']}, {m['params'] / 1e6:.1f}M params, "
        f"{m['forward_flops_per_image'] / 1e9:.2f} GFLOP forward per image",
    ]
    if result.get("train"):
        r0 = result["train"][0]
        lines += [
            "",
            f"training: batch {r0['batch_size']}, {r0['steps']} timed steps after {r0['warmup']} warm-up, "
            f"x{r0['repeats']} runs in alternating order, {r0['precision']}, {result['config']['objective']} objective",
            f"{'network, step':34s} {'img/s':>8s} {'steps/s':>8s} {'step ms':>8s} {'data':>7s} {'fwd':>7s} "
            f"{'bwd':>7s} {'opt':>7s} {'peak mem':>10s} {'MFU':>7s}",
        ]
        for r in result["train"]:
            name = f"{'DiT' if r['impl'] == 'dit' else 'official DiT'}, {r['step']} step"
            name += ", compiled" if r["compiled"] else ""
            ph = r["phase_ms"]
            mfu = _mfu(r["achieved_flops"], peak)
            lines.append(
                f"{name:34s} {r['img_per_s']:8.1f} {r['steps_per_s']:8.2f} {r['step_ms']:8.1f} {ph['data']:7.1f} "
                f"{ph['forward']:7.1f} {ph['backward']:7.1f} {ph['optimizer']:7.1f} {_mem(r['peak_memory_bytes']):>10s} "
                f"{(f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'):>7s}"
            )
        lines.append("(phase columns: median ms per step; peak mem: " + r0["peak_memory_kind"] + ")")
    if result.get("sample"):
        s0 = result["sample"][0]
        lines += [
            "",
            f"sampling: {s0['n']} images, {s0['method']}, {s0['steps']} steps, {s0['precision']}, "
            f"median of {len(s0['seconds_all'])} runs",
            f"{'cfg':>5s} {'NFE':>5s} {'batch/NFE':>10s} {'seconds':>8s} {'img/s':>8s} {'NFE/s':>7s} {'MFU':>7s}",
        ]
        for s in result["sample"]:
            mfu = _mfu(s["achieved_flops"], peak)
            lines.append(
                f"{s['cfg_scale']:5g} {s['nfe']:5d} {s['batch_per_nfe']:10d} {s['seconds']:8.2f} {s['img_per_s']:8.2f} "
                f"{s['nfe_per_s']:7.2f} {(f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'):>7s}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main(cfg: BenchConfig) -> dict[str, Any]:
    """Run the configured benchmarks; returns (and with cfg.json writes) the results."""
    try:
        device = resolve_device(cfg.device)
        model = make_model(cfg, "dit")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision, device)
    allow_tf32(device)  # as train.py
    result: dict[str, Any] = {
        "command": command_line(cfg),
        "config": dataclasses.asdict(cfg),
        "device": device_info(cfg, device),
        "model": {
            "name": cfg.model,
            "config": model.config,
            "image_size": cfg.image_size,
            "channels": cfg.channels,
            "num_classes": cfg.num_classes,
            "params": count_params(model),
            "forward_flops_per_image": model_flops(cfg, "dit"),
        },
        "train": [],
        "sample": [],
    }
    del model
    trained: DiT | None = None
    if cfg.train:
        try:
            dataset = make_dataset(cfg)
        except DataError as e:
            raise ConfigError(str(e)) from None
        runs = [("dit", "project")] + ([("official", "project"), ("official", "official")] if cfg.reference else [])
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {run: [] for run in runs}
        for r in range(cfg.repeats):  # alternating the order spreads a busy machine's slow spells over all rows
            for impl, step in runs if r % 2 == 0 else runs[::-1]:
                row, model = bench_train(cfg, device, precision, dataset, impl, step)
                rows[impl, step].append(row)
                if impl == "dit":
                    trained = model
                del model
        result["train"] = [pool(rows[run], cfg.batch_size) for run in runs]
    if cfg.sample:
        if trained is None:
            torch.manual_seed(cfg.seed)
            trained = make_model(cfg, "dit").to(device)
        result["sample"] = bench_sample(cfg, trained, device, precision, result["model"]["forward_flops_per_image"])
    dev = result["device"]
    if dev["peak_measured"]:  # measured again after the runs: the better of the two resists a busy machine
        dev["peak_flops_samples"].append(measure_matmul_flops(device, cfg.peak_seconds))
        dev["peak_flops"] = max(dev["peak_flops_samples"])
    for row in result["train"] + result["sample"]:
        row["mfu"] = _mfu(row["achieved_flops"], dev["peak_flops"])
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:  # "x": never overwrite a result
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: prints the tables; bad settings end with one line on stderr and status 2."""
    try:
        result = main(parse_args(argv))
    except (ConfigError, FileExistsError) as e:
        print(f"benchmark: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_report(result))
    if result["config"]["json"]:
        print(f"\nwrote {result['config']['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
