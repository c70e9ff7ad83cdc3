"""The GPU check's runner (see benchmarks/gpu_check.py): runs each part as a subprocess in the repository root
under its own timeout, the smaller of its cap and what is left of the wall-time budget, SIGTERM then SIGKILL to
its whole process group, and keeps one record per part for summary.json. Everything printed goes to stdout and the
log file.

Standard library only: `prepare` imports it before the project's packages are installed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESERVE_S = 10  # seconds kept for the summary
MIN_STEP_S = 15  # a part with less time than this left is skipped rather than started
KILL_AFTER_S = 10  # after the timeout's SIGTERM, SIGKILL this much later


# ------------------------------------------------------------------------------------------------ output


class Log:
    """Everything printed goes to stdout and to the log file; ``say`` prefixes the seconds since the start."""

    def __init__(self, path: Path | None = None, t0: float | None = None):
        self.file = open(path, "w") if path else None
        self.t0 = time.monotonic() if t0 is None else t0
        self.lock = threading.Lock()

    def elapsed(self) -> int:
        return int(time.monotonic() - self.t0)

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            if self.file:
                self.file.write(text)
                self.file.flush()

    def say(self, message: str) -> None:
        self.write(f"[gpu_check {self.elapsed():4d}s] {message}\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def part_record(name: str, status: str, rc: int | None, seconds: float, limit_s: int | None, note: str = "") -> dict:
    """One entry of summary.json's "parts": status is ok, failed, timeout or skipped."""
    return {
        "name": name,
        "status": status,
        "rc": rc,
        "seconds": round(float(seconds), 1),
        "limit_s": limit_s,
        "note": " ".join(note.split()),
    }


# ------------------------------------------------------------------------------------------------ subprocesses


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(
    argv: list[str],
    limit_s: float,
    write: Callable[[str], None],
    env: dict[str, str] | None = None,
    kill_after_s: float = KILL_AFTER_S,
) -> tuple[str, int]:
    """Runs argv in the repository root with its output (stdout and stderr) passed line by line to write, as
    `timeout --kill-after` does: SIGTERM to its process group after limit_s, SIGKILL kill_after_s later.
    Returns (status, exit code): ("ok", 0), ("failed", code; 128 + N for signal N) or ("timeout", 124, or 137 when
    it had to be killed). Whatever the command leaves behind in its process group is killed when it ends."""
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        write(f"cannot start {argv[0]}: {e}\n")
        return "failed", 127

    def copy() -> None:
        for line in iter(proc.stdout.readline, b""):
            write(line.decode("utf-8", "replace"))

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit_s)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=kill_after_s)
            status, rc = "timeout", 124
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            status, rc = "timeout", 137
    _signal_group(proc.pid, signal.SIGKILL)  # compile workers and the like: they would hold the pipe and the GPU
    reader.join(timeout=10)
    proc.stdout.close()
    return status, (128 - rc if rc < 0 else rc)


# ------------------------------------------------------------------------------------------------ the parts


@dataclass
class Part:
    """One subprocess of `run`. A part with ``skip`` set never runs; ``needs``, given the records of the parts
    so far by name, returns why the part cannot run now, or "" when it can."""

    name: str
    group: str  # what --parts selects: one of gpu_check.GROUPS
    cap_s: int = 0
    argv: tuple[str, ...] = ()
    skip: str = ""
    needs: Callable[[dict[str, dict]], str] | None = None


class Runner:
    """Runs parts in order within a wall-time budget and keeps their records; each part's output goes to the
    log and to work/NAME.log."""

    def __init__(
        self,
        log: Log,
        work: Path,
        budget_s: int,
        env: dict[str, str] | None = None,
        reserve_s: int = RESERVE_S,
        min_step_s: int = MIN_STEP_S,
        kill_after_s: float = KILL_AFTER_S,
    ):
        self.log, self.work, self.budget_s, self.env = log, work, budget_s, env
        self.reserve_s, self.min_step_s, self.kill_after_s = reserve_s, min_step_s, kill_after_s
        self.records: list[dict] = []

    def record(self, *args, **kwargs) -> dict:
        self.records.append(part_record(*args, **kwargs))
        return self.records[-1]

    def skip(self, name: str, reason: str) -> dict:
        self.log.say(f"skip {name}: {reason}")
        return self.record(name, "skipped", None, 0, None, reason)

    def step(self, part: Part) -> dict:
        """Runs one part under the smaller of its cap and what is left of the budget (less the reserve)."""
        if part.skip:
            return self.skip(part.name, part.skip)
        reason = part.needs({r["name"]: r for r in self.records}) if part.needs else ""
        if reason:
            return self.skip(part.name, reason)
        left = self.budget_s - self.log.elapsed() - self.reserve_s
        if left < self.min_step_s:
            return self.skip(part.name, f"out of time: {left}s of the {self.budget_s}s budget left")
        limit = min(part.cap_s, left)
        self.log.say(f"start {part.name} (limit {limit}s): {shlex.join(part.argv)}")
        t = time.monotonic()
        with open(self.work / f"{part.name}.log", "w") as own:

            def write(text: str) -> None:
                self.log.write(text)
                own.write(text)

            status, rc = run_command(list(part.argv), limit, write, self.env, self.kill_after_s)
        seconds = time.monotonic() - t
        self.log.say(f"end {part.name}: {status} (exit {rc}) after {int(seconds)}s")
        return self.record(part.name, status, rc, seconds, limit)

    def run(self, parts: list[Part]) -> list[dict]:
        for part in parts:
            self.step(part)
        return self.records
