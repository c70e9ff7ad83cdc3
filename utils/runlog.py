"""Run logging to OUT/metrics.jsonl and wandb, which never prompts and whose failures never stop training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from utils.io import atomic_write

WANDB_MODES = ("online", "offline", "disabled")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _has_wandb_credentials(wandb) -> bool:
    """Whether wandb could log in without asking anyone."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # prompt=False and verify=False: look for stored credentials only, never ask, never go online
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:
        return False


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the rows of metrics.jsonl after ``step``, and unreadable lines (atomically); returns how many."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines, keep = path.read_text().splitlines(), []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):  # e.g. half a line written by a killed run
            row = json.loads(line)
            if isinstance(row, dict) and int(row["step"]) <= step:
                keep.append(line + "\n")
    if len(keep) < len(lines):
        text = "".join(keep).encode()
        atomic_write(path, lambda f: f.write(text))
    return len(lines) - len(keep)


class RunLogger:
    """One run's scalars and media to wandb and OUT/metrics.jsonl, whose rows after ``start_step`` are dropped."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        mode: str = "online",
        project: str = "dit-flow-matching",
        name: str | None = None,
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        start_step: int | None = None,
    ):
        self.out_dir, self.enabled, self.mode, self.run, self.run_id = Path(out_dir), enabled, mode, None, run_id
        self._warned: set[str] = set()
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_path = self.out_dir / "metrics.jsonl"
        if start_step is not None:
            truncate_metrics(self._metrics_path, start_step)
        if mode == "disabled":
            return
        import wandb

        if mode == "online" and not _has_wandb_credentials(wandb):
            mode = "offline"
            warn("wandb has no credentials (WANDB_API_KEY or `wandb login`); logging offline instead")
        wandb_dir = Path(os.environ.get("WANDB_DIR") or self.out_dir)
        which_run = dict(project=project, name=name, config=config, id=run_id, resume="allow" if run_id else None)
        for attempt in ("online", "offline") if mode == "online" else (mode,):
            try:
                wandb_dir.mkdir(parents=True, exist_ok=True)
                # tqdm's carriage returns make captured console logs unreadable; metrics are logged explicitly.
                self.run = wandb.init(
                    dir=str(wandb_dir), mode=attempt, settings=wandb.Settings(console="off"), **which_run
                )
                break
            except Exception as e:  # e.g. no network: an online run falls back to an offline one
                warn(f"wandb could not start {attempt} ({type(e).__name__}: {e})")
        if self.run is None:
            warn(f"logging to {self._metrics_path} only")
            return
        self.mode, self.run_id = attempt, self.run.id
        if self.mode == "offline":
            folder = Path(self.run.dir).parent
            print(f"wandb: offline run in {folder}; upload it later with:", flush=True)
            print(f"wandb:   wandb sync {folder}", flush=True)

    def _guard(self, kind: str, fn) -> None:
        try:
            fn()
        except Exception as e:
            if kind not in self._warned:
                self._warned.add(kind)
                warn(f"logging {kind} failed ({type(e).__name__}: {e}); training continues")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return

        def write() -> None:
            row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
            with open(self._metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

        self._guard("metrics file", write)
        if self.run is not None:
            self._guard("wandb scalars", lambda: self.run.log(dict(metrics), step=step))

    def log_media(self, step: int, images: dict[str, tuple[Path, str]], videos: dict[str, tuple[Path, str]]) -> None:
        """PNGs and GIFs already saved, {wandb name: (path, caption)}."""
        if self.run is None:
            return
        import wandb

        def log() -> None:
            media = {k: wandb.Image(str(p), caption=c) for k, (p, c) in images.items()}
            media.update({k: wandb.Video(str(p), caption=c, format="gif") for k, (p, c) in videos.items()})
            self.run.log(media, step=step)

        self._guard("wandb media", log)

    def finish(self) -> None:
        if self.run is not None:
            self._guard("wandb finish", self.run.finish)
            self.run = None
