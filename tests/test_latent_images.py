"""Clean images beside the training batch for REPA: ``BatchStream(with_images=True)`` on pixels and on latents
extracted with ``--images`` (the tiny random VAE and image folder of tests/test_latents.py)."""

import json
import shutil

import pytest
import torch
from test_latents import SIZE, extract, files, make_images, make_vae

from data import BatchStream, DataError
from data.base import TensorImageDataset
from data.folder import ImageFolderDataset
from data.latents import LatentDataset
from models.vae import LatentCodec, load_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mirrored(u: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), u.flip(-1), u)


def batches(stream: BatchStream, steps: int) -> list[tuple]:
    """Each step's batch and the (dataset indices, flip bits) it was drawn with."""
    out = []
    for _ in range(steps):
        lo = stream.state_dict()["index"] % stream.steps_per_epoch * stream.batch_size
        batch = next(stream)
        order = stream._order[lo : lo + stream.batch_size]
        out.append((batch, order, stream._flips[order]))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny VAE, 10 images in 2 classes, their latents with the centre crops (3 shards) and without."""
    root = tmp_path_factory.mktemp("latent-images")
    torch.set_num_threads(1)  # as the tests that extract again: the same bytes need the same reduction order
    make_vae(root / "vae")
    make_images(root / "images")
    assert extract(root / "images", root / "with", root / "vae", "--images") == 0
    assert extract(root / "images", root / "without", root / "vae") == 0
    return root


@pytest.mark.parametrize("on_device", [True, False])
def test_pixel_images_are_the_batch_in_0_1_and_the_stream_is_otherwise_unchanged(on_device):
    u = torch.randint(0, 256, (20, 3, 6, 6), dtype=torch.uint8)
    data = TensorImageDataset(u, torch.arange(20) % 3, ["a", "b", "c"])
    plain = BatchStream(data, batch_size=8, seed=1, on_device=on_device)
    stream = BatchStream(data, batch_size=8, seed=1, on_device=on_device, with_images=True)
    for (x, y, images), order, flip in batches(stream, 5):  # 2 steps per epoch: crosses two epoch ends
        x0, y0 = next(plain)
        assert torch.equal(x, x0) and torch.equal(y, y0)  # with_images=False is the same stream
        assert flip.any() and not flip.all()
        assert images.dtype == torch.float32 and torch.equal(images, mirrored(u[order], flip).float() / 255)
        assert torch.allclose(images, (x + 1) / 2, rtol=0, atol=1e-6)
    assert plain.state_dict() == stream.state_dict() and len(next(plain)) == 2


def test_extraction_stores_the_centre_crops_beside_the_same_latents(world):
    index = json.loads((world / "with/index.json").read_text())
    assert index["images"] is True and "images" not in json.loads((world / "without/index.json").read_text())
    data, plain = LatentDataset(world / "with"), LatentDataset(world / "without")
    assert data.has_images and not plain.has_images
    folder = ImageFolderDataset(world / "images", SIZE, 3)
    for i in range(len(folder)):
        crop = data.image(i)
        assert crop.dtype == torch.uint8 and torch.equal(crop, folder[i][0])
        assert torch.equal(data[i][0], plain[i][0])  # the latents do not change


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_gives_the_crop_of_the_latents_view(world, workers):
    data = LatentDataset(world / "with")
    crops = torch.stack([data.image(i) for i in range(len(data))])
    plain = BatchStream(data, batch_size=4, seed=3, num_workers=workers)
    stream = BatchStream(data, batch_size=4, seed=3, num_workers=workers, with_images=True)
    codec = LatentCodec(load_autoencoder(str(world / "vae")), [0.0] * 4, [1.0] * 4)
    seen = torch.zeros(2, dtype=torch.bool)
    for (x, y, images), order, flip in batches(stream, 4):
        x0, y0 = next(plain)
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert torch.equal(images, mirrored(crops[order], flip).float() / 255)
        # the image encodes to the batch's latent, so it is the same view (float16 latents: 2e-3)
        z = codec.encode(images * 2 - 1) * 0.18215  # the index's scale
        assert (z - x).abs().max() <= 2e-3 * x.abs().max()
        seen[flip.long()] = True
    assert seen.all()  # both views were drawn


def test_images_the_latents_lack_or_hold_off_the_device_are_one_line_errors(world):
    plain = LatentDataset(world / "without")
    for make in (lambda: plain.image(0), lambda: BatchStream(plain, batch_size=4, with_images=True)):
        with pytest.raises(DataError) as e:
            make()
        text = str(e.value)
        assert "\n" not in text and f"the latents in {world / 'without'} hold no images" in text and "--images" in text
    assert len(next(BatchStream(plain, batch_size=4, on_device=True))) == 2
    with pytest.raises(DataError, match="^[^\n]*--no-data-on-device"):
        BatchStream(LatentDataset(world / "with"), batch_size=4, on_device=True, with_images=True)


def test_an_extraction_with_images_resumes_and_a_rerun_with_other_images_is_refused(world, tmp_path, capsys):
    part = tmp_path / "with"
    part.mkdir()
    for name in ("extraction.json", "shard-00000.safetensors", "shard-00000.safetensors.sha256"):
        shutil.copy(world / "with" / name, part / name)
    assert extract(world / "images", part, world / "vae", "--images") == 0
    assert "1 of 3 shards already in" in capsys.readouterr().out
    assert files(part) == files(world / "with")
    for folder, flag, change in [("without", "--images", "None -> True"), ("with", "--no-images", "True -> None")]:
        before = files(world / folder)
        assert extract(world / "images", world / folder, world / "vae", flag) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("extract_latents.py")]
        assert len(lines) == 1 and f"store_images {change}" in lines[0], lines
        assert files(world / folder) == before


def test_train_aligns_latents_with_their_stored_crops_and_refuses_latents_without(world, tmp_path, capsys):
    """train.py with --repa-weight on latents: the loader reads the crops (--data-on-device resolves off); latents
    extracted without --images are one line naming the flag, before anything is written."""
    import torch.nn as nn
    from test_latents import latent_run

    import train
    from utils.checkpoint import load_checkpoint

    class Pooled(nn.Module):  # (B, 3, 16, 16) in [0, 1] -> (B, 3): each channel's mean
        def forward(self, images):
            return images.mean((2, 3))

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(Pooled(), (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "pooled.pt2")
    repa = dict(repa_weight=0.5, repa_encoder=str(tmp_path / "pooled.pt2"), repa_projector_dim=8, sample_every=0)
    result = train.main(latent_run(world, tmp_path / "run", data_path=str(world / "with"), **repa))
    state = load_checkpoint(result["checkpoint"])
    assert state["config"]["data_on_device"] is False and state["model_config"]["repa_dim"] == 3
    assert result["step"] == 6
    with pytest.raises(DataError, match="hold no images; run extract_latents.py with --images"):
        train.main(latent_run(world, tmp_path / "bare", data_path=str(world / "without"), **repa))
    assert not (tmp_path / "bare" / "config.json").exists()
