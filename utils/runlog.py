"""Run logging: a wandb wrapper that never prompts and never stops training, and OUT/metrics.jsonl, written whatever
the wandb mode. Images and GIFs are logged from files already under OUT/samples/. Each kind of wandb failure prints one
warning and training goes on.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from utils.io import atomic_write

WANDB_MODES = ("online", "offline", "disabled")


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _has_wandb_credentials(wandb) -> bool:
    """Whether wandb could log in without asking anyone (an API key in the environment, settings or .netrc)."""
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
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):  # e.g. half a line written when the run was killed
            ok = False
        if ok:
            keep.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        text = "".join(keep).encode()
        atomic_write(path, lambda f: f.write(text))
    return dropped


class RunLogger:
    """Logs one run's scalars, images and videos to wandb and OUT/metrics.jsonl. 'online' without credentials falls
    back to 'offline'; ``enabled`` is False on ranks that log nothing; ``run_id`` continues a wandb run. Rows of
    metrics.jsonl after ``start_step`` (logged by a run that died after its checkpoint) are dropped."""

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
        for attempt in ("online", "offline") if mode == "online" else (mode,):
            try:
                wandb_dir.mkdir(parents=True, exist_ok=True)
                self.run = wandb.init(
                    project=project,
                    name=name,
                    config=config,
                    dir=str(wandb_dir),
                    mode=attempt,
                    id=run_id,
                    resume="allow" if run_id else None,
                    # tqdm's carriage returns make captured console logs unreadable; metrics are logged explicitly.
                    settings=wandb.Settings(console="off"),
                )
                break
            except Exception as e:  # e.g. no network: an online run falls back to an offline one
                warn(f"wandb could not start {attempt} ({type(e).__name__}: {e})")
        if self.run is None:
            warn(f"logging to {self._metrics_path} only")
            return
        self.mode, self.run_id = attempt, self.run.id
        if self.mode == "offline":
            print(f"wandb: offline run in {self.wandb_dir}; upload it later with:", flush=True)
            print(f"wandb:   wandb sync {self.wandb_dir}", flush=True)

    @property
    def wandb_dir(self) -> Path | None:
        """The wandb run folder (holding files/media/...), or None without wandb."""
        return Path(self.run.dir).parent if self.run is not None else None

    def _guard(self, kind: str, fn) -> None:
        try:
            fn()
        except Exception as e:
            if kind not in self._warned:
                self._warned.add(kind)
                warn(f"logging {kind} failed ({type(e).__name__}: {e}); training continues")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at a training step, to metrics.jsonl and wandb."""
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
        """Images (PNG) and animations (GIF) saved as files, by wandb name, each with a caption."""
        if self.run is None:
            return
        import wandb

        def log() -> None:
            media = {k: wandb.Image(str(p), caption=c) for k, (p, c) in images.items()}
            media.update({k: wandb.Video(str(p), caption=c, format="gif") for k, (p, c) in videos.items()})
            self.run.log(media, step=step)

        self._guard("wandb media", log)

    def finish(self) -> None:
        """Close the wandb run (flushes offline files)."""
        if self.run is not None:
            self._guard("wandb finish", self.run.finish)
            self.run = None
