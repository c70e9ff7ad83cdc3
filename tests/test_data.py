"""Tests for data/: datasets (fake CIFAR-10 on disk, image folders, digits) and BatchStream."""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from data import DATASETS, BatchStream, DataError, build_dataset
from data.datasets import TensorImageDataset

# ---------------------------------------------------------------------------------------------
# CIFAR-10 in torchvision's on-disk format, made by the test
# ---------------------------------------------------------------------------------------------

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every urlopen fails as it does without network; returns the list of URLs that were tried."""
    tried: list[str] = []

    def urlopen(request, *args, **kwargs):
        tried.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, np.ndarray, list[int], np.ndarray]:
    """ROOT/cifar-10-batches-py with 5 train batches of 4 images, a test batch of 3 and batches.meta.

    torchvision checks each file's md5 against the real CIFAR-10's; only those expected sums are
    patched (to the fake files' sums), so torchvision's own integrity check and loader run unchanged.
    """
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_data, train_labels, train_list = [], [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=4)]
        path = folder / f"data_batch_{i}"
        # Python 3 pickles need str keys: torchvision reads entry["data"] and entry["labels"]
        path.write_bytes(pickle.dumps({"data": data, "labels": labels, "batch_label": f"batch {i}"}, protocol=2))
        train_data.append(data)
        train_labels += labels
        train_list.append([path.name, _md5(path)])
    test_data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    test_path = folder / "test_batch"
    test_path.write_bytes(pickle.dumps({"data": test_data, "labels": [1, 2, 3]}, protocol=2))
    meta_path = folder / "batches.meta"
    meta_path.write_bytes(pickle.dumps({"label_names": LABEL_NAMES, "num_cases_per_batch": 4}, protocol=2))
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(test_path)]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": _md5(meta_path)})
    _no_network(monkeypatch)
    return tmp_path, np.concatenate(train_data), train_labels, test_data


@pytest.mark.parametrize("download", [False, True])
def test_cifar10_loads_fake_files_without_download(fake_cifar, download):
    root, data, labels, test_data = fake_cifar
    ds = build_dataset("cifar10", root=root, image_size=32, channels=3, download=download)
    assert len(ds) == 20 and ds.num_classes == 10 and ds.classes == LABEL_NAMES
    for i in (0, 7, 19):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
        # CIFAR rows are 1024 red, 1024 green, 1024 blue values in row-major order
        assert torch.equal(x, torch.from_numpy(data[i].reshape(3, 32, 32)))
        assert y == labels[i] and isinstance(y, int)
    test = build_dataset("cifar10", root=root, train=False, download=False)
    assert len(test) == 3 and torch.equal(test[2][0], torch.from_numpy(test_data[2].reshape(3, 32, 32)))
    assert [test[i][1] for i in range(3)] == [1, 2, 3]


def test_cifar10_channels_and_resize(fake_cifar):
    root, data, _, _ = fake_cifar
    with pytest.raises(DataError, match="CIFAR-10 has 3 channels; got --channels 1"):
        build_dataset("cifar10", root=root, channels=1, download=False)
    ds = build_dataset("cifar10", root=root, image_size=16, download=False)
    assert ds[0][0].shape == (3, 16, 16) and ds[0][0].dtype == torch.uint8
    # antialiased bilinear at scale 1/2: the triangle filter stretched to 4 pixels, weights [1, 3, 3, 1] / 8,
    # centred on each 2x2 block (away from the border, where the filter is cut and renormalised)
    full = data[0].reshape(3, 32, 32).astype(np.float64)
    k = np.array([1, 3, 3, 1]) / 8
    rows = np.stack([np.tensordot(full[:, 2 * i - 1 : 2 * i + 3], k, axes=([1], [0])) for i in range(1, 15)], 1)
    ref = np.stack([np.tensordot(rows[:, :, 2 * j - 1 : 2 * j + 3], k, axes=([2], [0])) for j in range(1, 15)], 2)
    assert np.abs(ds[0][0][:, 1:15, 1:15].numpy() - ref).max() <= 0.5 + 1e-3  # only uint8 rounding


def test_cifar10_archive_placed_by_hand_is_unpacked(fake_cifar, tmp_path_factory, monkeypatch):
    root, data, _, _ = fake_cifar
    other = tmp_path_factory.mktemp("hand")
    archive = other / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10, "tgz_md5", _md5(archive))
    ds = build_dataset("cifar10", root=other, download=False)
    assert len(ds) == 20 and torch.equal(ds[5][0], torch.from_numpy(data[5].reshape(3, 32, 32)))


def test_cifar10_download_failure_names_the_folder(tmp_path, monkeypatch):
    tried = _no_network(monkeypatch)
    root = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        build_dataset("cifar10", root=root, download=True)
    msg = str(info.value)
    assert tried, "the real torchvision download path should have been attempted"
    assert "\n" not in msg
    assert str(root.resolve() / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_dataset("cifar10", root=root, download=False)


def test_unknown_dataset_and_bad_settings():
    assert list(DATASETS) == ["cifar10", "folder", "digits", "latents"]
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose from cifar10, folder, digits, latents$"):
        build_dataset("mnist")
    with pytest.raises(DataError, match="channels"):
        build_dataset("digits", channels=2)
    with pytest.raises(DataError, match="image_size"):
        build_dataset("digits", image_size=0)
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    _png(root / "cat" / "a.png", rng.integers(0, 256, (10, 7, 3), dtype=np.uint8))  # portrait, RGB
    _png(root / "cat" / "b.png", rng.integers(0, 256, (30, 20), dtype=np.uint8))  # grayscale
    _png(root / "dog" / "c.png", np.full((12, 40, 3), (200, 50, 10), dtype=np.uint8))  # uniform colour
    _png(root / "zebra" / "deep" / "d.png", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))  # RGBA, nested
    (root / "zebra" / "notes.txt").write_text("not an image, ignored")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_sizes_channels_labels(image_folder, channels):
    ds = build_dataset("folder", root=image_folder, image_size=8, channels=channels)
    assert ds.classes == ["cat", "dog", "zebra"] and ds.num_classes == 3
    assert len(ds) == 4 and [ds[i][1] for i in range(4)] == [0, 0, 1, 2]
    for i in range(4):
        x, _ = ds[i]
        assert x.shape == (channels, 8, 8) and x.dtype == torch.uint8
    # a uniform image stays uniform through resize and crop; L = (299 R + 587 G + 114 B) / 1000
    x = ds[2][0]
    expected = [200, 50, 10] if channels == 3 else [round((299 * 200 + 587 * 50 + 114 * 10) / 1000)]
    assert torch.equal(x, torch.tensor(expected, dtype=torch.uint8).view(-1, 1, 1).expand(channels, 8, 8))


def test_image_folder_center_crop_is_exact(tmp_path):
    # H=8, W=16: the shorter side is already 8, so the result is columns 4..11 pixel for pixel
    h, w = np.meshgrid(np.arange(8), np.arange(16), indexing="ij")
    array = np.stack([w * 15, h * 30, (w + h) * 5], axis=-1).astype(np.uint8)
    _png(tmp_path / "only" / "x.png", array)
    _png(tmp_path / "only" / "tall.png", array.transpose(1, 0, 2).copy())  # H=16, W=8: rows 4..11
    ds = build_dataset("folder", root=tmp_path, image_size=8, channels=3)
    tall, wide = ds[0][0], ds[1][0]  # files are sorted: tall.png, x.png
    assert torch.equal(wide, torch.from_numpy(array[:, 4:12]).permute(2, 0, 1))
    assert torch.equal(tall, torch.from_numpy(array.transpose(1, 0, 2)[4:12]).permute(2, 0, 1))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("folder", root=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset("folder", root=tmp_path / "empty")
    _png(tmp_path / "loose" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset("folder", root=tmp_path / "loose")
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "a" / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="has no images"):
        build_dataset("folder", root=tmp_path / "noimages")
    _png(tmp_path / "oneempty" / "a" / "x.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "oneempty" / "b").mkdir()
    with pytest.raises(DataError, match="without images.*: b"):
        build_dataset("folder", root=tmp_path / "oneempty")
    bad = tmp_path / "garbage" / "a" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        build_dataset("folder", root=tmp_path / "garbage")


@pytest.fixture
def truncated_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A class folder whose second file has a valid header but cut-off pixel data."""
    rng = np.random.default_rng(2)
    root = tmp_path / "trunc"
    _png(root / "a" / "0.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    bad = root / "a" / "1.png"
    _png(bad, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    bad.write_bytes(bad.read_bytes()[:400])
    return root, bad


def test_truncated_image_fails_when_read_and_names_the_file(truncated_folder):
    root, bad = truncated_folder
    ds = build_dataset("folder", root=root, image_size=8)  # the header is fine
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=str(bad)):
        ds[1]
    with pytest.raises(DataError, match=str(bad)):
        next(BatchStream(ds, batch_size=2, flip=False))


def test_truncated_image_in_worker_gives_one_line(truncated_folder):
    # torch joins a worker that raised only after a 5 s timeout, so this is the one test with a failing worker
    root, bad = truncated_folder
    ds = build_dataset("folder", root=root, image_size=8)
    with pytest.raises(DataError) as info:
        next(BatchStream(ds, batch_size=2, flip=False, num_workers=1))
    assert str(info.value).startswith(f"cannot read image {bad}") and "\n" not in str(info.value)
    del info  # the traceback holds the stream; release its worker here rather than in a later test
    gc.collect()
    with pytest.raises(DataError, match=str(bad)):
        BatchStream(ds, batch_size=2, on_device=True)  # gathering the set for the device meets it too


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def test_digits():
    from sklearn.datasets import load_digits

    ds = build_dataset("digits", image_size=8, channels=1)
    ref = load_digits()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (1797, 1, 8, 8)
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    expected = np.round(ref.images * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
    assert torch.equal(ds.images[:, 0], torch.from_numpy(expected))
    assert [ds[i][1] for i in range(20)] == ref.target[:20].tolist()
    rgb = build_dataset("digits", image_size=8, channels=3)
    assert rgb[5][0].shape == (3, 8, 8) and torch.equal(rgb.images, ds.images.repeat(1, 3, 1, 1))
    big = build_dataset("digits", image_size=16, channels=1)
    assert big[0][0].shape == (1, 16, 16) and big[0][0].dtype == torch.uint8
    # bilinear x2 (half-pixel centres): output o samples source s = (o + 0.5) / 2 - 0.5, clamped at the edges
    s = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    i0 = np.floor(s).astype(int)
    i1, w = np.minimum(i0 + 1, 7), s - np.floor(s)
    src = ds.images[:50, 0].numpy().astype(np.float64)
    rows = src[:, i0] * (1 - w)[:, None] + src[:, i1] * w[:, None]
    ref = rows[:, :, i0] * (1 - w) + rows[:, :, i1] * w
    assert np.abs(big.images[:50, 0].numpy() - ref).max() <= 0.5 + 1e-3  # only uint8 rounding


# ---------------------------------------------------------------------------------------------
# BatchStream
# ---------------------------------------------------------------------------------------------


def _indexed_dataset(n: int, channels: int = 3, size: int = 4) -> TensorImageDataset:
    """Random images with label == index, so each batch says which samples it holds; pixels 0 and 255 occur."""
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0, 255
    return TensorImageDataset(images, torch.arange(n), [str(i) for i in range(n)])


def _take(stream: BatchStream, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(k)]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_scaled_and_flipped_copies_of_the_images():
    ds = _indexed_dataset(40)
    stream = BatchStream(ds, batch_size=8, seed=3)
    assert stream.steps_per_epoch == 5
    flipped = kept = 0
    for x, y in _take(stream, 5):
        assert x.shape == (8, 3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        for xi, yi in zip(x, y, strict=True):
            original = ds.images[yi].float() / 127.5 - 1
            if torch.equal(xi, original):
                kept += 1
            else:
                assert torch.equal(xi, torch.flip(original, dims=[-1]))
                flipped += 1
    assert flipped > 5 and kept > 5  # about half of 40
    x, y = next(BatchStream(_indexed_dataset(40), batch_size=40, flip=False))
    assert torch.equal(x, ds.images[y].float() / 127.5 - 1)
    i0 = (y == 0).nonzero().item()
    assert x[i0, 0, 0, 0] == -1 and x[i0, 0, 0, 1] == 1  # 0 -> -1 and 255 -> 1 exactly


def test_epochs_are_permutations_and_deterministic():
    ds = _indexed_dataset(10)
    a = _take(BatchStream(ds, batch_size=3, seed=7), 6)  # 3 steps per epoch, 1 sample dropped
    b = _take(BatchStream(ds, batch_size=3, seed=7), 6)
    _assert_same(a, b)
    epoch0 = torch.cat([y for _, y in a[:3]])
    epoch1 = torch.cat([y for _, y in a[3:]])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not torch.equal(epoch0, epoch1)
    c = _take(BatchStream(ds, batch_size=3, seed=8), 3)
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(a, c, strict=False))


def test_epoch_boundary_state():
    stream = BatchStream(_indexed_dataset(10), batch_size=5, seed=0)
    assert stream.state_dict() == {"epoch": 0, "index": 0, "num_samples": 10}
    _take(stream, 2)
    assert stream.state_dict() == {"epoch": 0, "index": 2, "num_samples": 10}
    next(stream)
    assert stream.state_dict() == {"epoch": 1, "index": 1, "num_samples": 10} and stream.epoch == 1


def test_a_state_of_a_dataset_of_another_size_continues_at_the_next_epoch():
    """A position in one permutation means nothing in another (an image folder with a damaged file removed)."""
    stream = BatchStream(_indexed_dataset(9), batch_size=3, seed=0)
    assert stream.resized_since({"epoch": 2, "index": 1, "num_samples": 10})
    stream.load_state_dict({"epoch": 2, "index": 1, "num_samples": 10})
    assert stream.state_dict() == {"epoch": 3, "index": 0, "num_samples": 9}
    stream.load_state_dict({"epoch": 2, "index": 1})  # saved before states held the size: taken as fitting
    assert stream.state_dict() == {"epoch": 2, "index": 1, "num_samples": 9}


@pytest.mark.parametrize("on_device,num_workers", [(False, 0), (True, 0), (False, 2)])
def test_resume_mid_epoch_equals_uninterrupted(on_device, num_workers):
    ds = _indexed_dataset(14)
    kwargs = dict(batch_size=3, seed=5, on_device=on_device, num_workers=num_workers)  # 4 steps per epoch
    full = _take(BatchStream(ds, **kwargs), 10)
    first = BatchStream(ds, **kwargs)
    _take(first, 6)
    state = first.state_dict()
    assert state == {"epoch": 1, "index": 2, "num_samples": 14}
    resumed = BatchStream(ds, **kwargs)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    _assert_same(_take(resumed, 4), full[6:])
    # rewinding a stream that already ran (persistent workers hold prefetched batches) works too
    first.load_state_dict({"epoch": 0, "index": 3})
    _assert_same(_take(first, 5), full[3:8])


def test_on_device_path_equals_loader_path():
    ds = _indexed_dataset(20, channels=1)
    loader = _take(BatchStream(ds, batch_size=6, seed=11), 7)
    device = _take(BatchStream(ds, batch_size=6, seed=11, on_device=True), 7)
    _assert_same(loader, device)
    # a dataset without tensors() (not an ImageDataset) is gathered through a DataLoader for on_device
    subset = torch.utils.data.Subset(ds, list(range(20)))
    _assert_same(_take(BatchStream(subset, batch_size=6, seed=11, on_device=True), 7), loader)


def test_two_ranks_are_disjoint_and_cover_the_epoch():
    ds = _indexed_dataset(12)
    single = _take(BatchStream(ds, batch_size=6, seed=2), 2)  # one epoch of 12
    ranks = [BatchStream(ds, batch_size=3, seed=2, rank=r, world_size=2) for r in range(2)]
    assert [s.steps_per_epoch for s in ranks] == [2, 2]
    for epoch in range(2):
        got = [_take(s, 2) for s in ranks]
        seen = [set(torch.cat([y for _, y in batches]).tolist()) for batches in got]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))
        if epoch == 0:
            # each image has the same flip whichever rank draws it: sample -> image pairs match one rank
            one = {int(yi): xi for x, y in single for xi, yi in zip(x, y, strict=True)}
            two = {int(yi): xi for batches in got for x, y in batches for xi, yi in zip(x, y, strict=True)}
            assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # 13 images on 2 ranks: the odd one out is dropped so both ranks take the same number of batches
    uneven = [BatchStream(_indexed_dataset(13), batch_size=3, rank=r, world_size=2) for r in range(2)]
    assert [s.steps_per_epoch for s in uneven] == [2, 2]


def test_bad_stream_settings():
    ds = _indexed_dataset(10)
    with pytest.raises(DataError, match="too few"):
        BatchStream(ds, batch_size=6, world_size=2)
    stream = BatchStream(ds, batch_size=2)
    with pytest.raises(DataError, match="does not fit"):
        stream.load_state_dict({"epoch": 0, "index": 6})
    assert BatchStream(ds, batch_size=2, num_workers=10**6)._loader.num_workers == len(os.sched_getaffinity(0))
    floats = torch.utils.data.TensorDataset(torch.rand(4, 1, 2, 2), torch.arange(4))
    with pytest.raises(DataError, match="uint8"):
        next(BatchStream(floats, batch_size=2))


# ---------------------------------------------------------------------------------------------
# Folder defects: high bit depths, directory links
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_scales_16_bit_images_to_8_bits(tmp_path, channels):
    # PIL's own I;16 -> L conversion clips at 255: these values came out almost white (mean 251.6 of 255)
    rng = np.random.default_rng(3)
    wide = rng.integers(39, 63743, (8, 8)).astype(np.uint16)
    wide[0, :3] = 39, 63742, 65535
    _png(tmp_path / "a" / "png16.png", wide)  # a 16-bit PNG opens as I;16
    Image.fromarray(wide).save(tmp_path / "a" / "pgm16.pgm")  # a 16-bit PGM opens as I
    ds = build_dataset("folder", root=tmp_path, image_size=8, channels=channels)
    expected = torch.from_numpy(np.round(wide.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert int(expected[0, 1]) == 248 and int(expected[0, 2]) == 255
    for i in range(2):
        x, _ = ds[i]
        assert x.shape == (channels, 8, 8) and x.dtype == torch.uint8
        assert torch.equal(x, expected.expand(channels, 8, 8)), i


def test_image_folder_scales_float_images_and_refuses_what_it_cannot_scale(tmp_path):
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    (tmp_path / "a").mkdir()
    Image.fromarray(unit).save(tmp_path / "a" / "float.tif")
    Image.fromarray(unit * 3).save(tmp_path / "a" / "too_bright.tif")  # floats are read as 0..1
    Image.fromarray(np.full((8, 8), 2**20, dtype=np.int32)).save(tmp_path / "a" / "int32.tif")  # beyond 16 bits
    ds = build_dataset("folder", root=tmp_path, image_size=8, channels=1)
    assert [Path(p).name for p, _ in ds.samples] == ["float.tif", "int32.tif", "too_bright.tif"]
    assert torch.equal(ds[0][0][0], torch.from_numpy(np.round(unit.astype(np.float64) * 255).astype(np.uint8)))
    with pytest.raises(DataError, match=r"int32\.tif.*0\.\.65535"):
        ds[1]
    with pytest.raises(DataError, match=r"too_bright\.tif.*0\.\.1"):
        ds[2]


def test_image_folder_directory_links_neither_loop_nor_cross_classes(tmp_path):
    # os.walk(followlinks=True) followed cat/up -> .. round and round: 2460 images of 60, dog images labelled cat
    root = tmp_path / "images"
    for i in range(3):
        _png(root / "cat" / "sub" / f"c{i}.png", np.full((4, 4), 10 + i, np.uint8))
    for i in range(2):
        _png(root / "dog" / f"d{i}.png", np.full((4, 4), 100 + i, np.uint8))
    (root / "cat" / "up").symlink_to("..")  # the dataset root: a loop that also holds every class
    (root / "cat" / "sub" / "again").symlink_to(root / "cat" / "sub")  # a folder already walked: a loop
    (root / "cat" / "dogs").symlink_to(root / "dog")  # a sibling class
    (root / "dog" / "self").symlink_to(".")  # the class folder itself
    ds = build_dataset("folder", root=root, image_size=4, channels=1)
    assert len(ds) == 5 and [ds[i][1] for i in range(5)] == [0, 0, 0, 1, 1]
    assert [int(ds[i][0][0, 0, 0]) for i in range(5)] == [10, 11, 12, 100, 101]


def test_image_folder_follows_links_to_folders_outside_the_classes(tmp_path):
    root, extra = tmp_path / "images", tmp_path / "extra"
    _png(root / "cat" / "c.png", np.full((4, 4), 10, np.uint8))
    _png(root / "dog" / "d.png", np.full((4, 4), 100, np.uint8))
    _png(extra / "deep" / "e.png", np.full((4, 4), 50, np.uint8))
    (extra / "deep" / "back").symlink_to(extra)  # a loop inside the linked tree
    (extra / "home").symlink_to(root / "dog")  # and a way back into a class
    (root / "cat" / "more").symlink_to(extra)
    (root / "cat" / "same").symlink_to(extra)  # the same folder twice is scanned once
    ds = build_dataset("folder", root=root, image_size=4, channels=1)
    got = [(Path(p).relative_to(root).as_posix(), label) for p, label in ds.samples]
    assert got == [("cat/c.png", 0), ("cat/more/deep/e.png", 0), ("dog/d.png", 1)]


# ---------------------------------------------------------------------------------------------
# The registry and the dataset interface
# ---------------------------------------------------------------------------------------------


class ToyDataset(TensorImageDataset):
    """A plug-in dataset: images whose pixels all equal their index, two classes; records its build arguments."""

    built_with: tuple = ()

    @classmethod
    def build(cls, root, image_size, channels, train, download):
        cls.built_with = (root, image_size, channels, train, download)
        images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, channels, image_size, image_size)
        return cls(images.contiguous(), torch.arange(6) % 2, ["even", "odd"])


def test_a_dataset_registered_with_one_line_is_built_and_accepted_by_the_config(monkeypatch, tmp_path):
    import train

    with pytest.raises(Exception, match="unknown dataset 'toy'"):
        train.TrainConfig(dataset="toy")
    monkeypatch.setitem(DATASETS, "toy", ToyDataset)  # the one line a plug-in adds: DATASETS["toy"] = ToyDataset
    ds = build_dataset("toy", root=tmp_path, image_size=4, channels=3, train=False, download=False)
    assert type(ds) is ToyDataset and ToyDataset.built_with == (tmp_path, 4, 3, False, False)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.classes == ["even", "odd"] and ToyDataset.in_memory
    assert ds[5][1] == 1 and torch.equal(ds[5][0], torch.full((3, 4, 4), 5, dtype=torch.uint8))
    with pytest.raises(DataError, match="channels must be 1 or 3"):  # the common checks come before build
        build_dataset("toy", channels=2)
    with pytest.raises(DataError, match="choose from cifar10, folder, digits, latents, toy$"):
        build_dataset("mnist")
    # the config takes the registry itself as its choices, so the new name is accepted from then on
    assert train.TrainConfig(dataset="toy").dataset == "toy"
    assert train.parse_args(["--dataset", "toy"]).dataset == "toy"
    x, y = next(BatchStream(ds, batch_size=6, flip=False, on_device=True))
    index = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()  # each image's pixel value is its index
    assert sorted(index.tolist()) == list(range(6)) and torch.equal(index % 2, y)


def test_in_memory_is_declared_by_each_dataset_class(image_folder):
    assert {name: cls.in_memory for name, cls in DATASETS.items()} == {
        "cifar10": True,
        "folder": False,
        "digits": True,
        "latents": True,
    }
    digits = build_dataset("digits", image_size=8, channels=1)
    folder = build_dataset("folder", root=image_folder, image_size=8, channels=3)
    assert isinstance(digits, DATASETS["digits"]) and isinstance(folder, DATASETS["folder"])
    assert digits.in_memory and not folder.in_memory
    images, labels = digits.tensors()
    assert images is digits.images and labels is digits.labels and folder.tensors() is None


def test_on_device_takes_the_tensors_of_an_in_memory_dataset_without_iterating(monkeypatch):
    ds = _indexed_dataset(12)
    expected = _take(BatchStream(ds, batch_size=4, seed=1), 3)

    def no_items(*args):
        raise AssertionError("an in-memory dataset is not iterated for on_device")

    monkeypatch.setattr(TensorImageDataset, "__getitem__", no_items)
    monkeypatch.setattr(TensorImageDataset, "__getitems__", no_items)
    _assert_same(_take(BatchStream(ds, batch_size=4, seed=1, on_device=True), 3), expected)


def test_getitems_fetches_a_batch_equal_to_item_by_item():
    ds = _indexed_dataset(10)
    items = ds.__getitems__([7, 2, 2, 9])
    assert [y for _, y in items] == [7, 2, 2, 9] and all(isinstance(y, int) for _, y in items)
    assert all(torch.equal(x, ds[i][0]) for (x, _), i in zip(items, [7, 2, 2, 9], strict=True))
    x, y = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [3, 1]), batch_size=2)))
    assert torch.equal(x, ds.images[[3, 1]]) and y.tolist() == [3, 1]


def test_fingerprint_of_tensors_follows_the_images():
    a, b = _indexed_dataset(10), _indexed_dataset(10)
    fp = a.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16 and int(fp, 16) >= 0
    assert b.fingerprint() == fp  # equal content, equal fingerprint
    b.images[3, 0, 1, 2] ^= 1  # one bit of one pixel
    assert b.fingerprint() != fp
    assert TensorImageDataset(a.images[:9], a.labels[:9], a.classes).fingerprint() != fp
    assert (
        build_dataset("digits", image_size=8, channels=1).fingerprint()
        != build_dataset("digits", image_size=8, channels=3).fingerprint()
    )


def test_fingerprint_of_a_folder_follows_its_files(image_folder):
    fp = build_dataset("folder", root=image_folder, image_size=8).fingerprint()
    assert len(fp) == 16 and build_dataset("folder", root=image_folder, image_size=8).fingerprint() == fp
    path = image_folder / "dog" / "c.png"
    _png(path, np.full((12, 40, 3), (10, 50, 200), dtype=np.uint8))  # same name and size, other pixels and time
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = build_dataset("folder", root=image_folder, image_size=8).fingerprint()
    assert changed != fp
    _png(image_folder / "dog" / "e.png", np.zeros((4, 4), np.uint8))  # one image more
    assert build_dataset("folder", root=image_folder, image_size=8).fingerprint() not in (fp, changed)
