"""FID: the float64 distance against references, the real-statistics cache, torchmetrics agreement, the
Inception protocol and offline message, and evaluate.py end to end with an injected feature extractor.

Nothing here downloads: Inception is only built with its weight loading stubbed out.
"""

import json
import urllib.error
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

import evaluate
from data import build_dataset
from evaluation.fid import balanced_labels, compute_fid, dataset_statistics, real_statistics
from evaluation.inception import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    extract_features,
    load_inception,
    to_uint8_rgb,
)
from evaluation.metrics import FeatureStats, FIDError, frechet_distance
from models.dit import DiT
from sampler import Sampler
from utils.checkpoint import save_checkpoint


class TinyExtractor(nn.Module):
    """A fixed random conv + tanh + global pooling: uint8 (N, 3, H, W) -> (N, 16). Counts its calls."""

    num_features = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(16, generator=g) * 0.1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += 1
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))


def random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- frechet_distance


def test_frechet_distance_matches_a_symmetric_sqrtm_reference():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_cov(rng, d), random_cov(rng, d)
        # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): the reference takes the symmetric route
        r = scipy.linalg.sqrtm(s1).real
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(r @ s2 @ r).real)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert isinstance(got, float)
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-10)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9, abs=1e-10)  # symmetric
        assert got > 0


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # W2^2 between diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # one dimension, as plain numbers: (m1 - m2)^2 + (s1 - s2)^2 in standard deviations
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(
        9.0 + 1.0
    )


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    mu, s = rng.standard_normal(64), random_cov(rng, 64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_frechet_distance_with_singular_covariances_stays_finite():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((6, 12)), rng.standard_normal((6, 12)) + 0.5  # 6 samples of 12-d: rank 5
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    got = frechet_distance(a.mean(0), s1, b.mean(0), s2)
    # eigenvalues of S1 S2 are real and >= 0 in exact arithmetic: the trace of the root is their root sum
    eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert np.isfinite(got) and got == pytest.approx(ref, rel=1e-4)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


def test_feature_stats_match_numpy_mean_and_cov_over_batches():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((103, 7)) * 3 + 10  # an offset mean tests the E[xx^T] - mu mu^T cancellation
    stats = FeatureStats()
    for chunk in np.array_split(x, 5):
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    assert mu.dtype == sigma.dtype == np.float64
    xf = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, xf.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(xf, rowvar=False), rtol=1e-9, atol=1e-10)
    with pytest.raises(FIDError, match="at least 2"):
        FeatureStats().mean_cov()


def test_images_become_uint8_rgb_like_saved_pngs():
    gray = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.999]).view(1, 1, 2, 3)
    out = to_uint8_rgb(gray)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 3)
    assert out[0, 0].flatten().tolist() == [0, 128, 255, 255, 0, 255]
    assert torch.equal(out[0, 0], out[0, 2])
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0] and balanced_labels(4, 0) is None


# ----------------------------------------------------------------------------- agreement with torchmetrics


def test_pipeline_equals_torchmetrics_frechet_inception_distance():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    extractor = TinyExtractor()
    real = build_dataset("digits", image_size=8, channels=1)
    fake = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8)

    mu_r, s_r = dataset_statistics(real, extractor, batch_size=500, progress=False)
    fs = FeatureStats()
    for part in fake.split(64):
        fs.update(extract_features(extractor, part))
    ours = frechet_distance(mu_r, s_r, *fs.mean_cov())

    metric = FrechetInceptionDistance(feature=extractor, normalize=False)
    metric.update(to_uint8_rgb(real.images), real=True)
    metric.update(to_uint8_rgb(fake), real=False)
    theirs = float(metric.compute())
    assert ours > 0.01
    assert ours == pytest.approx(theirs, rel=1e-3)


# ----------------------------------------------------------------------------- real statistics cache


def test_real_statistics_cache_hit_and_recompute_on_changed_settings(tmp_path):
    ext = TinyExtractor(seed=0)
    kw = dict(split="train", batch_size=512, cache_dir=tmp_path / "stats", progress=False)
    info1: dict = {}
    mu1, s1 = real_statistics("digits", tmp_path, 8, 1, extractor=ext, info=info1, **kw)
    assert ext.calls > 0 and not info1["cache_hit"] and Path(info1["cache_path"]).is_file()
    assert info1["num_images"] == 1797 and mu1.dtype == s1.dtype == np.float64 and s1.shape == (16, 16)
    # the cached values are the plain statistics of the dataset
    ref_mu, ref_s = dataset_statistics(
        build_dataset("digits", image_size=8, channels=1), TinyExtractor(0), progress=False
    )
    np.testing.assert_allclose(mu1, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(s1, ref_s, rtol=1e-9, atol=1e-12)

    ext.calls = 0
    info2: dict = {}
    mu2, s2 = real_statistics("digits", tmp_path, 8, 1, extractor=ext, info=info2, **kw)
    assert ext.calls == 0 and info2["cache_hit"] and info2["cache_path"] == info1["cache_path"]
    np.testing.assert_array_equal(mu1, mu2)
    np.testing.assert_array_equal(s1, s2)

    paths = {info1["cache_path"]}
    for args, extractor in [((16, 1), ext), ((8, 3), ext), ((8, 1), TinyExtractor(seed=1))]:
        extractor.calls = 0
        info: dict = {}
        mu, _ = real_statistics("digits", tmp_path, *args, extractor=extractor, info=info, **kw)
        assert extractor.calls > 0 and not info["cache_hit"], args
        paths.add(info["cache_path"])
    assert len(paths) == 4  # one file per setting, none overwriting another
    assert not np.allclose(mu, mu1)  # other weights, other features

    # a cache file written for other settings under this name is not trusted
    stale = Path(info1["cache_path"])
    np.savez(stale.open("wb"), mu=np.zeros(16), sigma=np.eye(16), key=np.array("{}"))
    ext.calls = 0
    mu3, _ = real_statistics("digits", tmp_path, 8, 1, extractor=ext, **kw)
    assert ext.calls > 0
    np.testing.assert_array_equal(mu3, mu1)


def test_real_statistics_subset_is_fixed_and_cached_apart(tmp_path):
    ext = TinyExtractor()
    kw = dict(cache_dir=tmp_path, progress=False)
    a, b = {}, {}
    mu_a, _ = real_statistics("digits", tmp_path, 8, 1, extractor=ext, num_images=500, info=a, **kw)
    mu_b, _ = real_statistics("digits", tmp_path, 8, 1, extractor=ext, num_images=500, info=b, **kw)
    assert b["cache_hit"] and a["num_images"] == 500
    np.testing.assert_array_equal(mu_a, mu_b)
    with pytest.raises(FIDError, match="2..1797"):
        real_statistics("digits", tmp_path, 8, 1, extractor=ext, num_images=5000, **kw)


def _stats_of(extractor: nn.Module, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the statistics of an image tensor (N, C, H, W) fed to the extractor in slices."""
    fs = FeatureStats()
    for part in images.split(batch_size):
        fs.update(extract_features(extractor, part))
    return fs.mean_cov()


def test_dataset_statistics_of_an_in_memory_set_fetch_whole_batches(monkeypatch):
    from data import TensorImageDataset

    real = build_dataset("digits", image_size=8, channels=1)
    gathers = []
    original = TensorImageDataset.__getitems__

    def counted(self, indices):
        gathers.append(len(indices))
        return original(self, indices)

    monkeypatch.setattr(TensorImageDataset, "__getitems__", counted)
    monkeypatch.setattr(TensorImageDataset, "__getitem__", lambda self, i: pytest.fail("fetched item by item"))
    ext = TinyExtractor()
    mu, sigma = dataset_statistics(real, ext, batch_size=500, progress=False)
    assert gathers == [500, 500, 500, 297]
    for got, want in zip((mu, sigma), _stats_of(TinyExtractor(), real.images, 500), strict=True):
        np.testing.assert_array_equal(got, want)
    # a subset is the seed-0 permutation's first images, also gathered in batches
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:300]
    mu, _ = dataset_statistics(real, ext, batch_size=128, num_images=300, progress=False)
    assert gathers[4:] == [128, 128, 44]
    np.testing.assert_array_equal(mu, _stats_of(TinyExtractor(), real.images[order], 128)[0])


def test_dataset_statistics_of_a_folder_are_those_of_its_items(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(7):
        (tmp_path / "c" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "c" / str(i % 2) / f"{i}.png")
    real = build_dataset("folder", root=tmp_path / "c", image_size=8, channels=3)
    assert not real.in_memory
    items = torch.stack([real[i][0] for i in range(len(real))])
    mu, sigma = dataset_statistics(real, TinyExtractor(), batch_size=3, progress=False)
    for got, want in zip((mu, sigma), _stats_of(TinyExtractor(), items, 3), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_the_cache_key_is_the_datasets_own_fingerprint(tmp_path):
    from data import TensorImageDataset
    from evaluation.fid import dataset_fingerprint

    class Labelled(TensorImageDataset):
        """An in-memory set whose fingerprint is whatever it is told (so the test sees what the cache keys on)."""

        tag = "a"

        def fingerprint(self) -> str:
            return self.tag

    digits = build_dataset("digits", image_size=8, channels=1)
    assert dataset_fingerprint(digits) == digits.fingerprint()
    with pytest.raises(FIDError, match="cannot fingerprint a Subset"):
        dataset_fingerprint(torch.utils.data.Subset(digits, [0, 1]))
    ds = Labelled(digits.images.clone(), digits.labels, digits.classes)
    ext = TinyExtractor()
    kw = dict(extractor=ext, cache_dir=tmp_path, progress=False, dataset=ds)
    first, again, other = {}, {}, {}
    mu, _ = real_statistics("labelled", tmp_path, 8, 1, info=first, **kw)
    ds.images[:, :, :4] = 0  # other pixels, same fingerprint: the cache trusts the dataset's word
    mu_again, _ = real_statistics("labelled", tmp_path, 8, 1, info=again, **kw)
    assert not first["cache_hit"] and again["cache_hit"]
    np.testing.assert_array_equal(mu, mu_again)
    ds.tag = "b"  # a new fingerprint: recomputed from the new pixels, into a file of its own
    mu_other, _ = real_statistics("labelled", tmp_path, 8, 1, info=other, **kw)
    assert not other["cache_hit"] and other["cache_path"] != first["cache_path"] and not np.allclose(mu_other, mu)


# ----------------------------------------------------------------------------- Inception: protocol and offline


def test_inception_constants_match_torch_fidelity():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3 and URL_INCEPTION_V3.endswith("/" + INCEPTION_FILENAME)


def test_load_inception_offline_names_the_file_and_folder(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    with pytest.raises(FIDError) as e:
        load_inception("cpu")
    msg = str(e.value)
    assert "\n" not in msg and INCEPTION_URL in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert INCEPTION_FILENAME in msg
    with pytest.raises(FIDError, match="not found"):
        load_inception("cpu", weights_path=tmp_path / "missing.pth")


def test_load_inception_from_a_training_checkpoint_is_one_short_line(tmp_path):
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    save_checkpoint(
        {"model_config": model.config, "model": model.state_dict(), "ema": model.state_dict(), "step": 3},
        tmp_path / "last.pt",
    )
    (tmp_path / "other.pth").write_bytes(b"not weights at all")
    for path, needle in ((tmp_path / "last.pt", "training checkpoint"), (tmp_path / "other.pth", "Inception-v3")):
        with pytest.raises(FIDError) as e:
            load_inception("cpu", weights_path=path)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 400 and str(path) in msg and needle in msg, msg
        assert "Conv2d" not in msg and "Missing key" not in msg  # no dump of the state dict's keys


def test_load_inception_uses_the_legacy_tensorflow_resize(monkeypatch):
    """Same weights, same uint8 input: torchmetrics' module as configured equals torch-fidelity's original, and
    InceptionSuite gives its pool features, its unbiased logits and ADM's spatial features in one pass (the first 7
    channels of Mixed_6d's 1x1 branch, flattened in TF's (H, W, C) order)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    from evaluation.inception import InceptionSuite

    # random weights instead of a download: the test is about the pipeline, not the trained network
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    inception = load_inception("cpu")
    assert inception.use_antialias is False and inception.features_list == ["2048"] and not inception.training
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # He-scaled conv weights keep the 2048 features O(0.1) through the deep net
        for m in inception.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
    original = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    nn.Module.load_state_dict(original, inception.state_dict())
    seen = []
    original.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.append(out.clone()))
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    feats = extract_features(inception, x)
    ref, logits = original(x)
    assert feats.shape == (1, 2048) and ref.abs().mean() > 0.05
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        suite = InceptionSuite(inception)(x)
    spatial = seen[0][:, :7].permute(0, 2, 3, 1).reshape(1, -1)  # (1, 17 * 17 * 7)
    assert seen[0].shape == (1, 192, 17, 17) and suite["spatial"][0, 1] == seen[0][0, 1, 0, 0]
    for got, want in ((suite["pool"], ref), (suite["logits"], logits), (suite["spatial"], spatial)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    inception.use_antialias = True  # torchmetrics' default since 1.8: measurably another pipeline
    assert (extract_features(inception, x) - ref).abs().max() > 1e-2


# ----------------------------------------------------------------------------- evaluate.py end to end


def tiny_checkpoint(path: Path, data_path: Path) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():  # leave the zero init so the velocity is not identically 0
            p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    config = {"dataset": "digits", "data_path": str(data_path), "image_size": 8, "channels": 1}
    save_checkpoint({"model_config": model.config, "model": sd, "ema": sd, "step": 7, "config": config}, path)
    return model.eval()


def test_evaluate_end_to_end_with_injected_extractor(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "run" / "ckpt.pt"
    model = tiny_checkpoint(ckpt, tmp_path / "data")
    seen = []
    original_generate = Sampler.generate

    def spy(self, n, y=None, **kw):
        seen.append(y.clone())
        return original_generate(self, n, y, **kw)

    monkeypatch.setattr(Sampler, "generate", spy)
    argv = [
        "--ckpt",
        str(ckpt),
        "--num-samples",
        "45",
        "--steps",
        "2",
        "--method",
        "euler",
        "--batch-size",
        "16",
        "--seed",
        "3",
        "--stats-dir",
        str(tmp_path / "stats"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    cfg = evaluate.parse_args(argv)
    assert cfg.ema and cfg.dataset is None
    result = evaluate.main(cfg, extractor=TinyExtractor())
    monkeypatch.setattr(Sampler, "generate", original_generate)

    # class-balanced labels, in batches of 16
    assert [len(y) for y in seen] == [16, 16, 13]
    assert torch.cat(seen).tolist() == (torch.arange(45) % 10).tolist()

    # the JSON beside the checkpoint holds every setting and the numbers
    files = list((tmp_path / "run").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("ckpt.fid45-euler2-cfg1-ema-")
    data = json.loads(files[0].read_text())
    assert data == json.loads(json.dumps(result))
    assert data["num_samples"] == 45 and data["nfe"] == 2 and data["wall_time_s"] > 0
    assert data["step"] == 7 and data["ema"] is True and data["class_balanced"] and data["num_classes"] == 10
    ref = data["reference"]
    assert ref["dataset"] == "digits" and ref["split"] == "train" and data["image_size"] == 8
    assert data["channels"] == 1 and data["real_images"] == ref["num_images"] == 1797
    sampling = (
        "method",
        "steps",
        "grid",
        "grid_shift",
        "cfg_scale",
        "guidance_interval",
        "batch_size",
        "seed",
        "rtol",
        "atol",
    )
    assert {k: data["config"][k] for k in sampling} == {
        "method": "euler",
        "steps": 2,
        "grid": "uniform",
        "grid_shift": 3.0,
        "cfg_scale": 1.0,
        "guidance_interval": [0.0, 1.0],
        "batch_size": 16,
        "seed": 3,
        "rtol": 1e-5,
        "atol": 1e-5,
    }
    assert data["config"] == json.loads(json.dumps(asdict(cfg))) and "sampling" not in data  # the settings once
    assert data["method"] == "euler" and set(data["versions"]) == {"torch", "torchmetrics", "numpy", "scipy"}
    assert data["versions"]["numpy"] == np.__version__
    assert data["checkpoint"] == str(ckpt.resolve()) and Path(ref["cache_path"]).is_file()
    assert not ref["cache_hit"] and data["config"]["num_samples"] == 45 and data["metrics"] == ["fid"]
    assert not list((tmp_path / "run").glob("*.parts"))  # the shards are gone once the JSON is written
    assert f"FID {data['fid']:.4f}" in capsys.readouterr().out

    # known answer: the FID of the sampler's own seeded samples (sample i depends only on (seed, i))
    images = Sampler(model, steps=2, method="euler").sample(45, torch.arange(45) % 10, seed=3)
    ext = TinyExtractor()
    fs = FeatureStats()
    fs.update(extract_features(ext, images))
    real = dataset_statistics(build_dataset("digits", image_size=8, channels=1), ext, progress=False)
    assert data["fid"] == pytest.approx(frechet_distance(*real, *fs.mean_cov()), rel=1e-6)

    # the same settings again: refused before any work, then replaced with --overwrite (cache hit)
    with pytest.raises(ValueError, match="already exists"):
        evaluate.main(cfg, extractor=TinyExtractor())
    again = evaluate.main(evaluate.parse_args(argv + ["--overwrite"]), extractor=TinyExtractor())
    assert again["reference"]["cache_hit"] and again["fid"] == pytest.approx(data["fid"], rel=1e-9)
    # other settings: another file beside the first
    other = evaluate.main(evaluate.parse_args(argv + ["--cfg-scale", "2"]), extractor=TinyExtractor())
    assert len(list((tmp_path / "run").glob("*.json"))) == 2 and other["config"]["cfg_scale"] == 2.0


def test_compute_fid_on_an_in_memory_model_and_unconditional_labels():
    torch.manual_seed(1)
    model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    model.train()  # as in the training loop: the sampler switches to eval and back
    sampler = Sampler(model, steps=1, method="euler", batch_size=8)
    ext = TinyExtractor()
    real = dataset_statistics(build_dataset("digits", image_size=8, channels=3), ext, progress=False)
    fid, nfe = compute_fid(sampler, real, 20, extractor=ext, progress=False)
    assert nfe == 1 and fid > 0 and model.training
    # untrained DiT: zero velocity, so the samples are the clipped noise mapped to [0, 1]
    from sampling.options import seeded_noise

    fs = FeatureStats()
    fs.update(extract_features(ext, ((seeded_noise(0, range(20), (3, 8, 8)) + 1) / 2).clamp(0, 1)))
    assert fid == pytest.approx(frechet_distance(*real, *fs.mean_cov()), rel=1e-6)


def test_evaluate_cli_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_inception", lambda *a, **k: pytest.fail("Inception must not be loaded"))
    with pytest.raises(SystemExit) as e:
        evaluate.cli(["--ckpt", str(tmp_path / "missing.pt"), "--stats-dir", str(tmp_path)])
    assert str(e.value).startswith("error: checkpoint not found") and "\n" not in str(e.value) and e.value.code == 2
    ckpt = tmp_path / "c.pt"
    tiny_checkpoint(ckpt, tmp_path)
    with pytest.raises(SystemExit) as e:  # the digits are gray: CIFAR-10 does not fit a 1-channel model
        evaluate.cli(
            [
                "--ckpt",
                str(ckpt),
                "--dataset",
                "cifar10",
                "--data-path",
                str(tmp_path / "none"),
                "--stats-dir",
                str(tmp_path),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
    assert str(e.value).startswith("error:") and "3 channels" in str(e.value)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU bf16 RMSNorm is not fused
def test_evaluate_records_the_resolved_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_inception", lambda *a, **k: pytest.fail("Inception must not be loaded"))
    ckpt = tmp_path / "run" / "ckpt.pt"
    tiny_checkpoint(ckpt, tmp_path / "data")
    argv = [
        "--ckpt",
        str(ckpt),
        "--num-samples",
        "20",
        "--steps",
        "1",
        "--method",
        "euler",
        "--batch-size",
        "20",
        "--stats-dir",
        str(tmp_path / "stats"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    auto = evaluate.main(evaluate.parse_args(argv), extractor=TinyExtractor())
    bf16 = evaluate.main(evaluate.parse_args([*argv, "--precision", "bf16"]), extractor=TinyExtractor())
    # auto is fp32 on the CPU; the JSON keeps both what was asked and what ran, and bf16 gets its own file
    assert auto["network_precision"] == "fp32" and auto["config"]["precision"] == "auto"
    assert bf16["network_precision"] == "bf16" and bf16["config"]["precision"] == "bf16"
    files = sorted(f.name for f in (tmp_path / "run").glob("*.json"))
    assert len(files) == 2 and any("-ema-fp32-" in f for f in files) and any("-ema-bf16-" in f for f in files)
    assert bf16["fid"] != auto["fid"] and bf16["fid"] == pytest.approx(auto["fid"], rel=0.5)
    for f in files:
        data = json.loads((tmp_path / "run" / f).read_text())
        assert data["network_precision"] in f


def test_evaluate_records_the_resolved_method(tmp_path, monkeypatch):
    """Without --method the checkpoint's objective's sample_method runs, and names the file and the JSON."""
    from objectives import OBJECTIVES

    monkeypatch.setattr(evaluate, "load_inception", lambda *a, **k: pytest.fail("Inception must not be loaded"))
    for objective in (None, *OBJECTIVES):  # None: an older checkpoint that names no objective (a flow model)
        torch.manual_seed(0)
        network = OBJECTIVES[objective or "flow"]().network_options()
        model = DiT(
            input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10, **network
        )
        config = {"dataset": "digits", "data_path": str(tmp_path / "data")}
        if objective is not None:
            config["objective"] = objective
        run = tmp_path / str(objective)
        save_checkpoint(
            {
                "model_config": model.config,
                "model": model.state_dict(),
                "ema": model.state_dict(),
                "step": 1,
                "config": config,
            },
            run / "ckpt.pt",
        )
        argv = [
            "--ckpt",
            str(run / "ckpt.pt"),
            "--num-samples",
            "10",
            "--steps",
            "2",
            "--batch-size",
            "10",
            "--stats-dir",
            str(tmp_path / "stats"),
            "--device",
            "cpu",
            "--no-progress",
        ]
        result = evaluate.main(evaluate.parse_args(argv), extractor=TinyExtractor())
        method = OBJECTIVES[objective or "flow"].sample_method
        assert result["method"] == method and result["config"]["method"] is None, objective
        assert result["nfe"] == {"heun": 4, "mean": 2}[method]
        (file,) = run.glob("*.json")
        assert file.name.startswith(f"ckpt.fid10-{method}2-cfg1-ema-fp32-"), file.name
        explicit = evaluate.main(evaluate.parse_args([*argv, "--method", "euler"]), extractor=TinyExtractor())
        assert explicit["method"] == "euler" and explicit["nfe"] == 2 and len(list(run.glob("*euler2*.json"))) == 1


def test_evaluate_bad_device_is_one_line_before_any_work(tmp_path):
    cases = [("foo", "unknown device 'foo'")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "no CUDA device is available"))
    for device, message in cases:
        with pytest.raises(SystemExit) as e:  # the device is checked before the (missing) checkpoint is read
            evaluate.cli(["--ckpt", str(tmp_path / "missing.pt"), "--device", device, "--stats-dir", str(tmp_path)])
        text = str(e.value)
        assert text.startswith("error:") and message in text and "\n" not in text, text


def merged(*shares: FeatureStats) -> FeatureStats:
    """The statistics of disjoint shares together: their sums added, as ``all_reduce_`` adds them across processes."""
    out = FeatureStats()
    out.count = sum(s.count for s in shares)
    out.sum = sum(s.sum for s in shares if s.sum is not None)
    out.outer = sum(s.outer for s in shares if s.outer is not None)
    return out


def test_feature_stats_of_disjoint_shares_merge_to_the_whole():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    whole, a, b, empty = FeatureStats(), FeatureStats(), FeatureStats(), FeatureStats()
    whole.update(x)
    a.update(x[0::2])
    b.update(x[1::2])
    both = merged(a, empty, b)  # a process with no samples adds nothing
    assert both.count == 50
    for got, want in zip(both.mean_cov(), whole.mean_cov(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(both.mean_cov()[1], np.cov(x.numpy(), rowvar=False), rtol=1e-10)


def test_generated_statistics_split_over_ranks_merge_to_the_single_process_ones(monkeypatch):
    """Rank r of w samples the indices r::w with their own noise and labels: the summed shares are the whole."""
    from evaluation.fid import generated_statistics

    torch.manual_seed(2)
    model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with torch.no_grad():  # not the zero-output initialisation: samples depend on their noise and label
        for p in model.parameters():
            p.normal_(0, 0.3)
    sampler = Sampler(model, steps=2, method="euler", batch_size=3)
    ext = TinyExtractor()
    mu, sigma, nfe = generated_statistics(sampler, 11, extractor=ext, seed=3, progress=False)
    # Without a process group the all-reduce would be a no-op: capture each rank's sums instead.
    shares = []
    monkeypatch.setattr(FeatureStats, "all_reduce_", lambda self: shares.append(self) or self)
    for rank in range(3):
        *_, rank_nfe = generated_statistics(sampler, 11, extractor=ext, seed=3, progress=False, rank=rank, world_size=3)
        assert rank_nfe == nfe == 2
    assert [s.count for s in shares] == [4, 4, 3]
    m_mu, m_sigma = merged(*shares).mean_cov()
    np.testing.assert_allclose(m_mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(m_sigma, sigma, rtol=1e-6, atol=1e-9)


def test_every_rank_asks_should_stop_as_often_and_a_stop_returns_nothing(monkeypatch):
    """Under DDP should_stop is a collective (StopRequest.check): a rank with a batch fewer asks it as often."""
    from evaluation.fid import generated_statistics
    from sampling.options import SamplingStopped

    model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    sampler = Sampler(model, steps=1, method="euler", batch_size=2)
    monkeypatch.setattr(FeatureStats, "all_reduce_", lambda self: self)  # each rank's own share
    asked = []
    for rank in range(2):  # 9 samples: shares of 5 and 4, in 3 and 2 batches of 2
        calls = []
        generated_statistics(
            sampler,
            9,
            extractor=TinyExtractor(),
            progress=False,
            rank=rank,
            world_size=2,
            should_stop=lambda calls=calls: calls.append(1) is None and False,
        )
        asked.append(len(calls))
    assert asked == [4, 4]  # before each of 3 batches, and once after them
    with pytest.raises(SamplingStopped):
        generated_statistics(sampler, 9, extractor=TinyExtractor(), progress=False, should_stop=lambda: True)
