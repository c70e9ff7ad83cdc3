"""Post-hoc EMA: checkpoints of EMA lengths chosen after training, rebuilt from a run's snapshots (EDM2).

    python train.py --preset digits-quick --phema --phema-every 250 --out runs/digits   # writes runs/digits/phema
    python posthoc_ema.py runs/digits --sigma-rel 0.08 0.12 --out runs/digits/posthoc   # --sweep LO HI N, --step S
    python sampler.py --ckpt runs/digits/posthoc/phema-0002000-0.0800.pt

Each length is the least-squares combination (utils/phema.py) of the snapshots up to --step (default: the newest),
written as OUT_DIR/phema-STEP-SIGMA.pt, a checkpoint that loads as any other (docs/posthoc-ema.md)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.checkpoint import damage, save_checkpoint
from utils.config import Config, ConfigError, arg, build_parser, script_exit
from utils.phema import MAX_RESIDUAL, sigma_rel_to_gamma, solve


@dataclass(kw_only=True)
class PosthocConfig(Config):
    """What to rebuild from which run (``run``: OUT, the positional argument)."""

    run: str = ""
    sigma_rel: tuple[float, ...] = arg((), "EMA lengths to rebuild, as relative standard deviations (EDM2)")
    sweep: tuple[float, ...] = arg((), "and N lengths evenly spaced from LO to HI", nargs=3, metavar=("LO", "HI", "N"))
    step: int | None = arg(None, "rebuild the EMAs of this snapshot step (default: the newest)", min=1)
    out: str = arg(None, "folder for the checkpoints", required=True)
    overwrite: bool = arg(False, "replace checkpoints that exist")


def lengths(cfg: PosthocConfig) -> list[float]:
    """The lengths asked for, sorted, to 4 decimals (the file names')."""
    lo, hi, n = cfg.sweep or (0, 0, 0)
    if n != int(n) or n < (1 if cfg.sweep else 0):
        raise ConfigError(f"--sweep: N must be a whole number >= 1, got {n:g}")
    out = sorted({round(float(s), 4) for s in (*cfg.sigma_rel, *np.linspace(lo, hi, int(n)))})
    if not out:
        raise ConfigError("nothing to rebuild: give --sigma-rel and/or --sweep")
    [sigma_rel_to_gamma(s) for s in out]  # ConfigError outside (0, sqrt(1/12))
    return out


def snapshots(folder: Path, step: int | None) -> list[dict[str, Any]]:
    """The snapshots up to step (memory-mapped), oldest first; ConfigError for none, too few, or a mixed folder."""
    snaps = []
    for path in sorted(p for p in folder.glob("*.pt") if p.stem.isdigit()):
        try:
            snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ConfigError(f"cannot read snapshot {path}: {damage(path, e)}") from None
        if not isinstance(snap, dict) or not {"step", "sigma_rels", "run_id", "model_config", "ema"} <= snap.keys():
            raise ConfigError(f"{path} is not a snapshot of train.py --phema")
        for key, what in (("model_config", "model"), ("run_id", "run"), ("sigma_rels", "run")):
            if snaps and snap[key] != snaps[0][key]:
                raise ConfigError(f"{path} is a snapshot of another {what} than {snaps[0]['path']} ({key})")
        snaps.append(snap | {"path": path})
    if not snaps:
        raise ConfigError(f"no snapshots in {folder}: train.py writes them with --phema")
    if step is not None and step not in [s["step"] for s in snaps]:
        raise ConfigError(
            f"--step {step}: no snapshot of that step in {folder} ({snaps[0]['step']} to {snaps[-1]['step']})"
        )
    snaps = [s for s in snaps if step is None or s["step"] <= step]
    if len(snaps) < 2:
        raise ConfigError(f"too few snapshots: {len(snaps)} in {folder} up to step {snaps[-1]['step']}; 2 at least")
    return snaps


def main(cfg: PosthocConfig) -> list[Path]:
    """Write one checkpoint per length; returns their paths."""
    targets, snaps = lengths(cfg), snapshots(Path(cfg.run) / "phema", cfg.step)
    last, rels = snaps[-1], snaps[0]["sigma_rels"]
    step, paths = last["step"], [Path(cfg.out) / f"phema-{last['step']:07d}-{s:.4f}.pt" for s in targets]
    if not cfg.overwrite and (there := [p for p in paths if p.exists()]):
        raise ConfigError(f"{there[0]} exists; pass --overwrite to replace it")
    steps, sigma = [s["step"] for s in snaps for _ in rels], [r for _ in snaps for r in rels]
    coefs, residual = solve(steps, sigma, step, targets)
    if (residual > MAX_RESIDUAL).any():
        k, grid = int(np.argmax(residual > MAX_RESIDUAL)), np.linspace(0.005, 0.285, 57)
        ok = grid[solve(steps, sigma, step, grid)[1] <= MAX_RESIDUAL]
        raise ConfigError(
            f"sigma_rel {targets[k]:g}: the {len(snaps)} snapshots up to step {step} represent it only to a relative "
            f"residual of {residual[k]:.2f} (limit {MAX_RESIDUAL}); they represent "
            + (f"{ok.min():.3f} to {ok.max():.3f}" if len(ok) else "no length")
        )
    template = last["ema"][0]
    state = {k: last.get(k) for k in ("model_config", "config", "latent_space", "sample_method")}
    for s, path in enumerate(paths):  # one pass over the snapshots per length, one float64 sum in memory
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items()}
        for c, weights in zip(coefs[:, s], (w for snap in snaps for w in snap["ema"]), strict=True):
            torch._foreach_add_(list(acc.values()), [weights[k].double() for k in acc], alpha=float(c))
        ema = {k: acc[k].to(v.dtype) if v.is_floating_point() else v for k, v in template.items()}
        record = dict(sigma_rel=targets[s], step=step, snapshots=len(snaps), residual=float(residual[s]))
        save_checkpoint(state | {"model": ema, "ema": ema, "step": step, "phema": record}, path)
        print(f"sigma_rel {targets[s]:.4f} at step {step} (residual {residual[s]:.3f}): {path}")
    return paths


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: bad input is one line on stderr and exit 2 (an OSError, e.g. a full disk: exit 1)."""
    parser = build_parser(PosthocConfig, "posthoc_ema.py", __doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="OUT", help="the run folder (train.py's --out) whose phema/ to read")
    try:
        main(PosthocConfig(**vars(parser.parse_args(argv))))
    except (ConfigError, OSError) as e:
        return script_exit("posthoc_ema.py", e).code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
