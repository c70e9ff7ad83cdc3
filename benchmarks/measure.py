"""How the benchmark measures: phase timing (host clock on CPU, CUDA events on GPU), per-step medians, peak
memory, host-sync counts and the peak FLOP/s that MFU is taken against. benchmarks/benchmark.py runs the rows."""

from __future__ import annotations

import itertools
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendor data sheets; matched in this order
# against torch.cuda.get_device_name(). --peak-tflops overrides them (and covers other devices).
GPU_BF16_PEAK: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.4e12),
    (("H100", "PCIE"), 756.0e12),
    (("H100", "NVL"), 835.5e12),
    (("H100",), 989.4e12),  # SXM
    (("A100",), 312.0e12),
)


def gpu_bf16_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name, or None if it is not in the table."""
    upper = name.upper()
    for keys, peak in GPU_BF16_PEAK:
        if all(k in upper for k in keys):
            return peak
    return None


def measure_matmul_flops(device: torch.device, seconds: float = 1.0, n: int = 2048) -> float:
    """Best fp32 FLOP/s of an n x n matmul repeated for about ``seconds`` (the best one resists noise)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set (VmHWM) to its current size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes: CUDA memory allocated since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    try:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024, "process peak RSS"
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return (kb if sys.platform == "darwin" else kb * 1024), "process peak RSS"


# ---------------------------------------------------------------------------------------------- timing


class PhaseTimer:
    """Boundaries between the phases of consecutive steps: the host clock on CPU, CUDA events on GPU.

    Events are recorded in the stream and read after one synchronisation at the end, so timing adds no
    host sync to the steps; the GPU time of a phase then includes any wait for the host to launch it.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (synchronises once on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def summarize(phase_seconds: list[float], batch_size: int) -> dict[str, Any]:
    """Per-step medians from the flat list of phase durations (len(PHASES) per step)."""
    k = len(PHASES)
    steps = [phase_seconds[i : i + k] for i in range(0, len(phase_seconds), k)]
    step_s = statistics.median(sum(s) for s in steps)
    return {
        "step_ms": 1e3 * step_s,
        "steps_per_s": 1.0 / step_s,
        "img_per_s": batch_size / step_s,
        "img_per_s_mean": batch_size * len(steps) / sum(phase_seconds),
        "img_per_s_best": batch_size / min(sum(s) for s in steps),  # the fastest step: least disturbed by load
        "phase_ms": {name: 1e3 * statistics.median(s[i] for s in steps) for i, name in enumerate(PHASES)},
        "step_ms_all": [1e3 * sum(s) for s in steps],
    }


def count_host_syncs(fn: Callable[[], None], device: torch.device) -> int | None:
    """Host synchronisations that fn makes on CUDA (torch's sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def pool(rows: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """One row from repeated runs of the same benchmark: medians over all their timed steps."""
    phases = [x for r in rows for x in r["phase_seconds"]]
    out = {**rows[0], **summarize(phases, batch_size), "repeats": len(rows)}
    out["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in rows)
    out["achieved_flops"] = out["train_flops_per_image"] * out["img_per_s"]
    del out["phase_seconds"]
    return out
