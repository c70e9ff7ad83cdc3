"""Stopping a training run cleanly: on SIGTERM, SIGINT (Ctrl-C) or SIGUSR1, or before a wall-clock budget runs out.
A signal only raises a flag; the run checkpoints the step in progress and exits with the reason's code
(``EXIT_CODES``). Processes agree over a CPU (gloo) group that never waits for the GPU (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from utils.distributed import is_initialized

TIME_LIMIT = 0  # the "signal number" of a stop for the wall-clock budget
REASONS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1", TIME_LIMIT: "--time-limit"}
# 128 + the signal's number, as a shell reports a process killed by it; 124 (as coreutils' timeout) for the budget.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138, TIME_LIMIT: 124}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Catches the stop signals and watches a budget of ``time_limit`` minutes from ``started`` (monotonic),
    stopping once the time left would not cover twice the slowest step plus checkpoint."""

    def __init__(self, time_limit: float | None = None, started: float | None = None):
        self.signum: int | None = None
        start = time.monotonic() if started is None else started
        self.deadline = None if time_limit is None else start + 60 * time_limit
        self.reserve = 0.0  # seconds: the slowest step + checkpoint so far, doubled
        self.group = dist.new_group(backend="gloo") if is_initialized() else None
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:  # the first signal decides; later ones change nothing
            print(f"\n{REASONS[signum]}: stopping after this step, with a checkpoint", file=sys.stderr, flush=True)
            self.signum = signum

    def time_taken(self, seconds: float) -> None:
        """Tell how long a step (with its checkpoint, if any) took, to keep enough time for the last one."""
        self.reserve = max(self.reserve, 2 * seconds)

    def requested(self, seconds: float = 0.0) -> int | None:
        """This process's reason to stop (a signal number, TIME_LIMIT), also if ``seconds`` more would not fit."""
        if self.signum is None and self.deadline is not None:
            if time.monotonic() + seconds + self.reserve >= self.deadline:
                return TIME_LIMIT
        return self.signum

    def check(self, seconds: float = 0.0) -> int | None:
        """``requested(seconds)`` agreed by every process (the largest reason); a collective."""
        reason = self.requested(seconds)
        if self.group is None:
            return reason
        flag = torch.tensor([-1 if reason is None else reason])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return None if flag.item() < 0 else int(flag.item())

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class AgreedStop:
    """Stop callbacks of work every process does at its own pace (FID): ``step`` between solver steps, ``meet`` where
    all come. Each all-reduces [reason, not meeting]; a meeting repeats until all meet, so none waits alone."""

    def __init__(self, stop: StopRequest):
        self.stop, self.reason = stop, None

    def step(self, meeting: bool = False) -> bool:
        """Whether to stop now; ``meeting``: wait until every process meets (or a stop is agreed)."""
        while self.reason is None:
            local = self.stop.requested()
            flag = torch.tensor([-1 if local is None else local, int(not meeting)])
            if self.stop.group is not None:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stop.group)
            self.reason = None if flag[0] < 0 else int(flag[0])
            if not (meeting and flag[1]):  # a step asks once, a meeting until every process is at one
                break
        return self.reason is not None

    def meet(self) -> bool:
        return self.step(meeting=True)


class SetupInterrupted(KeyboardInterrupt):
    """A signal during set-up; a KeyboardInterrupt, so what handles Ctrl-C treats SIGTERM and SIGUSR1 alike."""

    def __init__(self, signum: int):
        super().__init__(REASONS[signum])
        self.signum = signum


@contextlib.contextmanager
def signals_end_setup(deferred: bool = False) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGUSR1 raise SetupInterrupted inside the block; ``deferred``: at its end (Python drops
    what a fork hook raises, so a block that starts processes defers)."""
    caught: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        if not deferred:
            raise SetupInterrupted(signum)
        caught.append(signum)

    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise SetupInterrupted(caught[0])
