"""Encode an image folder into VAE latents for latent DiT training: both flips, safetensors shards and an index.

    python extract_latents.py --data-path /imagenet/train --image-size 256 --out latents/imagenet256
    torchrun --nproc_per_node 8 extract_latents.py --data-path /imagenet/train --image-size 256 --out latents/imagenet256
    python train.py --dataset latents --data-path latents/imagenet256 --model DiT-XL/2     # then train on them

The same command resumes a stopped extraction to the same bytes (docs/latents.md)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.base import DataError
from data.folder import ImageFolderDataset
from data.latents import (
    FORMAT,
    INDEX,
    PREPROCESSING,
    damaged_shards,
    file_sha256,
    map_tensor,
    record_digest,
    recorded_digest,
    safetensors_header,
    shard_name,
)
from data.loader import _worker_error, usable_workers
from models.vae import DEFAULT_VAE, NORMALIZATIONS, LatentCodec, LatentSpace, VAEError, load_autoencoder
from utils.config import Config, ConfigError, arg, parse, script_exit
from utils.device import PRECISIONS
from utils.distributed import DistInfo, PeerError, all_ok, cleanup, first_then_others, init_distributed
from utils.io import atomic_write, write_json_atomic
from utils.preemption import EXIT_CODES, SetupInterrupted, signals_end_setup
from utils.runfolder import LOCK_NAME, hold_run_folder

SETTINGS = "extraction.json"


@dataclass(kw_only=True)
class ExtractConfig(Config):
    """The settings of an extraction; those that change the bytes of a shard are checked on a rerun."""

    data_path: str = arg(None, "folder of class sub-folders of images (ImageNet's train/)", required=True, group="data")
    out: str = arg(None, "folder for the shards and index.json", required=True)
    image_size: int = arg(256, "side of the centre crop in pixels (a multiple of the VAE's downsampling, 8)", min=8)
    vae: str = arg(DEFAULT_VAE, "diffusers AutoencoderKL: a hub id or a local folder (save_pretrained)", group="VAE")
    vae_revision: str | None = arg(None, "hub revision of --vae (default: the newest)")
    normalization: str = arg(
        "config",
        "config (the VAE's scaling_factor) or stats (per-channel mean and std, LightningDiT)",
        choices=NORMALIZATIONS,
    )
    precision: str = arg("auto", "VAE precision: auto is bf16 on CUDA, fp32 elsewhere", choices=PRECISIONS)
    shard_size: int = arg(10_000, "images per shard", min=1, group="run")
    batch_size: int = arg(64, "images per VAE batch (each also encoded mirrored)", min=1)
    num_workers: int = arg(8, "image decoding processes", min=0)
    device: str = arg("auto", "auto: cuda:LOCAL_RANK when available", choices=("auto", "cpu", "cuda"))
    progress: bool = arg(True, "show a progress bar")
    verify: bool = arg(False, "hash every shard already there against its record (else one unchanged since is trusted)")
    images: bool = arg(False, "also store each image's uint8 centre crop (the clean image REPA's encoder sees)")


def digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder whose extraction had other settings (naming them); record them in a fresh one."""
    path = out / SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"{path} is damaged; remove {out} or choose another --out") from None
        keys = [*settings, *(old.keys() - settings.keys())]
        changed = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in keys if old.get(k) != settings.get(k)]
        if changed:
            raise ConfigError(
                f"{out} holds latents of other settings ({'; '.join(changed)}); choose another --out or remove it"
            )
        return
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no {SETTINGS}; choose an empty or new --out")
    write_json_atomic(settings, path)


def shard_damage(path: Path, key: str, count: int) -> str | None:
    """Why a shard cannot be kept, or None: of these settings, count latents, the size its header gives."""
    try:
        header, start = safetensors_header(path)
        if header.get("__metadata__", {}).get("settings") != key or header["labels"]["shape"] != [count]:
            return "it holds other latents"
        end = start + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        return None if path.stat().st_size == end else f"it has {path.stat().st_size} bytes, its header says {end}"
    except (DataError, KeyError, OSError, TypeError, ValueError):
        return "its header is damaged"


def kept_shards(out: Path, counts: dict[int, int], key: str, rehash: bool) -> set[int]:
    """The shards of counts ({shard: latents}) already whole in out; says which are damaged (encoded again)."""
    there = {k: out / shard_name(k) for k in counts if (out / shard_name(k)).is_file()}
    bad = {k: why for k, path in there.items() if (why := shard_damage(path, key, counts[k]))}
    try:  # an index of these settings lists the sha256 of shards written before the records beside them existed
        index = json.loads((out / INDEX).read_text())
        listed = {s["file"]: s["sha256"] for s in index["shards"]} if index.get("settings") == key else {}
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    expected = {p: None if recorded_digest(p)[0] else listed.get(p.name) for k, p in there.items() if k not in bad}
    hashed = damaged_shards(expected, rehash)
    bad |= {k: hashed[p] for k, p in there.items() if p in hashed}
    if bad:
        names = "; ".join(f"{shard_name(k)}: {why}" for k, why in sorted(bad.items()))
        print(f"extract_latents.py: encoding {len(bad)} shard(s) again ({names})", flush=True)
    return set(there) - set(bad)


@torch.no_grad()
def encode_shard(
    codec: LatentCodec, dataset: ImageFolderDataset, first: int, count: int, cfg: ExtractConfig, bar: tqdm
) -> dict[str, torch.Tensor]:
    """One shard's tensors; its batches start at its first image, so a rerun writes the same bytes."""
    subset = torch.utils.data.Subset(dataset, range(first, first + count))
    loader = torch.utils.data.DataLoader(subset, batch_size=cfg.batch_size, num_workers=usable_workers(cfg.num_workers))
    latents, labels, crops = [], [], []
    with signals_end_setup(deferred=True):
        batches = iter(loader)  # starts the loader's workers
    try:
        for images, y in batches:
            x = images.float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]
            z = codec.encode(torch.cat([x, x.flip(-1)])).cpu()  # (2b, C, h, w): the images, then their mirrors
            latents.append(torch.stack(z.chunk(2), dim=1).to(torch.float16))  # (b, 2, C, h, w)
            labels.append(y.long())
            if cfg.images:
                crops.append(images)  # uint8 (b, C, S, S)
            bar.update(len(y))
    except DataError as e:
        raise _worker_error(e) from None
    z = torch.cat(latents)
    sums = {"sum": z.double().sum((0, 1, 3, 4)), "sum_sq": z.double().square().sum((0, 1, 3, 4))}  # (C,) each
    stored = {"images": torch.cat(crops)} if cfg.images else {}
    return {"latents": z.contiguous(), "labels": torch.cat(labels), **sums, **stored}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Write a shard atomically, then the sha256 of its bytes beside it."""
    from safetensors.torch import save

    data = save(tensors, metadata={"settings": key})
    atomic_write(path, lambda f: f.write(data))
    record_digest(path, hashlib.sha256(data).hexdigest())


def write_index(
    out: Path, cfg: ExtractConfig, settings: dict[str, Any], classes: list[str], vae: Any, num_shards: int
) -> dict[str, Any]:
    """Merge the shards' statistics into index.json, with their recorded sha256; returns it."""
    total, total_sq, values, shards = 0.0, 0.0, 0, []
    for k in range(num_shards):
        path = out / shard_name(k)
        s, sq = map_tensor(path, "sum", np.float64), map_tensor(path, "sum_sq", np.float64)
        count = int(map_tensor(path, "labels", np.int64).shape[0])
        total, total_sq = total + np.asarray(s), total_sq + np.asarray(sq)
        values += count * 2 * math.prod(settings["latent_shape"][1:])
        sha256 = recorded_digest(path)[0] or file_sha256(path)  # checked by kept_shards, or just written
        shards.append(
            dict(file=path.name, first=k * cfg.shard_size, count=count, bytes=path.stat().st_size, sha256=sha256)
        )
    mean = total / values
    std = np.sqrt(np.maximum(total_sq / values - mean**2, 0.0))
    if cfg.normalization == "stats":
        shift, scale = mean.tolist(), (1.0 / np.maximum(std, 1e-12)).tolist()
    else:  # the VAE's own: its shift_factor (0 if none) and scaling_factor
        shift = [float(getattr(vae.config, "shift_factor", None) or 0.0)] * len(mean)
        scale = [float(vae.config.scaling_factor)] * len(mean)
    space = LatentSpace(
        vae=settings["vae"],
        revision=settings["revision"],
        normalization=cfg.normalization,
        shift=tuple(shift),
        scale=tuple(scale),
        image_size=cfg.image_size,
        image_channels=3,
        latent_shape=tuple(settings["latent_shape"]),
    )
    index = {
        "format": FORMAT,
        "count": sum(s["count"] for s in shards),
        "classes": classes,
        "flips": True,
        "dtype": "float16",
        "shard_size": cfg.shard_size,
        "shards": shards,
        "source": {"data_path": settings["source"], "images": settings["images"], "preprocessing": PREPROCESSING},
        "stats": {"mean": mean.tolist(), "std": std.tolist()},
        "latent_space": space.to_dict(),
        "settings": digest(settings),
        **({"images": True} if cfg.images else {}),  # the shards hold the centre crops
    }
    write_json_atomic(index, out / INDEX)
    return index


def main(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract (or finish extracting) the latents cfg describes; returns the index (on every process)."""
    dist = init_distributed(cfg.device)
    try:
        out = Path(cfg.out).expanduser()
        if out.resolve().is_relative_to(Path(cfg.data_path).expanduser().resolve()):
            raise ConfigError(f"--out {out} is inside --data-path {cfg.data_path}, where it would be a class folder")
        with hold_run_folder(out, dist.is_main):  # one extraction per folder
            index = extract(cfg, dist)
        if dist.distributed:  # leave the group together: gloo aborted a process whose peer tore down first
            torch.distributed.barrier()
        return index
    finally:
        cleanup()


def extract(cfg: ExtractConfig, dist: DistInfo) -> dict[str, Any]:
    out, device = Path(cfg.out).expanduser(), dist.device
    dataset = ImageFolderDataset(Path(cfg.data_path).expanduser(), cfg.image_size, 3)  # DataError: empty, missing
    local = Path(cfg.vae).expanduser()
    name = str(local.resolve()) if local.is_dir() else cfg.vae
    with first_then_others(dist.local_rank == 0):  # one process per node downloads the weights
        vae = load_autoencoder(name, cfg.vae_revision, device)
    commit = None if local.is_dir() else getattr(vae.config, "_commit_hash", None)  # the hub commit diffusers recorded
    f = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling: 8 for SD-VAE
    if cfg.image_size % f:
        raise ConfigError(f"--image-size {cfg.image_size} is not a multiple of the VAE's downsampling {f}")
    latent_shape = (int(vae.config.latent_channels), cfg.image_size // f, cfg.image_size // f)
    codec = LatentCodec(vae, [0.0] * latent_shape[0], [1.0] * latent_shape[0], cfg.batch_size, cfg.precision)
    settings = {  # what a shard's bytes depend on (OUT/extraction.json): a rerun must have the same
        "format": FORMAT,
        "source": str(Path(cfg.data_path).expanduser().resolve()),
        "images": len(dataset),
        "source_fingerprint": dataset.fingerprint(),
        "image_size": cfg.image_size,
        "preprocessing": PREPROCESSING,
        "vae": name,
        "revision": str(commit) if commit else cfg.vae_revision,
        "latent_shape": list(latent_shape),
        "dtype": "float16",
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "precision": codec.precision,
        **({"store_images": True} if cfg.images else {}),  # absent without --images: older folders keep their digest
    }
    key = digest(settings)
    error: Exception | None = None
    if dist.is_main:
        try:
            check_settings(out, settings)
        except (ConfigError, OSError) as e:
            error = e
    if not all_ok(error is None):
        raise error or PeerError("rank 0 refused the output folder")
    n, size = len(dataset), cfg.shard_size
    num_shards = -(-n // size)
    counts = {k: min(size, n - k * size) for k in range(dist.rank, num_shards, dist.world_size)}
    try:  # an error on any process must reach every process before rank 0 waits for the shards
        mine = sorted(set(counts) - kept_shards(out, counts, key, cfg.verify))
        todo = sum(counts[k] for k in mine)
        if dist.is_main and len(mine) < len(counts):
            of = f"rank 0's {len(counts)}" if dist.world_size > 1 else num_shards
            print(f"extract_latents.py: {len(counts) - len(mine)} of {of} shards already in {out}; encoding the rest")
        desc = f"encoding{'' if dist.world_size == 1 else f' (rank 0 of {dist.world_size})'}"
        progress = cfg.progress and dist.is_main
        with tqdm(total=todo, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            started = time.perf_counter()
            for k in mine:
                write_shard(out / shard_name(k), encode_shard(codec, dataset, k * size, counts[k], cfg, bar), key)
    except (DataError, OSError) as e:
        error = e
    if not all_ok(error is None):
        raise error or PeerError("another process failed")
    index = None
    if dist.is_main:
        index = write_index(out, cfg, settings, dataset.classes, vae, num_shards)
        took = time.perf_counter() - started
        rate = f", {todo / took:.1f} img/s" if todo and took > 0 else ""
        print(
            f"{index['count']} images ({len(dataset.classes)} classes) as {num_shards} shards of "
            f"2 x {'x'.join(map(str, latent_shape))} float16 latents in {out}{rate}; normalization "
            f"{cfg.normalization}; train with: python train.py --dataset latents --data-path {out}"
        )
    all_ok(True)  # the others wait for the index
    return index if index is not None else json.loads((out / INDEX).read_text())


def parse_args(argv: list[str] | None = None) -> ExtractConfig:
    return parse(ExtractConfig, argv, "extract_latents.py", __doc__.split("\n\n")[0])


def cli(argv: list[str] | None = None) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        with signals_end_setup():
            main(parse_args(argv))
    except SetupInterrupted as e:
        kept = "the complete shards are kept: run the same command again to continue"
        if rank0:
            print(f"extract_latents.py: stopped by {e}; {kept}", file=sys.stderr)
        return EXIT_CODES[e.signum]
    except PeerError:
        return 1
    except (ConfigError, DataError, VAEError, OSError) as e:  # a ConfigError is the same on every rank: rank 0 says it
        if rank0 or not isinstance(e, ConfigError):
            return script_exit("extract_latents.py", e).code
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
