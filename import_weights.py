"""Import a published flow network in DiT's layout as a checkpoint of this project (docs/published.md).

    python import_weights.py sit SiT-XL-2-256x256.pt --out sit-xl2.pt      # willisma/SiT
    python import_weights.py repa last.pt --out repa-xl2.pt                # sihyun-yu/REPA, 4M iterations
    python sampler.py --ckpt sit-xl2.pt --steps 250 --cfg-scale 1.5 --n 16 # its SDE, guidance on 3 channels

The size is read from the tensors, the heads from DiT's size of that width (or --num-heads); the format is named,
not guessed (``dit`` is refused). REPA's time runs from data to noise: its network is built with ``reverse_time``."""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.dit import DIT_SIZES, DiT
from models.vae import DEFAULT_VAE, LatentSpace
from utils.checkpoint import damage, save_checkpoint
from utils.config import Config, ConfigError, arg, build_parser, script_exit

REPOS = {"sit": "willisma/SiT", "repa": "sihyun-yu/REPA"}
# SiT's sample_ddp.py SDE --cfg-scale 1.5 and REPA's generate.py --mode sde --cfg-scale 1.8 --guidance-high 0.7 (its
# t = 0.7 is 0.3 here): 250 steps, w(t) = 2 (1 - t) (SiT's "sigma", REPA's 2 t), the last 0.04 noise-free.
SDE = dict(method="sde", steps=250, sde_diffusion="sigma", sde_norm=1.0, last_step="mean", last_step_size=0.04)
PROTOCOLS = {
    "sit": SDE | dict(cfg_scale=1.5, guidance_interval=(0.0, 1.0), guidance_channels=3),
    "repa": SDE | dict(cfg_scale=1.8, guidance_interval=(0.3, 1.0), guidance_channels=None),
}


@dataclass(kw_only=True)
class ImportConfig(Config):
    """Which file, in which format, to which checkpoint (``format`` and ``path``: the positional arguments)."""

    format: str = ""
    path: str = ""
    out: str = arg(None, "the checkpoint to write", required=True)
    num_heads: int | None = arg(None, "attention heads (default: those of DiT's size of this hidden width)", min=1)
    overwrite: bool = arg(False, "replace OUT if it exists")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a released file (a plain state dict) or of a training checkpoint (its "ema")."""
    if not path.is_file():
        raise ConfigError(f"no file {path}")
    try:  # training checkpoints of SiT and REPA also hold their argparse arguments: a plain Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        load = f"torch.load('{path}', weights_only=False)['ema']"
        raise ConfigError(
            f"cannot read {path} safely ({damage(path, e)}); if it is a training checkpoint you trust, extract its "
            f"EMA weights first: python -c \"import torch; torch.save({load}, 'ema.pt')\""
        ) from None
    state = state.get("ema", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no state dict (a dict of tensors, or one under 'ema')")
    return state


def infer_config(sd: dict[str, torch.Tensor], fmt: str, num_heads: int | None) -> dict[str, Any]:
    """The DiT arguments of a state dict in SiT's (or REPA's) layout; ConfigError naming what does not fit."""
    keys = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    if missing := [k for k in (*keys, "blocks.0.mlp.fc1.weight") if k not in sd]:
        raise ConfigError(f"not a {fmt} state dict in DiT's layout: no {', '.join(missing)} (keys: {listed(sd)})")
    (hidden, channels, patch, _), tokens = sd[keys[0]].shape, sd["pos_embed"].shape[1]
    heads = num_heads or {d: h for d, _, h in DIT_SIZES.values()}.get(hidden)
    if heads is None:
        raise ConfigError(f"hidden size {hidden} is not one of DiT's named sizes: give its --num-heads")
    out = sd[keys[3]].shape[0] // patch**2
    if out not in (channels, 2 * channels) or math.isqrt(tokens) ** 2 != tokens:
        raise ConfigError(f"{out} output channels for {channels} inputs, {tokens} tokens: not DiT's layout")
    if fmt == "repa" and out > channels:
        raise ConfigError("a learned sigma, which REPA's SiT never has: import a SiT checkpoint as sit")
    size = dict(input_size=math.isqrt(tokens) * patch, patch_size=patch, in_channels=channels, hidden_size=hidden)
    size |= dict(depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), num_heads=heads)
    size |= dict(mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, num_classes=sd[keys[2]].shape[0] - 1)
    fixed = dict(num_registers=0, qk_norm=False, time_scale=1.0, reverse_time=fmt == "repa", learn_sigma=out > channels)
    return size | fixed | dict(guidance_channels=PROTOCOLS[fmt]["guidance_channels"])  # null class: the last row


def listed(keys: Any) -> str:
    return ", ".join(sorted(keys)[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def convert(sd: dict[str, torch.Tensor], fmt: str, num_heads: int | None) -> tuple[DiT, list[str]]:
    """This project's DiT holding the weights of sd, and the keys left out (pos_embed, REPA's projectors)."""
    model = DiT(**infer_config(sd, fmt, num_heads))
    ignored = [k for k in sd if k == "pos_embed" or (fmt == "repa" and k.startswith("projectors."))]
    weights = {k: v.float() for k, v in sd.items() if k not in ignored}
    expected = model.state_dict()
    if (missing := expected.keys() - weights.keys()) | (extra := weights.keys() - expected.keys()):
        hint = "; REPA's projectors: import it as repa" if any(k.startswith("projectors.") for k in extra) else ""
        raise ConfigError(f"not the {fmt} layout: no {listed(missing) or '-'}; unknown {listed(extra) or '-'}{hint}")
    if wrong := [k for k in expected if expected[k].shape != weights[k].shape]:
        raise ConfigError(f"shapes that do not fit: {', '.join(f'{k} {tuple(weights[k].shape)}' for k in wrong[:4])}")
    if not torch.allclose(sd["pos_embed"].float().reshape(model.pos_embed.shape), model.pos_embed, atol=1e-5):
        raise ConfigError("pos_embed is not the fixed 2-D sin-cos embedding of DiT and SiT")
    model.load_state_dict(weights)
    return model, ignored


def main(cfg: ImportConfig) -> Path:
    if cfg.format == "dit":
        raise ConfigError("DiT's networks predict the noise with a learned variance (DDPM); this project samples flows")
    if cfg.format not in REPOS:
        raise ConfigError(f"unknown format {cfg.format!r}; choose from sit, repa")
    path, out = Path(cfg.path), Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    model, ignored = convert(read_state_dict(path), cfg.format, cfg.num_heads)
    c, size = model.in_channels, model.input_size
    if model.learn_sigma and model.final_layer.linear.weight.unflatten(0, (-1, 2 * c))[:, c:].any():
        print("note: trained learned-sigma outputs, as in DiT's epsilon networks (SiT's stay 0)", file=sys.stderr)
    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    space = LatentSpace(DEFAULT_VAE, None, "config", (0.0,) * c, (0.18215,) * c, 8 * size, 3, (c, size, size))
    sd, protocol = model.state_dict(), PROTOCOLS[cfg.format]
    source = dict(repository=REPOS[cfg.format], file=path.name, sha256=sha256, ignored_keys=ignored)
    state = dict(model_config=model.config, model=sd, ema=sd, step=None, latent_space=space.to_dict())
    save_checkpoint(state | dict(sample_method="sde", sampling=protocol, source=source), out)
    print(f"{REPOS[cfg.format]} {path.name} -> {out}: {model.config}; published protocol: {protocol}")
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: bad input is one line on stderr and exit 2 (an OSError, e.g. a full disk: exit 1)."""
    parser = build_parser(ImportConfig, "import_weights.py", __doc__.split("\n\n")[0])
    parser.add_argument("format", help="sit (willisma/SiT) or repa (sihyun-yu/REPA)")
    parser.add_argument("path", help="the released state dict, or a training checkpoint holding one under 'ema'")
    try:
        main(ImportConfig(**vars(parser.parse_args(argv))))
    except (ConfigError, OSError) as e:
        return script_exit("import_weights.py", e).code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
