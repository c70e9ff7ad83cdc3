"""Checkpoints: the one module that writes and reads them (train.py, sampler.py, evaluate.py and the tests).

A training checkpoint is a dict of tensors and plain values:
    "model_config"     the DiT constructor arguments (``model.config``): DiT(**model_config) rebuilds the network
    "model"            the raw weights (a state dict)
    "ema"              the EMA weights (a state dict of the same network)
    "ema_num_updates"  EMA updates applied so far (int; sets the EMA warm-up)
    "optimizer"        the AdamW state dict
    "step"             optimizer steps taken (int)
    "skipped_steps"    steps whose update was skipped for a non-finite loss (int)
    "config"           the resolved run config (dict, as in OUT/config.json)
    "rng"              one ``utils.rng.rng_state`` per process, indexed by rank
    "data_state"       the data stream's position, {"epoch", "index", "num_samples"} (data.loader.BatchStream)
    "world_size"       how many processes wrote it
    "wandb_id"         the wandb run to continue (str or None)
    "latent_space"     for a latent DiT, what decodes its samples (``models.vae.LatentSpace`` as a dict: VAE id and
                       revision, shift and scale, shapes); absent or None for a pixel-space one
    "phema"            with --phema, the power-function EMAs (``utils.phema.PowerEMA.state_dict``); absent without
Only "model_config" and "model" (and "latent_space") are needed to sample; a resume needs them all.

Loading is safe: ``torch.load(weights_only=True)``, so a file that holds pickled python objects (which could
run code when unpickled) is refused with a CheckpointError.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
import torch.nn as nn

from models import DiT, model_from_config, upgraded_config
from utils.config import ConfigError
from utils.device import unwrap_model
from utils.io import atomic_write

TRAINING_KEYS = (
    "model_config",
    "model",
    "ema",
    "ema_num_updates",
    "optimizer",
    "step",
    "skipped_steps",
    "config",
    "rng",
    "data_state",
    "world_size",
    "wandb_id",
)
OPTIONAL_KEYS = ("latent_space",)  # written since latent datasets exist; older checkpoints lack them
# Settings a resumed run must share with its checkpoint: they define the weights and the data stream.
RESUME_MUST_MATCH = ("dataset", "image_size", "channels", "flip", "batch_size", "seed", "objective", "recipe", "phema")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a checkpoint of this project."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write state to path atomically: a process killed while writing leaves the previous file intact.

    A write that fails (a full disk) raises its OSError naming path, not the RuntimeError torch's zip writer turns
    it into ("[enforce fail at inline_container.cc] unexpected pos"), which says neither what nor where."""

    def write(f: BinaryIO) -> None:
        out = _WriteErrors(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None

    atomic_write(path, write)


class _WriteErrors:
    """A binary file that remembers the OSError of a failed write (torch.save's writer swallows it)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, whatever device saved it; CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or holding pickled objects the safe loader refuses to build
        raise CheckpointError(f"cannot read checkpoint {path}: {damage(path, e)}") from None
    if not isinstance(state, dict) or not {"model_config", "model"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project (needs keys model_config, model)")
    return state


def damage(path: Path, error: Exception) -> str:
    """What is wrong with a checkpoint file that torch.load refused, in words (torch's own message does not say
    that a file is cut short)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        return "the file is empty (0 bytes)"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # torch.save writes a zip; its index is at the end
        return f"the file is truncated ({size} bytes, the end of the archive is missing)"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return "not a file of tensors and plain values (it holds pickled objects, which are never loaded)"
    return f"not a file of tensors and plain values, or damaged ({type(error).__name__}, {size} bytes)"


def model_from_checkpoint(
    state: dict[str, Any] | str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
) -> DiT:
    """The DiT a checkpoint describes, with its EMA (default) or raw weights, in eval mode on device."""
    state = state if isinstance(state, dict) else load_checkpoint(state)
    if ema and state.get("ema") is None:
        raise CheckpointError("checkpoint holds no EMA weights; load the raw weights with ema=False")
    model = model_from_config(state["model_config"])
    try:
        model.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model config: {e}") from None
    return model.to(device).eval()


#################################################################################
#                          Training state: save and resume                      #
#################################################################################


def training_state(
    *,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    stream: Any,
    step: int,
    phema: Any = None,
    skipped_steps: int,
    config: dict[str, Any],
    rng: list[dict[str, Any]],
    world_size: int,
    wandb_id: str | None,
    latent_space: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of a training run (the keys of the module docstring)."""
    model = unwrap_model(model)
    return {
        "model_config": model.config,
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "ema_num_updates": ema.num_updates,
        "optimizer": optimizer.state_dict(),
        "step": step,
        "skipped_steps": skipped_steps,
        "config": config,
        "rng": rng,
        "data_state": stream.state_dict(),
        "world_size": world_size,
        "wandb_id": wandb_id,
        "latent_space": latent_space,
    } | ({"phema": phema.state_dict()} if phema else {})


def check_resume(
    state: dict[str, Any],
    config: dict[str, Any],
    model_config: dict[str, Any],
    latent_space: dict[str, Any] | None = None,
) -> None:
    """CheckpointError unless state is a full training state; ConfigError unless it fits this run's settings (and
    its latents: ``latent_space`` of the training data, None for pixels)."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"--resume: the checkpoint holds weights only, not a training state (no {missing[0]})")
    old_model = upgraded_config(state["model_config"])  # a checkpoint of an older version compares in today's terms
    if old_model != model_config:
        keys = [k for k in {**old_model, **model_config} if old_model.get(k) != model_config.get(k)]
        diff = "; ".join(f"{k} {old_model.get(k)!r} -> {model_config.get(k)!r}" for k in keys)
        raise ConfigError(f"--resume: the checkpoint's model differs from this run's: {diff}")
    bad = [
        f"{flag} {a} -> {b}"
        for key, flag, a, b in changed_settings(state["config"], config)
        if key in RESUME_MUST_MATCH
    ]
    if bad:
        raise ConfigError(f"--resume: these settings differ from the checkpoint's: {'; '.join(bad)}")
    old_space, space = state.get("latent_space"), latent_space
    if old_space != space:  # the same model on other latents (another VAE or normalisation) would learn nonsense
        keys = [k for k in {**(old_space or {}), **(space or {})} if (old_space or {}).get(k) != (space or {}).get(k)]
        diff = "; ".join(f"{k} {(old_space or {}).get(k)!r} -> {(space or {}).get(k)!r}" for k in keys)
        raise ConfigError(f"--resume: the checkpoint was trained on other latents than --data-path holds: {diff}")


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The settings of new that differ from old (run configs as train.py records them), as (key, flag, old value,
    new value) in the flags' spelling; an objective's own settings by their own flags. Settings the old config
    does not record (older versions) are left out, and so is --resume itself, which a resume always changes."""
    shown = lambda v: " ".join(map(str, v)) if isinstance(v, tuple | list) else str(v)  # noqa: E731
    out = []
    for key, value in new.items():
        if key == "resume" or key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):  # nested settings (objective_args)
            out += [
                (k, f"--{k.replace('_', '-')}", shown(old[key][k]), shown(v))
                for k, v in value.items()
                if k in old[key] and old[key][k] != v
            ]
        elif old[key] != value and not (isinstance(value, tuple | list) and list(old[key]) == list(value)):
            out.append((key, f"--{key.replace('_', '-')}", shown(old[key]), shown(value)))
    return out


class Resumed(NamedTuple):
    """What a resumed run continues from, besides the objects ``restore_training_state`` filled in."""

    step: int
    skipped_steps: int
    wandb_id: str | None
    rng: dict[str, Any] | None  # this process's generator states; None when the number of processes changed


def restore_training_state(
    state: dict[str, Any],
    *,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    stream: Any,
    rank: int,
    world_size: int,
    phema: Any = None,
) -> Resumed:
    """Load a checkpoint's weights, EMA, optimizer and data position into the run's objects.

    With another number of processes the epoch's split over them changes: the data stream starts the next epoch,
    and the generators are reseeded (``rng`` None)."""
    unwrap_model(model).load_state_dict(state["model"])
    ema.model.load_state_dict(state["ema"])
    ema.updates.fill_(state["ema_num_updates"])
    if phema is not None:
        phema.load_state_dict(state.get("phema"))
    optimizer.load_state_dict(state["optimizer"])
    same_split = state["world_size"] == world_size
    data = state["data_state"]
    stream.load_state_dict(data if same_split else {"epoch": data["epoch"] + 1, "index": 0})
    rng = state["rng"][rank] if same_split else None
    return Resumed(state["step"], state["skipped_steps"], state["wandb_id"], rng)


NUMBERED = re.compile(r"(\d{7,})\.pt")  # f"{step:07d}.pt"


def newest_readable(ckpt_dir: Path) -> tuple[Path, int] | None:
    """The numbered checkpoint of the highest step in ckpt_dir that loads as a full training state, with its step,
    or None: what to continue from when last.pt is damaged (read newest first; stops at the first good one)."""
    numbered = sorted(
        ((int(m.group(1)), p) for p in ckpt_dir.glob("*.pt") if (m := NUMBERED.fullmatch(p.name))), reverse=True
    )
    for _, path in numbered:
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            continue
        if all(k in state for k in TRAINING_KEYS):
            return path, int(state["step"])
    return None


def save_training_checkpoint(state: dict[str, Any], ckpt_dir: Path, keep: int) -> Path:
    """Write ckpt_dir/STEP.pt, point ckpt_dir/last.pt at it (a hard link renamed into place: atomic, no copy) and
    delete the numbered files beyond the ``keep`` newest (0 keeps all). Returns last.pt's path."""
    numbered, last = ckpt_dir / f"{state['step']:07d}.pt", ckpt_dir / "last.pt"
    save_checkpoint(state, numbered)
    tmp = ckpt_dir / f".last.pt.{os.getpid()}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(numbered, tmp)
        os.replace(tmp, last)
    except OSError:  # a file system without hard links: a second copy, written atomically as well
        save_checkpoint(state, last)
    prune_checkpoints(ckpt_dir, keep, state["step"])
    return last


def prune_checkpoints(ckpt_dir: Path, keep: int, step: int) -> list[Path]:
    """Delete numbered checkpoints of steps <= step except the ``keep`` newest; returns the deleted paths.

    keep=0 keeps all. Never deleted: the file last.pt is a hard link to (whatever its step), and files of later
    steps (left by a run rolled back to an earlier last.pt: not this run's to judge).
    """
    if keep <= 0:
        return []
    last = ckpt_dir / "last.pt"
    numbered = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := NUMBERED.fullmatch(p.name)))
    removed = []
    for _, path in [(n, p) for n, p in numbered if n <= step][:-keep]:
        if last.exists() and os.path.samefile(path, last):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
