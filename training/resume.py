"""What a training checkpoint holds, and the resume policy: which checkpoint fits which run, and what it restores.

A training checkpoint (``training_state``) is a dict of tensors and plain values:
    "model_config"     the DiT constructor arguments (``model.config``): DiT(**model_config) rebuilds the network
    "model", "ema"     the raw and the EMA weights (state dicts of that network)
    "ema_num_updates"  EMA updates applied so far (sets the EMA warm-up)
    "optimizer"        the AdamW state dict
    "step", "skipped_steps"  optimizer steps taken, and those skipped for a non-finite loss
    "config"           the resolved run config (as in OUT/config.json)
    "rng"              one ``utils.rng.rng_state`` per process, indexed by rank
    "data_state"       the data stream's position (data.loader.BatchStream)
    "world_size"       how many processes wrote it
    "wandb_id"         the wandb run to continue (or None)
    "latent_space"     a latent DiT's ``models.vae.LatentSpace`` as a dict (what decodes its samples); None for pixels
    "sample_method"    the method its objective samples with (``Objective.sample_method``)
    "phema"            with --phema only: the power-function EMAs (``utils.phema.PowerEMA.state_dict``)
An imported checkpoint (import_weights.py) holds "model_config", "ema", "latent_space", "sample_method", and
"sampling" (its published protocol) and "source" (where its weights came from)
Sampling needs only "model_config", "model"/"ema", "latent_space" and "sample_method"; a resume needs them all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from models import upgraded_config
from objectives import OBJECTIVES
from utils.checkpoint import TRAINING_KEYS, CheckpointError
from utils.config import ConfigError
from utils.device import unwrap_model

OPTIONAL_KEYS = ("latent_space", "sample_method")  # written by later versions; older checkpoints lack them
# Settings a resumed run must share with its checkpoint: they define the weights and the data stream.
RESUME_MUST_MATCH = ("dataset", "image_size", "channels", "flip", "batch_size", "seed", "objective", "recipe", "phema")
# The flag that sets a DiT argument, where it is not the argument's own name (--hidden-size for hidden_size).
MODEL_FLAGS = {
    "patch_size": "--model",
    "mlp_ratio": "--model",
    "class_dropout_prob": "--class-dropout",
    "mlp_type": "--mlp",
    "norm_type": "--norm",
    "input_size": "--image-size",
    "in_channels": "--channels",
    "num_classes": "--dataset",
    "repa_dim": "--repa-encoder",
}


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
        "sample_method": OBJECTIVES[config.get("objective", "flow")].sample_method,
    } | ({"phema": phema.state_dict()} if phema else {})


def upgraded_run_config(old: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's run config in today's terms: versions before objectives owned their flags kept them at the
    top level, so they are gathered into objective_args (then compared, and reported when they change)."""
    if "objective_args" in old or old.get("objective", "flow") not in OBJECTIVES:
        return old
    names = {f.name for f in dataclasses.fields(OBJECTIVES[old.get("objective", "flow")])}
    return {k: v for k, v in old.items() if k not in names} | {"objective_args": {k: old[k] for k in names if k in old}}


def differences(old: dict[str, Any], new: dict[str, Any], name: Any = lambda k: k) -> str:
    """'name old -> new' for every key whose value differs between two dicts, joined by '; '."""
    keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    return "; ".join(f"{name(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def check_resume(
    state: dict[str, Any],
    config: dict[str, Any],
    model_config: dict[str, Any],
    latent_space: dict[str, Any] | None = None,
) -> None:
    """CheckpointError unless state is a full training state; ConfigError, naming the flags, unless it fits this
    run's settings (and its latents: ``latent_space`` of the training data, None for pixels)."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"--resume: the checkpoint holds weights only, not a training state (no {missing[0]})")
    old_model = upgraded_config(state["model_config"])  # a checkpoint of an older version compares in today's terms
    if old_model != model_config:
        diff = differences(old_model, model_config, lambda k: MODEL_FLAGS.get(k, "--" + k.replace("_", "-")))
        raise ConfigError(f"--resume: the checkpoint's model differs from this run's: {diff}")
    bad = [
        f"{flag} {a} -> {b}"
        for key, flag, a, b in changed_settings(state["config"], config)
        if key in RESUME_MUST_MATCH
    ]
    if bad:
        raise ConfigError(f"--resume: these settings differ from the checkpoint's: {'; '.join(bad)}")
    if state.get("latent_space") != latent_space:  # the same model on other latents would learn nonsense
        diff = differences(state.get("latent_space") or {}, latent_space or {})
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
    """Load a checkpoint's weights, EMA, optimizer and data position into the run's objects. With another number
    of processes the data stream starts the next epoch and the generators are reseeded (``rng`` None)."""
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
