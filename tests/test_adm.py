"""ADM's evaluation suite: precision/recall against a brute-force float64 reference, sFID as the Fréchet distance of
the spatial features, ADM batches (streamed, same bytes), and evaluate.py
scoring a batch, sampling on two processes and resuming after SIGKILL and SIGTERM to the same bytes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from stand_ins import CHILD_ENV, Features
from test_fid import TinyExtractor, tiny_checkpoint

import evaluate
from evaluation.adm import check_reference, read_images, write_batch
from evaluation.inception import extract_features
from evaluation.metrics import FeatureStats, FIDError, frechet_distance, inception_score, precision_recall
from utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 from every pairwise distance, float64: radius = distance to the k-th nearest other."""

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))  # (N_real, N_fake)
    return float((d <= radii(real)[:, None]).any(0).mean()), float((d <= radii(fake)[None]).any(1).mean())


def test_precision_recall_equals_the_brute_force_definition_with_duplicates_and_ties():
    rng = np.random.default_rng(0)
    # Small integers: many duplicates and equal distances, all exact in float32 and float64 alike.
    real, fake = rng.integers(0, 3, (60, 5)).astype(np.float64), rng.integers(0, 4, (45, 5)).astype(np.float64)
    fake[:10] = real[:10]  # shared points
    answers = set()
    for k in (1, 3, 5):
        expected = brute_force_precision_recall(real, fake, k)
        answers.add(expected)
        for dtype in (torch.float64, torch.float32):
            got = precision_recall(torch.tensor(real, dtype=dtype), torch.tensor(fake, dtype=dtype), k, batch_size=16)
            assert got == expected, (k, dtype)
    assert len(answers) == 3  # k matters here
    x = rng.standard_normal((50, 8))
    assert precision_recall(x, x.copy(), k=3, batch_size=7) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    with pytest.raises(FIDError, match="more than 3 images"):
        precision_recall(x[:3], x, k=3)


class Spatial(nn.Module):
    """A stand-in for Inception's spatial features: uint8 (N, 3, H, W) -> (N, 18), a 3 x 3 map of 2 channels."""

    num_features = 18

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(self.conv(x.float() / 255), 3).flatten(1)


class Logits(nn.Module):
    """A stand-in for Inception's class logits: uint8 (N, 3, H, W) -> (N, 5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x.float().mean((2, 3)) / 255 * 8)


def features(module: nn.Module, images: np.ndarray) -> torch.Tensor:
    return extract_features(module, torch.from_numpy(images).permute(0, 3, 1, 2))


def stats(module: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fs = FeatureStats()
    fs.update(features(module, images))
    return fs.mean_cov()


def batches(rng: np.random.Generator, n: int, size: int = 8, shift: int = 0) -> np.ndarray:
    return np.clip(rng.integers(0, 200, (n, size, size, 3)) + shift, 0, 255).astype(np.uint8)


def test_a_batch_is_scored_as_adm_defines_each_number(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pool, spatial, logits = TinyExtractor(), Spatial(), Logits()
    ref_images, samples = batches(rng, 40), batches(rng, 30, shift=20)
    mu, sigma = stats(pool, batches(rng, 50))  # precomputed statistics of other images, as ADM's are
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=mu, sigma=sigma)  # no mu_s: sFID from the images
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(30))
    argv = ["--samples", str(tmp_path / "samples.npz"), "--ref-batch", str(tmp_path / "ref.npz"), "--no-progress"]
    cfg = evaluate.parse_args([*argv, "--device", "cpu"])
    result = evaluate.main(cfg, extractor=pool, spatial_extractor=spatial, logits_extractor=logits)

    assert result["fid"] == pytest.approx(frechet_distance(mu, sigma, *stats(pool, samples)), rel=1e-9)
    sfid = frechet_distance(*stats(spatial, ref_images), *stats(spatial, samples))
    assert result["sfid"] == pytest.approx(sfid, rel=1e-9) and sfid > 0
    score_is = inception_score(features(logits, samples))
    assert (result["inception_score"], result["inception_score_std"]) == pytest.approx(score_is, rel=1e-9)
    pr = precision_recall(features(pool, ref_images), features(pool, samples), k=3)
    assert (result["precision"], result["recall"]) == pr and 0 < pr[0] < 1 and 0 < pr[1] < 1
    assert result["metrics"] == ["fid", "sfid", "is", "pr"] and result["num_samples"] == 30
    out = tmp_path / "samples.vs-ref.json"
    assert (
        json.loads(out.read_text())["sfid"] == result["sfid"]
        and f"sFID {result['sfid']:.4f}" in capsys.readouterr().out
    )

    # mu_s and sigma_s, when the batch has them, are taken as they are
    mu_s, sigma_s = stats(spatial, batches(rng, 20))
    np.savez(tmp_path / "ref2.npz", arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    cfg = evaluate.parse_args([*argv[:2], "--ref-batch", str(tmp_path / "ref2.npz"), "--metrics", "sfid"])
    again = evaluate.main(cfg, extractor=pool, spatial_extractor=spatial)
    assert again["sfid"] == pytest.approx(frechet_distance(mu_s, sigma_s, *stats(spatial, samples)), rel=1e-9)
    assert again["fid"] is None and again["precision"] is None


def test_a_reference_batch_without_what_a_metric_needs_is_one_line(tmp_path):
    mu, sigma = np.zeros(16), np.eye(16)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    dims = {"pool": 16, "spatial": 18}
    assert set(check_reference(tmp_path / "stats.npz", ["fid", "is"], dims)) == {"fid"}
    with pytest.raises(FIDError) as e:
        check_reference(tmp_path / "stats.npz", ["fid", "sfid", "is", "pr"], dims)
    text = str(e.value)
    assert "lacks what sfid, pr need" in text and "mu_s and sigma_s" in text and "\n" not in text, text
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(FIDError, match=r"not uint8 images \(N, H, W, 3\)"):
        check_reference(tmp_path / "gray.npz", ["pr"], dims)
    (tmp_path / "random.npz").write_bytes(os.urandom(3000))
    np.savez(tmp_path / "s.npz", arr_0=batches(np.random.default_rng(0), 4))
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # Inception's D: no extractor given
    for argv, message in [
        (["--samples", str(tmp_path / "random.npz"), "--ref-stats", str(tmp_path / "inception.npz")], "not an npz"),
        (["--samples", str(tmp_path / "s.npz"), "--ref-batch", str(tmp_path / "inception.npz")], "lacks what sfid, pr"),
        (["--samples", str(tmp_path / "s.npz")], "needs one reference"),
        (["--ckpt", "x.pt", "--metrics", "pr"], "need a reference batch"),
    ]:
        with pytest.raises(SystemExit) as e:
            evaluate.cli(argv)
        assert e.value.code == 2 and message in str(e.value) and "\n" not in str(e.value), argv


def test_batches_are_streamed_and_written_to_the_same_bytes(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = batches(rng, 10), np.arange(10) % 3
    for name in ("a.npz", "b.npz"):
        write_batch(tmp_path / name, np.array_split(images, 3), 10, labels)
        time.sleep(1.1)  # np.savez would stamp another time into the second file
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as f:
        assert np.array_equal(f["arr_0"], images) and f["arr_1"].tolist() == labels.tolist()
    assert [b.shape[0] for b in read_images(tmp_path / "a.npz", 4)] == [4, 4, 2]
    assert np.array_equal(np.concatenate(list(read_images(tmp_path / "a.npz", 4))), images)
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(FIDError, match="not an npz file"):  # the zip index at the end is gone
        list(read_images(tmp_path / "cut.npz"))


# ----------------------------------------------------------------------------- evaluate.py from a checkpoint

# evaluate.py's command line with Features in place of Inception (which the tests must not download).
SCRIPT = """
import functools, sys
import evaluate
from utils.config import ConfigError
from stand_ins import Features
evaluate.main = functools.partial(evaluate.main, extractor=Features())
evaluate.cli(sys.argv[1:])
"""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def command(tmp_path: Path, name: str, *extra: str) -> list[str]:
    script = tmp_path / "evaluate_features.py"
    script.write_text(SCRIPT)
    flags = ["--ckpt", str(tmp_path / "run/ckpt.pt"), "--num-samples", "36", "--batch-size", "4", "--steps", "30"]
    flags += ["--method", "heun", "--device", "cpu", "--stats-dir", str(tmp_path / "stats"), "--seed", "1"]
    return [
        str(script),
        *flags,
        "--out-json",
        str(tmp_path / f"{name}.json"),
        "--save-npz",
        str(tmp_path / f"{name}.npz"),
        *extra,
    ]


def run(
    cmd: list[str], launcher=(sys.executable,), signal_at: int | None = None, sig=None
) -> subprocess.CompletedProcess:
    """Run an evaluate.py command; with signal_at, send sig once that many shards are written (from outside)."""
    env = {**CHILD_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen(
        [*launcher, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if signal_at is not None:
        parts = Path(cmd[cmd.index("--out-json") + 1]).with_suffix(".parts")
        while proc.poll() is None and len(list(parts.glob("0*.npz"))) < signal_at:
            time.sleep(0.005)
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted one-process evaluation: its npz bytes and JSON."""
    tmp_path = tmp_path_factory.mktemp("whole")
    tiny_checkpoint(tmp_path / "run/ckpt.pt", tmp_path / "data")
    done = run(command(tmp_path, "whole"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "img/s" in done.stderr  # progress: images per second and time left
    return tmp_path, (tmp_path / "whole.npz").read_bytes(), json.loads((tmp_path / "whole.json").read_text())


def test_a_killed_and_a_stopped_evaluation_continue_to_the_same_bytes(whole):
    tmp_path, npz, result = whole
    cmd = command(tmp_path, "resumed")
    killed = run(cmd, signal_at=2, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    parts = tmp_path / "resumed.parts"
    first = len(list(parts.glob("0*.npz")))
    stopped = run(cmd, signal_at=first + 2, sig=signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM; run the same command to continue" in stopped.stderr
    assert first < len(list(parts.glob("0*.npz"))) < 9  # the finished shards are kept, nothing more
    with pytest.raises(ConfigError, match=r"resumed.parts holds samples of other settings \(cfg_scale 1.0 -> 2.0\)"):
        evaluate.main(evaluate.parse_args([*cmd[1:], "--cfg-scale", "2"]), extractor=Features())
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "resumed.npz").read_bytes() == npz and not parts.exists()
    assert json.loads((tmp_path / "resumed.json").read_text())["fid"] == result["fid"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_write_the_same_batch_and_numbers_as_one(whole):
    tmp_path, npz, result = whole
    done = run(command(tmp_path, "two"), launcher=TORCHRUN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("FID") == 1  # the main process scores
    two = json.loads((tmp_path / "two.json").read_text())
    assert (tmp_path / "two.npz").read_bytes() == npz and two["world_size"] == 2 and result["world_size"] == 1
    assert two["fid"] == result["fid"] and two["nfe"] == result["nfe"] == 60
    with np.load(tmp_path / "two.npz") as f:
        assert f["arr_0"].shape == (36, 8, 8, 3) and f["arr_1"].tolist() == (np.arange(36) % 10).tolist()


def test_a_checkpoint_evaluation_reports_the_five_numbers_of_its_own_batch(tmp_path):
    ckpt = tmp_path / "run" / "ckpt.pt"
    tiny_checkpoint(ckpt, tmp_path / "data")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=batches(rng, 24))  # statistics from its images
    extractors = dict(extractor=TinyExtractor(), spatial_extractor=Spatial(), logits_extractor=Logits())
    argv = ["--ckpt", str(ckpt), "--num-samples", "20", "--steps", "2", "--method", "euler", "--device", "cpu"]
    argv += ["--ref-batch", str(tmp_path / "ref.npz"), "--save-npz", str(tmp_path / "s.npz"), "--no-progress"]
    result = evaluate.main(evaluate.parse_args(argv), **extractors)
    assert all(np.isfinite(result[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall"))
    argv = ["--samples", str(tmp_path / "s.npz"), "--ref-batch", str(tmp_path / "ref.npz"), "--no-progress"]
    again = evaluate.main(evaluate.parse_args(argv), **extractors)
    for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert again[k] == result[k], k
    assert (tmp_path / "s.vs-ref.json").is_file() and result["network_precision"] == "fp32"
