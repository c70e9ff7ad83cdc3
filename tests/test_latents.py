"""Latent DiTs: the VAE, extract_latents.py, the latents dataset, training, sampling and evaluation on them.

Nothing is downloaded: the VAE is a tiny diffusers AutoencoderKL with random weights (two blocks of 8 and 16
channels, 4 latent channels, downsampling 2), saved with save_pretrained and loaded by path through the same
call as a hub id; the images are written by the test, of mixed sizes and aspect ratios.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import CHILD_ENV, Features, all_close
from test_train import assert_same, tiny, weights

import evaluate
import extract_latents
import sampler as sampler_cli
import train
from data import BatchStream, DataError, build_dataset
from data.folder import ImageFolderDataset, center_crop_arr
from data.latents import LatentDataset
from evaluation.fid import FIDError, reference_statistics
from evaluation.metrics import inception_score
from models.vae import LatentCodec, VAEError, load_autoencoder
from sampling.sampler import Sampler
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # image side; latents are 4 x 8 x 8
SIZES = [(40, 17), (16, 16), (70, 33), (20, 50), (33, 33), (90, 40), (17, 60)]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: bit-exact comparisons across processes


def make_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )
    vae.save_pretrained(folder)


def make_images(folder: Path, per_class: int = 5) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[(c * per_class + i) % len(SIZES)]
            mode = "L" if i == 3 else "RGB"  # a gray one: read as RGB like the rest
            shape = (h, w) if mode == "L" else (h, w, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / name / f"{i}.png")


def extract(data: Path, out: Path, vae: Path, *extra: str) -> int:
    args = [
        "--data-path",
        str(data),
        "--out",
        str(out),
        "--vae",
        str(vae),
        "--image-size",
        str(SIZE),
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]
    return extract_latents.cli(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny VAE, an image folder of 10 images in 2 classes, and their latents (3 shards of 4, 4, 2)."""
    root = tmp_path_factory.mktemp("latents")
    torch.set_num_threads(1)
    make_vae(root / "vae")
    make_images(root / "images")
    assert extract(root / "images", root / "latents", root / "vae") == 0
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, as on a cluster node: huggingface_hub reads HF_HUB_OFFLINE when it is imported, so its
    constant is set as well (without it every attempt waits for the network to time out)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


#################################################################################
#                        Preprocessing, VAE, extraction                         #
#################################################################################


def adm_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The published algorithm (guided-diffusion, image_datasets.py), written out here as the reference."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("size", [(40, 17), (16, 16), (300, 97), (97, 300), (65, 64), (15, 31)])
def test_center_crop_is_adms(size):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = np.array(center_crop_arr(img, 16))
    assert got.shape == (16, 16, 3)
    assert np.array_equal(got, adm_center_crop(img, 16))


def test_vae_loads_from_a_folder_and_says_how_to_fetch_a_missing_one(world, offline):
    vae = load_autoencoder(str(world / "vae"))
    assert vae.config.latent_channels == 4 and not vae.training
    with pytest.raises(VAEError) as e:
        load_autoencoder("stabilityai/sd-vae-ft-ema")
    text = str(e.value)
    assert "\n" not in text and "huggingface-cli download stabilityai/sd-vae-ft-ema" in text and "HF_HOME" in text


def test_extraction_stores_both_flips_of_the_centre_crops(world):
    index = json.loads((world / "latents/index.json").read_text())
    assert index["count"] == 10 and index["classes"] == ["cat", "dog"] and len(index["shards"]) == 3
    space = index["latent_space"]
    assert space["latent_shape"] == [4, 8, 8] and space["image_size"] == SIZE and space["image_channels"] == 3
    assert space["normalization"] == "config" and space["scale"] == [0.18215] * 4 and space["shift"] == [0.0] * 4
    data = LatentDataset(world / "latents")
    images = ImageFolderDataset(world / "images", SIZE, 3)
    codec = LatentCodec(load_autoencoder(str(world / "vae")), [0.0] * 4, [1.0] * 4)
    x = torch.stack([images[i][0] for i in range(10)]).float() / 127.5 - 1
    z, z_flip = codec.encode(x), codec.encode(x.flip(-1))
    stored = torch.stack([data[i][0] for i in range(10)]).float()  # (10, 2, 4, 8, 8)
    assert all_close(stored[:, 0], z, rel=2e-3) and all_close(stored[:, 1], z_flip, rel=2e-3)  # float16
    assert not all_close(stored[:, 0], stored[:, 1], rel=1e-2)  # the mirror image is another image
    assert data.labels.tolist() == [0] * 5 + [1] * 5
    mean = stored.double().mean(dim=(0, 1, 3, 4))
    std = stored.double().std(dim=(0, 1, 3, 4), unbiased=False)
    assert np.allclose(index["stats"]["mean"], mean.numpy(), rtol=1e-6, atol=1e-9)
    assert np.allclose(index["stats"]["std"], std.numpy(), rtol=1e-6)


def test_a_killed_extraction_continues_to_the_same_bytes(world, tmp_path, capsys):
    part = tmp_path / "latents"
    part.mkdir()
    # What a kill after the first shard leaves: the settings, one complete shard and its sha256, a temporary file of
    # the next.
    for name in ("extraction.json", "shard-00000.safetensors", "shard-00000.safetensors.sha256"):
        shutil.copy(world / "latents" / name, part / name)
    (part / ".shard-00001.safetensors.tmp123").write_bytes(b"half a shard")
    assert extract(world / "images", part, world / "vae") == 0
    assert "1 of 3 shards already in" in capsys.readouterr().out
    whole = files(world / "latents")
    got = {k: v for k, v in files(part).items() if not k.endswith(".tmp123")}
    assert got.keys() == whole.keys() and all(got[k] == whole[k] for k in whole)


def test_two_processes_extract_the_same_bytes_as_one(world, tmp_path):
    out = tmp_path / "latents"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(ROOT / "extract_latents.py"),
        "--data-path",
        str(world / "images"),
        "--out",
        str(out),
        "--vae",
        str(world / "vae"),
        "--image-size",
        str(SIZE),
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ]
    env = {**CHILD_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert files(out) == files(world / "latents")


def test_stats_normalization_rewrites_only_the_index(world, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(world / "latents", out)
    assert extract(world / "images", out, world / "vae", "--normalization", "stats") == 0
    before, after = files(world / "latents"), files(out)
    assert all(before[k] == after[k] for k in before if k != "index.json")
    index = json.loads((out / "index.json").read_text())
    space = index["latent_space"]
    assert space["normalization"] == "stats" and space["shift"] == index["stats"]["mean"]
    assert np.allclose(space["scale"], 1 / np.array(index["stats"]["std"]))
    # normalised latents have zero mean and unit variance per channel
    data = LatentDataset(out)
    latents, _ = data.tensors()
    z = torch.cat(
        [
            data.training_batch(latents, torch.zeros(10, dtype=torch.bool)),
            data.training_batch(latents, torch.ones(10, dtype=torch.bool)),
        ]
    )
    assert torch.allclose(z.double().mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.double().std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-4)


def test_bad_input_is_one_line_and_keeps_what_was_written(world, tmp_path, capsys, offline):
    def error() -> str:
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("extract_latents.py")]
        assert len(lines) == 1, lines
        return lines[0]

    # a damaged image in the second shard: the first is written and stays
    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    (images / "dog" / "1.png").write_bytes((images / "dog" / "1.png").read_bytes()[:60])
    out = tmp_path / "latents"
    assert extract(images, out, world / "vae") == 2
    assert "dog/1.png" in error() and (out / "shard-00000.safetensors").is_file()
    assert not (out / "index.json").exists()
    # other settings into the same folder
    assert extract(world / "images", world / "latents", world / "vae", "--shard-size", "3") == 2
    line = error()
    assert "other settings" in line and "shard_size 4 -> 3" in line
    # an empty folder, a VAE that is not there
    (tmp_path / "empty").mkdir()
    assert extract(tmp_path / "empty", tmp_path / "o1", world / "vae") == 2
    assert "no class sub-folders" in error()
    assert extract(world / "images", tmp_path / "o2", "nobody/no-such-vae") == 2
    assert "huggingface-cli download nobody/no-such-vae" in error()


#################################################################################
#                          Training, sampling, evaluation                       #
#################################################################################


def latent_run(world: Path, out: Path, **overrides) -> train.TrainConfig:
    settings = dict(
        dataset="latents",
        data_path=str(world / "latents"),
        image_size=None,
        channels=None,
        flip=True,
        batch_size=4,
        steps=6,
        ckpt_every=3,
    )
    return tiny(out, **{**settings, **overrides})


def test_the_stream_picks_the_stored_mirror_image(world):
    data = build_dataset("latents", world / "latents", image_size=SIZE, channels=3)
    assert data.sample_shape == (4, 8, 8) and data.num_classes == 2
    stream = BatchStream(data, batch_size=5, seed=3, flip=True, on_device=True)
    x, y = next(stream)
    order = stream._order[:5]
    flips = stream._flips[order]
    assert flips.any() and not flips.all()
    latents, _ = data.tensors()
    expected = (latents[order, flips.long()].float() - 0.0) * 0.18215
    assert torch.equal(x, expected) and torch.equal(y, data.labels[order])
    loader = BatchStream(data, batch_size=5, seed=3, flip=True, on_device=False)
    assert torch.equal(next(loader)[0], x)  # the memory-mapped items give the same batch
    with pytest.raises(DataError, match="encode 3-channel 16px images; got --image-size 32"):
        build_dataset("latents", world / "latents", image_size=32, channels=3)


def test_training_on_latents_resumes_exactly_and_samples_images(world, tmp_path):
    cfg = latent_run(world, tmp_path / "full", sample_every=3)
    full = train.main(cfg)
    saved = json.loads((tmp_path / "full/config.json").read_text())
    assert saved["image_size"] == SIZE and saved["channels"] == 3  # from the index
    train.main(latent_run(world, tmp_path / "split", sample_every=3, steps=3))
    train.main(latent_run(world, tmp_path / "split", sample_every=3, resume="yes"))
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "split/checkpoints/last.pt"))
    assert full["model"].in_channels == 4 and full["model"].input_size == 8
    state = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    assert state["latent_space"]["vae"] == str((world / "vae").resolve())
    # the grids and GIFs show decoded images
    grid = Image.open(tmp_path / "full/samples/step0000006_cfg1.png")
    assert grid.size[0] > 2 * 64 and (tmp_path / "full/samples/step0000006_cfg3.gif").stat().st_size > 0
    s = Sampler.from_checkpoint(tmp_path / "full/checkpoints/last.pt", device="cpu", steps=2)
    out = s.generate(3, [0, 1, 0], seed=0)
    assert out.images.shape == (3, 3, SIZE, SIZE) and 0 <= out.images.min() and out.images.max() <= 1
    raw = s.generate(3, [0, 1, 0], seed=0, decode=False).images
    assert raw.shape == (3, 4, 8, 8)
    assert torch.allclose(s.decoder.decode(raw), out.images, atol=1e-6)
    assert torch.equal(
        Sampler.from_checkpoint(tmp_path / "full/checkpoints/last.pt", device="cpu", steps=2, decode=False)
        .generate(3, [0, 1, 0], seed=0)
        .images,
        raw,
    )
    result = sampler_cli.main(
        sampler_cli.parse_args(
            [
                "--ckpt",
                str(tmp_path / "full/checkpoints/last.pt"),
                "--n",
                "4",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s.png"),
                "--gif",
                str(tmp_path / "s.gif"),
            ]
        )
    )
    assert result["images"].shape == (4, 3, SIZE, SIZE) and (tmp_path / "s.gif").is_file()


def test_resume_refuses_other_latents_and_a_missing_vae(world, tmp_path, offline):
    train.main(latent_run(world, tmp_path / "run", steps=3))
    other = tmp_path / "other"
    shutil.copytree(world / "latents", other)
    assert extract(world / "images", other, world / "vae", "--normalization", "stats") == 0
    with pytest.raises(ConfigError, match="other latents than --data-path holds: normalization 'config' -> 'stats'"):
        train.main(dataclasses.replace(latent_run(world, tmp_path / "run", resume="yes"), data_path=str(other)))
    # the diagnostics need the VAE: without it, one line before anything is written
    index = json.loads((other / "index.json").read_text())
    index["latent_space"]["vae"] = "nobody/no-such-vae"
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="--sample-every 0 --fid-every 0 train without it"):
        train.main(dataclasses.replace(latent_run(world, tmp_path / "new", sample_every=2), data_path=str(other)))
    assert not (tmp_path / "new" / "config.json").exists()


def test_fid_during_training_decodes_against_the_source_images_or_given_statistics(world, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    feats = Features()
    train.main(latent_run(world, tmp_path / "own", steps=2, fid_every=2, fid_samples=4), fid_extractor=feats)
    stats = list((tmp_path / "cache/dit/fid_stats").glob("*.npz"))
    assert len(stats) == 1 and stats[0].name.startswith("folder-train-16px-3ch-10img")  # the images, not the latents
    logged = [json.loads(line) for line in (tmp_path / "own/metrics.jsonl").read_text().splitlines()]
    own = [row["eval/fid"] for row in logged if "eval/fid" in row]
    assert len(own) == 1 and np.isfinite(own[0])
    # the same statistics given as a file (as ADM's reference batch would be) give the same FID
    train.main(
        latent_run(world, tmp_path / "ref", steps=2, fid_every=2, fid_samples=4, fid_ref_stats=str(stats[0])),
        fid_extractor=feats,
    )
    logged = [json.loads(line) for line in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]
    assert [row["eval/fid"] for row in logged if "eval/fid" in row] == own


class Logits(torch.nn.Module):
    """A stand-in for Inception's class logits: uint8 (N, 3, H, W) -> (N, 5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.fc = torch.nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x.float().mean((2, 3)) / 255 * 8)


def test_evaluate_decodes_against_an_adm_reference_and_writes_the_adm_npz(world, tmp_path):
    train.main(latent_run(world, tmp_path / "run", steps=3))
    ckpt = tmp_path / "run/checkpoints/last.pt"
    # An ADM-style reference batch: arr_0 images plus mu and sigma of the features.
    feats = Features()
    real = ImageFolderDataset(world / "images", SIZE, 3)
    f = feats(torch.stack([real[i][0] for i in range(10)])).detach().double().numpy()
    ref = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(ref, arr_0=np.zeros((2, SIZE, SIZE, 3), np.uint8), mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    args = [
        "--ckpt",
        str(ckpt),
        "--num-samples",
        "6",
        "--steps",
        "2",
        "--ref-stats",
        str(ref),
        "--save-npz",
        str(tmp_path / "samples.npz"),
        "--out-json",
        str(tmp_path / "fid.json"),
        "--no-progress",
    ]
    result = evaluate.main(evaluate.parse_args(args), extractor=feats, logits_extractor=Logits())
    assert np.isfinite(result["fid"]) and result["reference"]["kind"] == "file"
    assert 1.0 <= result["inception_score"] <= 5.0 and result["latent_space"]["latent_shape"] == [4, 8, 8]
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, SIZE, SIZE, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].tolist() == [0, 1, 0, 1, 0, 1]
    # against the images the latents came from, the same way (the default)
    default = evaluate.main(
        evaluate.parse_args(
            args[:6]
            + ["--out-json", str(tmp_path / "fid2.json"), "--no-progress", "--stats-dir", str(tmp_path / "stats")]
        ),
        extractor=feats,
    )
    assert default["reference"]["dataset"] == "folder" and default["real_images"] == 10
    assert default["inception_score"] is None  # an injected extractor and no logits: no Inception score
    assert abs(default["fid"] - result["fid"]) <= 1e-6 * max(1.0, abs(result["fid"]))


def test_inception_score_known_answers():
    k = 4
    one_hot = torch.eye(k).repeat(25, 1) * 50  # confident and balanced over k classes: IS = k
    assert abs(inception_score(one_hot, splits=5)[0] - k) < 1e-6
    assert abs(inception_score(torch.zeros(100, k), splits=5)[0] - 1.0) < 1e-12  # uninformative: IS = 1
    assert abs(inception_score(torch.tensor([[50.0, 0.0]]).repeat(10, 1), splits=2)[0] - 1.0) < 1e-9  # one class


def test_reference_statistics_are_checked(tmp_path):
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(FIDError, match="no reference statistics"):
        reference_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    twelve = torch.nn.Identity()
    twelve.num_features = 12  # what load_inception's module says of itself (2048 there)
    with pytest.raises(FIDError, match="3-d statistics"):
        reference_statistics(tmp_path / "small.npz", twelve)


def test_latent_dataset_errors_are_one_line(world, tmp_path):
    with pytest.raises(DataError, match="python extract_latents.py --data-path IMAGES"):
        LatentDataset(tmp_path)
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(world / "latents/shard-00000.safetensors", half)
    with pytest.raises(DataError, match="run the same extract_latents.py command again"):
        LatentDataset(half)
    cut = tmp_path / "cut"
    shutil.copytree(world / "latents", cut)
    shard = cut / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="is damaged"):
        LatentDataset(cut)
