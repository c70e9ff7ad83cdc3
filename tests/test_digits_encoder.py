"""The REPA digits encoder (benchmarks/digits_encoder.py): its export loads with a dynamic batch, computes what the
eager module computes and is the same for a seed; and the REPA rows of benchmarks/convergence.py train what they say."""

import dataclasses

import pytest
import torch

import train
from benchmarks import convergence
from benchmarks.digits_encoder import cli, export_encoder, train_encoder
from training.config import resolve


@pytest.fixture(scope="module")
def trained():
    return train_encoder(seed=0, steps=60)


def test_the_exported_encoder_takes_any_batch_and_matches_the_eager_one(trained, tmp_path):
    loaded = torch.export.load(export_encoder(trained.encoder, tmp_path / "encoder.pt2")).module()
    for batch in (1, 5):
        x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        tokens = loaded(x)
        assert tokens.shape == (batch, 16, 64)
        expected = trained.encoder(x)
        torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_the_encoder_learns_the_digits_and_is_frozen(trained):
    assert trained.heldout_accuracy > 0.8  # 60 steps; chance is 0.1
    assert not trained.encoder.training
    assert not any(p.requires_grad for p in trained.encoder.parameters())


def test_a_seed_gives_the_same_exported_encoder(trained, tmp_path):
    again = train_encoder(seed=0, steps=60)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = torch.export.load(export_encoder(trained.encoder, tmp_path / "a.pt2")).module()(x)
    second = torch.export.load(export_encoder(again.encoder, tmp_path / "b.pt2")).module()(x)
    assert torch.equal(first, second)
    assert not torch.equal(train_encoder(seed=1, steps=2).encoder(x), train_encoder(seed=0, steps=2).encoder(x))


def test_the_cli_writes_the_file_atomically_and_rejects_a_bad_name(tmp_path, capsys):
    cli(["--out", str(tmp_path / "e.pt2"), "--steps", "2"])
    assert [p.name for p in tmp_path.iterdir()] == ["e.pt2"]  # no temporary file left
    assert "held-out accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli(["--out", str(tmp_path / "e.pt"), "--steps", "2"])
    assert e.value.code == 2


def repa_settings(monkeypatch, tmp_path, argv: list[str]) -> dict[str, dict]:
    """The settings convergence.cli trains each run with, {OUT/ROW/seedS: settings}, training nothing."""
    runs = {}

    def fake_train_and_judge(settings, at, methods, n):
        runs[settings["out"]] = settings
        return {"quality": {str(s): [{"fd": 0.1, "accuracy": 0.9}] for s in at}, "ms_per_step": 10.0}

    monkeypatch.setattr(convergence, "train_and_judge", fake_train_and_judge)
    monkeypatch.setattr(convergence, "encoder_file", lambda out: out / "digits-encoder.pt2")
    convergence.cli([*argv, "--at", "250", "--out", str(tmp_path)])
    return {str(k).removeprefix(str(tmp_path) + "/"): v for k, v in runs.items()}


def test_the_repa_row_trains_the_lightning_row_with_repa_and_the_digits_encoder(monkeypatch, tmp_path, capsys):
    runs = repa_settings(monkeypatch, tmp_path, ["--rows", "lightning", "repa", "--seeds", "0"])
    assert list(runs) == ["lightning/seed0", "repa/seed0"]
    args = convergence.train_args(runs["repa/seed0"])
    lightning = convergence.train_args(runs["lightning/seed0"])
    added = ["--repa-weight", "0.5", "--repa-depth", "2", "--repa-projector-dim", "256"]
    added += ["--repa-encoder", f"{tmp_path}/digits-encoder.pt2"]
    assert args == [*lightning[: lightning.index("--seed")], *added, "--seed", "0", "--out", f"{tmp_path}/repa/seed0"]
    assert "lightning + REPA (weight 0.5, after block 2)" in capsys.readouterr().out


def test_the_lightning_row_is_recipe_lightning():
    """So the REPA row is --recipe lightning --repa-weight 0.5 ...: the same resolved settings but the recipe's name."""
    spelled = train.parse_args(convergence.train_args({**convergence.BASE, **convergence.row_flags("lightning")}))
    named = train.parse_args(convergence.train_args({**convergence.BASE, "recipe": "lightning"}))
    cpu = torch.device("cpu")
    assert dataclasses.replace(resolve(spelled, cpu), recipe="lightning") == resolve(named, cpu)


def test_the_repa_sweep_adds_a_row_per_pair(monkeypatch, tmp_path):
    argv = ["--rows", "none", "--seeds", "1", "--repa-weights", "0.5", "1", "--repa-depths", "1", "2"]
    runs = repa_settings(monkeypatch, tmp_path, argv)
    assert list(runs) == ["repa/seed1", "repa-w0.5-d1/seed1", "repa-w1-d1/seed1", "repa-w1-d2/seed1"]  # table order
    assert [(r["repa_weight"], r["repa_depth"]) for r in runs.values()] == [(0.5, 2), (0.5, 1), (1.0, 1), (1.0, 2)]
    with pytest.raises(SystemExit):
        convergence.cli(["--rows", "none", "--repa-depths", "5", "--out", str(tmp_path)])


@pytest.mark.skipif(
    "repa_weight" not in {f.name for f in dataclasses.fields(train.TrainConfig)}, reason="train.py has no REPA yet"
)
def test_train_py_takes_the_repa_row(monkeypatch, tmp_path):
    runs = repa_settings(monkeypatch, tmp_path, ["--rows", "repa", "--seeds", "0"])
    cfg = train.parse_args(convergence.train_args(runs["repa/seed0"]))
    assert (cfg.repa_weight, cfg.repa_depth, cfg.repa_projector_dim) == (0.5, 2, 256)
