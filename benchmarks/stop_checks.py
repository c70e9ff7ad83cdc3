"""What asking for a stop costs, and how long the diagnostics a stop must interrupt take (CPU).

    python -m benchmarks.stop_checks grid --samples-per-class 400        # one scale's grid + GIF of digits-quick
    python -m benchmarks.stop_checks throughput                          # sampling with and without should_stop
    python -m benchmarks.stop_checks throughput --model digits --n 256 --steps 20
    python -m benchmarks.stop_checks collective                          # the agreed check under 2-process gloo

grid: train.py's ``Monitor.samples`` (EMA and raw grids of every class and the EMA trajectory GIF) of digits-quick's
network (random weights) at one cfg scale, timed whole; the files it wrote and their sizes. throughput:
``Sampler.generate`` of DiT-S/2 (32x32x4 latents) or digits-quick's network at a fixed grid, alternately with a
``should_stop`` that never fires (a ``StopRequest`` with a budget, as train.py's grids ask) and without one, the
median of each. collective: the seconds per agreed check (an all-reduce over a gloo group) in two processes on this
machine, and the FID's sampling (``evaluation.fid.generated_statistics``) of digits-quick's network with
``utils.preemption.AgreedStop`` asked per batch or also per solver step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def digits_quick_dit() -> torch.nn.Module:
    """digits-quick's network (train.py --preset digits-quick, 8x8x1, 10 classes) with random weights (seed 0): an
    untrained DiT outputs zero, and its trajectory frames would all be the same."""
    from models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def grid(args: argparse.Namespace) -> None:
    """Time one Monitor.samples call at --samples-per-class for digits-quick's network."""
    from types import SimpleNamespace

    from evaluation.monitor import Monitor, MonitorConfig
    from utils.distributed import DistInfo
    from utils.runlog import RunLogger

    with tempfile.TemporaryDirectory() as out:  # digits-quick's sample settings, at one cfg scale
        cfg = SimpleNamespace(
            samples_per_class=args.samples_per_class, sample_classes=10, cfg_scales=(1.0,), sample_steps=20, seed=0
        )
        dist_info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        monitor = Monitor(MonitorConfig.of(cfg), Path(out), RunLogger(out, "disabled"), dist_info, sample_method="heun")
        model = digits_quick_dit()
        start = time.perf_counter()
        monitor.samples(1, model, model)
        seconds = time.perf_counter() - start
        files = sorted((Path(out) / "samples").iterdir())
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in files)
        print(f"grid + GIF, {args.samples_per_class} per class, 20 heun steps: {seconds:.1f} s ({sizes})")


def throughput(args: argparse.Namespace) -> None:
    """Median seconds of one generate call with and without a should_stop that never fires, alternating."""
    from models import DiT
    from sampling import Sampler
    from utils.preemption import StopRequest

    torch.manual_seed(0)
    if args.model == "S/2":  # DiT-S/2 on 32x32x4 latents
        model = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=10)
    else:  # digits-quick's network on 8x8x1 images: the shortest steps, where a check would show most
        model = digits_quick_dit()
    sampler = Sampler(model, steps=args.steps, method="euler", batch_size=args.n)
    stop = StopRequest(time_limit=10**6)  # what a training run's grids ask: its flag and its budget
    asked = []

    def ask() -> bool:
        asked.append(1)
        return stop.requested() is not None

    times: dict[str, list[float]] = {"without": [], "with": []}
    for r in range(args.repeats + 1):  # the first round warms up
        for name in ("without", "with") if r % 2 else ("with", "without"):
            start = time.perf_counter()
            sampler.generate(args.n, 0, seed=0, should_stop=ask if name == "with" else None)
            if r:
                times[name].append(time.perf_counter() - start)
    calls = len(asked) // (args.repeats + 1)
    one = timeit.timeit(ask, number=100_000) / 100_000
    stop.close()
    for name, t in times.items():
        print(f"{name} should_stop: median {statistics.median(t):.3f} s, all {' '.join(f'{x:.3f}' for x in t)}")
    print(f"DiT-{args.model}: should_stop asked {calls} times a call ({args.steps} euler steps, n {args.n}), ", end="")
    print(f"{1e6 * one:.2f} us a call: {calls * one / statistics.median(times['without']):.1e} of a call's time")


def _collective(rank: int, calls: int, port: int, fid_samples: int, repeats: int) -> None:
    from evaluation.fid import generated_statistics
    from sampling import Sampler
    from utils.preemption import AgreedStop, StopRequest

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stop = StopRequest()
    for _ in range(100):
        stop.check()
    times = []
    for _ in range(5):
        dist.barrier(stop.group)
        start = time.perf_counter()
        for _ in range(calls):
            stop.check()
        times.append((time.perf_counter() - start) / calls)
    if rank == 0:
        print(f"StopRequest.check, 2 processes, gloo: {' '.join(f'{1e6 * t:.0f}' for t in times)} us a call")
    # FID sampling as train.py runs it under DDP (digits-quick's network, 8x8x1, heun at 20 steps), its agreement
    # asked before each batch only, or also before each solver step.
    model = digits_quick_dit()
    sampler, features = Sampler(model, steps=20, method="heun"), torch.nn.Flatten()
    fid: dict[str, list[float]] = {"per batch": [], "per step": []}
    for r in range(repeats + 1):  # the first round warms up
        for name in ("per batch", "per step") if r % 2 else ("per step", "per batch"):
            agreed = AgreedStop(stop)
            dist.barrier(stop.group)
            start = time.perf_counter()
            generated_statistics(
                sampler,
                fid_samples,
                extractor=features,
                progress=False,
                rank=rank,
                world_size=2,
                should_stop=agreed.meet,
                step_stop=agreed.step if name == "per step" else None,
            )
            if r:
                fid[name].append(time.perf_counter() - start)
    if rank == 0:
        for name, t in fid.items():
            print(
                f"FID sampling of {fid_samples}, agreed {name}: median {statistics.median(t):.2f} s, all "
                + " ".join(f"{x:.2f}" for x in t)
            )
    stop.close()
    dist.destroy_process_group()


def collective(args: argparse.Namespace) -> None:
    """Seconds per StopRequest.check in two processes (gloo), five rounds of --calls; FID sampling with the agreement
    asked per batch and per step."""
    mp.spawn(_collective, args=(args.calls, 29500 + os.getpid() % 1000, args.fid_samples, args.repeats), nprocs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grid")
    g.add_argument("--samples-per-class", type=int, default=400)
    t = sub.add_parser("throughput")
    t.add_argument("--model", choices=("S/2", "digits"), default="S/2")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--n", type=int, default=2)
    t.add_argument("--repeats", type=int, default=10)
    c = sub.add_parser("collective")
    c.add_argument("--calls", type=int, default=2000)
    c.add_argument("--fid-samples", type=int, default=1024)
    c.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    {"grid": grid, "throughput": throughput, "collective": collective}[args.what](args)


if __name__ == "__main__":
    main()
