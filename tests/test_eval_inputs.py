"""Bad input to evaluate.py, sampler.py and train.py's FID reference: one line, exit 2, before any work; where
sampler.py writes its grid."""

import numpy as np
import pytest
import torch
from test_fid import TinyExtractor, tiny_checkpoint
from test_train import cli_args, tiny

import evaluate
import sampler as sampler_cli
import train
from evaluation.fid import FIDError, reference_statistics
from models.dit import DiT
from sampling.sampler import Sampler
from utils.checkpoint import save_checkpoint


def bad_reference_files(tmp_path, d: int = 4) -> dict:
    """File name -> (what the message must say); the files written under tmp_path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, d))  # 3 samples in 4-d: a singular covariance, negative eigenvalues are round-off
    cases = {
        "missing.npz": (None, "not found"),
        "single.npy": (np.zeros(3), "single array (.npy)"),
        "random.npz": (rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), "is not an npz file"),
        "images.npz": ({"arr_0": np.zeros((1, 2, 2, 3), np.uint8)}, "mu, sigma missing"),
        "shapes.npz": ({"mu": np.zeros(d), "sigma": np.eye(d + 1)}, "are not a mean (D,) and its covariance"),
        "dim.npz": ({"mu": np.zeros(d + 1), "sigma": np.eye(d + 1)}, "5-d statistics; the feature extractor gives 4"),
        "nan.npz": ({"mu": np.full(d, np.nan), "sigma": np.eye(d)}, "NaN or inf"),
        "asymmetric.npz": ({"mu": np.zeros(d), "sigma": np.eye(d) + np.triu(np.ones((d, d)), 1)}, "not symmetric"),
        "negative.npz": ({"mu": np.zeros(d), "sigma": -np.eye(d)}, "eigenvalue -1 < 0"),
        "good.npz": ({"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}, None),
    }
    for name, (content, _) in cases.items():
        if isinstance(content, dict):
            np.savez(tmp_path / name, **content)
        elif isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            np.save(tmp_path / name, content)
    return {name: message for name, (_, message) in cases.items()}


def test_reference_statistics_are_checked_with_one_line_each(tmp_path):
    four = torch.nn.Identity()
    four.num_features = 4  # what load_inception's module says of itself (2048 there)
    for name, message in bad_reference_files(tmp_path).items():
        if message is None:
            mu, sigma = reference_statistics(tmp_path / name, four)
            assert mu.shape == (4,) and np.linalg.eigvalsh(sigma)[0] < 0  # round-off below zero is accepted
            continue
        with pytest.raises(FIDError) as e:
            reference_statistics(tmp_path / name, four)
        text = str(e.value)
        assert message in text and "\n" not in text and "allow_pickle" not in text and str(tmp_path) in text, text
    with pytest.raises(FIDError, match="4-d statistics; the feature extractor gives 2048"):  # Inception's D
        reference_statistics(tmp_path / "good.npz")


def test_evaluate_refuses_bad_reference_statistics_before_sampling(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "run" / "ckpt.pt"
    tiny_checkpoint(ckpt, tmp_path / "data")
    bad_reference_files(tmp_path, d=2048)  # Inception's D
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("sampled before checking --ref-stats"))
    monkeypatch.setattr(evaluate, "load_inception", lambda *a, **k: pytest.fail("Inception loaded first"))
    for name, message in [("nan.npz", "NaN or inf"), ("negative.npz", "< 0"), ("random.npz", "not an npz")]:
        argv = ["--ckpt", str(ckpt), "--ref-stats", str(tmp_path / name), "--device", "cpu", "--no-progress"]
        with pytest.raises(SystemExit) as e:
            evaluate.cli(argv)
        assert e.value.code == 2 and message in str(e.value)
        err = capsys.readouterr().err
        assert err.startswith("evaluate.py: error: --ref-stats") and err.count("\n") == 1, err


def test_train_refuses_a_missing_reference_at_start_up(tmp_path, capsys):
    args = cli_args(tiny(tmp_path / "out", fid_every=6)) + ["--fid-ref-stats", str(tmp_path / "missing.npz")]
    assert train.cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"train.py: error: --fid-ref-stats {tmp_path / 'missing.npz'} not found"
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_offline_inception_message_names_no_flag_train_lacks(tmp_path, monkeypatch):
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    from evaluation.fid import load_inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    with pytest.raises(FIDError) as e:
        load_inception("cpu")
    assert "--inception-weights" not in str(e.value) and str(tmp_path / "hub" / "checkpoints") in str(e.value)


def test_evaluate_builds_its_sampler_from_the_checkpoint_and_refuses_no_decode(tmp_path, monkeypatch):
    ckpt = tmp_path / "run" / "ckpt.pt"
    tiny_checkpoint(ckpt, tmp_path / "data")
    built = []
    original = Sampler.from_checkpoint.__func__

    def spy(cls, path, *args, **kwargs):
        built.append(kwargs)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(Sampler, "from_checkpoint", classmethod(spy))
    argv = ["--ckpt", str(ckpt), "--num-samples", "4", "--steps", "1", "--method", "euler", "--device", "cpu"]
    argv += ["--stats-dir", str(tmp_path / "stats"), "--no-progress", "--cfg-scale", "1.5"]
    result = evaluate.main(evaluate.parse_args(argv), extractor=TinyExtractor())
    assert len(built) == 1 and built[0]["cfg_scale"] == 1.5 and built[0]["steps"] == 1 and result["nfe"] == 1
    with pytest.raises(SystemExit) as e:
        evaluate.cli([*argv, "--no-decode"])
    assert e.value.code == 2 and "--no-decode" in str(e.value) and "\n" not in str(e.value)


def latent_checkpoint(path) -> None:
    """A DiT of 4-channel 4x4 "latents" whose checkpoint names a VAE that --no-decode never loads."""
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    space = {"vae": "/nowhere/vae", "image_size": 32, "image_channels": 3, "latent_shape": [4, 4, 4]}
    sd = model.state_dict()
    save_checkpoint({"model_config": model.config, "model": sd, "ema": sd, "step": 1, "latent_space": space}, path)


def test_sampler_no_decode_ignores_a_grid_it_does_not_write(tmp_path, monkeypatch):
    latent_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    monkeypatch.chdir(tmp_path)
    for grid in (tmp_path / "samples.png", tmp_path / "run" / "samples.png"):
        grid.write_bytes(b"an earlier grid")
    argv = ["--ckpt", "run/checkpoints/last.pt", "--no-decode", "--npz", "x.npz", "--n", "2", "--steps", "1"]
    result = sampler_cli.main(sampler_cli.parse_args([*argv, "--device", "cpu"]))
    assert result["images"].shape == (2, 4, 4, 4) and (tmp_path / "x.npz").is_file()
    assert (tmp_path / "run" / "samples.png").read_bytes() == b"an earlier grid"


def test_sampler_writes_its_grid_in_the_run_folder_and_exits_2_on_bad_input(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    tiny_checkpoint(ckpt, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    argv = ["--ckpt", str(ckpt), "--n", "2", "--steps", "1", "--device", "cpu"]
    sampler_cli.cli(argv)
    assert (tmp_path / "run" / "samples.png").is_file() and not (tmp_path / "samples.png").exists()
    assert str(tmp_path / "run" / "samples.png") in capsys.readouterr().out
    for bad in (argv, ["--ckpt", str(tmp_path / "missing.pt")]):  # the grid exists now; a missing checkpoint
        with pytest.raises(SystemExit) as e:
            sampler_cli.cli(bad)
        assert e.value.code == 2 and str(e.value).startswith("error:")
        assert capsys.readouterr().err.startswith("sampler.py: error:")
    with pytest.raises(SystemExit) as e:
        evaluate.cli(["--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"])
    assert e.value.code == 2 and "checkpoint not found" in str(e.value)
