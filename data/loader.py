"""BatchStream: the endless, resumable, rank-sharded stream of augmented training batches, a pure function of
(seed, epoch, position): rank r takes every world_size-th entry of the epoch's permutation (DistributedSampler,
drop_last), so {"epoch", "index"} resumes it bit for bit, from a DataLoader or ``on_device``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from data.base import DataError, ImageDataset, pixel_batch

EPOCH_SEED_STRIDE = 1_000_003  # seed * stride + epoch: no two (seed, epoch) pairs share a permutation (epoch < stride)


def _worker_error(e: DataError) -> DataError:
    """A worker's DataError without the traceback DataLoader puts in its message."""
    text = str(e)
    if not text.startswith("Caught "):
        return e
    last = [line for line in text.splitlines() if line.strip()][-1]
    return DataError(last.partition("DataError: ")[2] or last)


class BatchStream:
    """Batches x float32 (B, C, H, W) in [-1, 1] and y int64 (B,) on ``device``; ``batch_size`` is per rank.
    ``with_images`` adds the clean images of the same views, float32 (B, C, H, W) in [0, 1], for REPA's encoder: the
    pixels themselves, or a latent dataset's stored crops (read from its shards, so not ``on_device``)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        flip: bool = True,
        on_device: bool = False,
        num_workers: int = 0,
        with_images: bool = False,
    ) -> None:
        num_workers = usable_workers(num_workers)
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, int(seed), rank
        self.world_size, self.device, self.flip, self.on_device = world_size, torch.device(device), flip, on_device
        self.with_images = with_images
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.per_rank = self.num_samples // world_size
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the dataset has {self.num_samples} images, too few for one batch of {batch_size} "
                f"on each of {world_size} rank(s)"
            )
        self._epoch = self._index = 0
        self._plan_epoch: int | None = None
        self._order = torch.empty(0, dtype=torch.long)  # this rank's dataset indices for the epoch
        self._flips = torch.empty(0, dtype=torch.bool)  # flip bit per dataset index for the epoch
        self._iter: Iterator | None = None
        self._batch = dataset.training_batch if isinstance(dataset, ImageDataset) else pixel_batch
        if with_images and isinstance(dataset, ImageDataset) and dataset.latent_space() is not None:
            dataset.image(0)  # the dataset's one-line error when it keeps no images
            if on_device:
                raise DataError(
                    "the images beside latents are read from the memory-mapped shards, not held on the device: "
                    "pass on_device=False (train.py --no-data-on-device)"
                )
            dataset = _WithImages(dataset)  # items (latents, label, uint8 crop)
        if on_device:
            self._images, self._labels = (a.to(self.device) for a in _materialize(dataset, num_workers))
        else:
            self._batches: list[list[int]] = []  # the batch sampler: the epoch's remaining batches, set in place
            self._loader = DataLoader(
                dataset,
                batch_sampler=self._batches,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=num_workers > 0,  # workers survive epoch ends and resumes
                # Worker seeds come from a private generator, so the stream never draws from (and shifts) the
                # global RNG that training randomness uses; exact resume depends on that.
                generator=torch.Generator().manual_seed(seed),
            )

    @property
    def epoch(self) -> int:
        return self._epoch

    def _plan(self, epoch: int) -> None:
        """Draw the epoch's permutation and flips (the same on every rank); keep this rank's slice."""
        if self._plan_epoch == epoch:
            return
        g = torch.Generator().manual_seed((self.seed * EPOCH_SEED_STRIDE + epoch) % 2**64)
        perm = torch.randperm(self.num_samples, generator=g)
        flips = torch.rand(self.num_samples, generator=g) < 0.5
        order = perm[: self.per_rank * self.world_size][self.rank :: self.world_size]
        self._order = order[: self.steps_per_epoch * self.batch_size]
        self._flips = flips if self.flip else torch.zeros_like(flips)
        if self.on_device:
            self._order_dev = self._order.to(self.device)
            self._flips_dev = self._flips.to(self.device)
        self._plan_epoch = epoch

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self._index >= self.steps_per_epoch:
            self._epoch += 1
            self._index = 0
            self._iter = None
        self._plan(self._epoch)
        lo, hi = self._index * self.batch_size, (self._index + 1) * self.batch_size
        non_blocking = self.device.type == "cuda"
        if self.on_device:
            idx = self._order_dev[lo:hi]
            x, y, crops = self._images[idx], self._labels[idx], []
            flip = self._flips_dev[idx]
        else:
            if self._iter is None:
                self._batches[:] = self._order[lo:].view(-1, self.batch_size).tolist()
                self._iter = iter(self._loader)
            try:
                x, y, *crops = next(self._iter)
            except DataError as e:
                raise _worker_error(e) from None
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            flip = self._flips[self._order[lo:hi]].to(self.device, non_blocking=non_blocking)
        self._index += 1
        batch = self._batch(x, flip), y.long()  # pixels: mirrored where flip, 0..255 -> [-1, 1]
        if not self.with_images:
            return batch
        u = crops[0].to(self.device, non_blocking=non_blocking) if crops else x  # uint8, not yet mirrored
        return *batch, torch.where(flip.view(-1, 1, 1, 1), u.flip(-1), u).float().div_(255)

    def state_dict(self) -> dict:
        """{"epoch", "index" (batches consumed in the epoch), "num_samples"}."""
        return {"epoch": self._epoch, "index": self._index, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() (of a dataset of another size: at the start of the next epoch)."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if self.resized_since(state):
            epoch, index = epoch + 1, 0
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise DataError(
                f"data state epoch={epoch} index={index} does not fit {self.steps_per_epoch} steps per epoch"
            )
        self._epoch, self._index = epoch, index
        self._iter = None  # the next batch restarts the loader at the new position

    def resized_since(self, state: dict) -> bool:
        """Whether state was saved over a dataset of another size (one without "num_samples" is taken as fit)."""
        return int(state.get("num_samples", self.num_samples)) != self.num_samples


class _WithImages(Dataset):
    """Items (sample, label, uint8 image) of a dataset that keeps its images beside its samples."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return *self.dataset[index], self.dataset.image(index)


def usable_workers(num_workers: int) -> int:
    """num_workers, but never more loader processes than this process may run on cores (DataLoader warns then)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(num_workers, cores)


def _materialize(dataset: Dataset, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All items (N, ...) and labels int64 (N,) in dataset order: the dataset's own tensors, else gathered once."""
    whole = dataset.tensors() if isinstance(dataset, ImageDataset) else None
    if whole is not None:
        return whole[0], whole[1].long()
    xs, ys = [], []
    try:
        for x, y in DataLoader(dataset, batch_size=256, num_workers=num_workers):
            xs.append(x)
            ys.append(torch.as_tensor(y))
    except DataError as e:
        raise _worker_error(e) from None
    return torch.cat(xs), torch.cat(ys).long()
