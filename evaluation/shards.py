"""A sample batch drawn in shards by any number of processes, resumable to the same bytes: shard s holds samples
[s B, (s + 1) B), B = batch_size, and sample i's noise and label depend only on (seed, i), so the shards do not
depend on how many processes drew them. ``settings.json`` records what decides the images."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.fid import balanced_samples
from evaluation.images import to_uint8
from sampling.sampler import Sampler
from utils.config import ConfigError
from utils.distributed import DistInfo, all_gather_object, first_then_others
from utils.io import atomic_write, write_json_atomic


def open_folder(folder: Path, settings: dict[str, Any], overwrite: bool, is_main: bool) -> None:
    """Create the shard folder with its settings, or check that it holds these (``overwrite``: start again empty)."""
    settings = json.loads(json.dumps(settings))
    with first_then_others(is_main):
        path = folder / "settings.json"
        old = json.loads(path.read_text()) if path.is_file() else settings
        if old != settings and not overwrite:
            changed = [f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
            raise ConfigError(
                f"{folder} holds samples of other settings ({'; '.join(changed)}); pass --overwrite to start again"
            )
        if is_main and old != settings:
            shutil.rmtree(folder)
        if is_main and not path.is_file():
            write_json_atomic(settings, path)


def shard_path(folder: Path, start: int) -> Path:
    return folder / f"{start:08d}.npz"


def draw_shards(
    sampler: Sampler,
    folder: Path,
    num_samples: int,
    seed: int,
    batch_size: int,
    dist: DistInfo,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
) -> None:
    """Draw this process's share of the missing shards (uint8 (b, H, W, 3) and the NFE each); a collective."""
    starts = [s for s in range(0, num_samples, batch_size) if not shard_path(folder, s).is_file()]
    starts = all_gather_object(starts)[0]  # the main process's list: each shard is drawn by one process
    done = num_samples - sum(min(batch_size, num_samples - s) for s in starts)
    bar = tqdm(total=num_samples, initial=done, desc="sampling", unit="img", disable=not progress, dynamic_ncols=True)
    for start in starts[dist.rank :: dist.world_size]:
        idx = range(start, min(start + batch_size, num_samples))
        out = balanced_samples(sampler, idx, seed, batch_size=len(idx), should_stop=should_stop)
        images = to_uint8(out.images)  # (b, H, W, C)
        images = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images  # ADM's evaluator reads RGB
        atomic_write(shard_path(folder, start), lambda f, im=images, n=out.nfe: np.savez(f, images=im, nfe=n))
        bar.update(min(len(idx) * dist.world_size, num_samples - bar.n))  # the others draw as many meanwhile
    bar.close()


def read_shards(folder: Path, num_samples: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """The finished shards in order: images (b, H, W, 3) uint8 and the NFE of each."""
    for start in range(0, num_samples, batch_size):
        with np.load(shard_path(folder, start)) as f:
            yield f["images"], int(f["nfe"])
