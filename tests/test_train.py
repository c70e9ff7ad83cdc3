"""train.py on CPU: learning on digits, bit-exact resume after --steps (tests/test_preemption.py: after kills), non-finite
losses, wandb offline files, presets and flags, and every kind of bad input."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import Features, wandb_history

import train
from models import model_from_checkpoint
from objectives.flow import FlowMatching
from train import NonFiniteLossError, TrainConfig, parse_args
from utils.checkpoint import load_checkpoint, prune_checkpoints
from utils.config import ConfigError, build_parser, flag_values

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(out: Path, **overrides) -> TrainConfig:
    """A seconds-long digits run: 8x8 gray images, a one-block DiT."""
    cfg = TrainConfig(
        dataset="digits",
        image_size=8,
        channels=1,
        flip=False,
        model="DiT-XS/2",
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_registers=2,
        steps=12,
        batch_size=32,
        lr=1e-3,
        warmup=3,
        ema_decay=0.9,
        sample_every=0,
        ckpt_every=4,
        log_every=2,
        out=str(out),
        wandb="disabled",
        num_workers=0,
        seed=0,
        samples_per_class=1,
        sample_steps=2,
        cfg_scales=(1.0, 3.0),
        fid_every=0,
    )
    return dataclasses.replace(cfg, **overrides)


def cli_args(cfg: TrainConfig) -> list[str]:
    """The command line that parse_args turns into cfg."""
    return flag_values(cfg)


def weights(ckpt_path: Path) -> dict:
    state = load_checkpoint(ckpt_path)
    return {"model": state["model"], "ema": state["ema"], "optimizer": state["optimizer"]["state"]}


def assert_same(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for i, sa in a["optimizer"].items():
        for k, v in sa.items():
            assert torch.equal(v, b["optimizer"][i][k]), f"optimizer state {i}.{k} differs"


def run_subprocess(args: list[str], env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------- learning


def learning_run(out: Path, **overrides) -> TrainConfig:
    """tiny() grown to a run that learns the digits in a few hundred steps (a 2-block DiT of width 64)."""
    settings = dict(hidden_size=64, depth=2, num_heads=4, batch_size=128, lr=2e-3, warmup=50, ema_decay=0.98)
    return tiny(out, **settings, ckpt_every=0, log_every=25, **overrides)


def sample_accuracy(checkpoint: Path) -> float:
    """How often 20 EMA samples of each digit (Heun 20 steps, guidance 2.5) are classified as their label by a
    logistic regression fitted on the real digits (chance: 0.1)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from sampler import Sampler

    digits = load_digits()
    clf = LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)  # pixels in [0, 1]
    ema = model_from_checkpoint(checkpoint)  # the saved EMA, as a user would load it
    y = torch.arange(10).repeat_interleave(20)
    images = Sampler(ema, steps=20).sample(200, y, cfg_scale=2.5, seed=1)  # (200, 1, 8, 8) in [0, 1]
    return float((clf.predict(images.reshape(200, -1).numpy()) == y.numpy()).mean())


def test_digits_run_learns_loss_falls_and_samples_classify_as_their_labels(tmp_path):
    result = train.main(learning_run(tmp_path / "run", steps=400))
    losses = [loss for _, loss in result["losses"]]
    assert result["step"] == 400 and len(losses) == 16
    assert losses[-1] < 0.6 * losses[0], losses
    accuracy = sample_accuracy(result["checkpoint"])
    print(f"EMA sample accuracy {accuracy:.3f}, losses {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert accuracy > 0.7, accuracy  # chance is 0.1


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("variant", ["loader", "on-device+ot"])
def test_resume_after_stopping_at_k_is_bit_identical(tmp_path, variant):
    extra = (
        dict(data_on_device=False)
        if variant == "loader"
        else dict(data_on_device=True, objective_args=dict(ot=True, t_sampler="uniform"))
    )
    # Samples every 4 steps: drawing them must not disturb the training randomness.
    full = train.main(tiny(tmp_path / "full", sample_every=4, **extra))
    # --keep-checkpoints 0 keeps every numbered checkpoint, so all of them can be listed below.
    stopped = train.main(tiny(tmp_path / "split", sample_every=4, steps=6, keep_checkpoints=0, **extra))
    assert stopped["step"] == 6 and load_checkpoint(tmp_path / "split/checkpoints/last.pt")["step"] == 6
    resumed = train.main(tiny(tmp_path / "split", sample_every=4, resume="yes", keep_checkpoints=0, **extra))
    assert full["step"] == resumed["step"] == 12
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "split/checkpoints/last.pt"))
    # Numbered checkpoints every 4 steps plus the stop and the end; last.pt is the newest.
    names = sorted(p.name for p in (tmp_path / "split/checkpoints").glob("*.pt"))
    assert names == ["0000004.pt", "0000006.pt", "0000008.pt", "0000012.pt", "last.pt"]
    # Samples at steps 4, 8, 12 (and at the stop, 6), each a PNG grid and a GIF per CFG scale.
    pngs = lambda run: sorted(p.name for p in (tmp_path / run / "samples").glob("*.png"))
    assert pngs("full") == [f"step{s:07d}_cfg{c}.png" for s in (4, 8, 12) for c in (1, 3)]
    assert pngs("split") == [f"step{s:07d}_cfg{c}.png" for s in (4, 6, 8, 12) for c in (1, 3)]
    assert len(list((tmp_path / "full/samples").glob("*.gif"))) == 6


def test_config_is_saved_as_json_and_in_every_checkpoint(tmp_path):
    train.main(tiny(tmp_path / "run", steps=4))
    saved = json.loads((tmp_path / "run/config.json").read_text())
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/0000004.pt")
    assert saved == json.loads(json.dumps(ckpt["config"]))
    assert saved["steps"] == 4 and saved["precision"] == "fp32" and saved["out"] == str(tmp_path / "run")
    assert {"model", "ema", "optimizer", "step", "rng", "data_state", "model_config"} <= ckpt.keys()
    assert ckpt["data_state"] == {"epoch": 0, "index": 4, "num_samples": 1797}


def test_resume_refuses_a_changed_model_or_batch(tmp_path, capsys):
    train.main(tiny(tmp_path / "run", steps=4))
    with pytest.raises(ConfigError, match="batch-size"):
        train.main(tiny(tmp_path / "run", steps=8, batch_size=16, resume="yes"))
    code, err = run_cli(cli_args(tiny(tmp_path / "run", steps=8, hidden_size=64, num_heads=4, resume="yes")), capsys)
    assert_one_error_line(code, err, "model differs from this run's: --hidden-size 32 -> 64; --num-heads 2 -> 4")
    assert "depth" not in err and len(err) < 300  # the keys that differ, not two whole model dicts


def test_resume_says_in_one_line_which_settings_changed(tmp_path, capsys):
    train.main(tiny(tmp_path / "run", steps=4))
    capsys.readouterr()
    changed = dict(lr=5e-4, ema_decay=0.95, warmup=2, objective_args=dict(ot=True, t_sampler="uniform"))
    train.main(tiny(tmp_path / "run", steps=6, resume="yes", **changed))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert lines == [
        f"resume: step 4 of {tmp_path / 'run/checkpoints/last.pt'}; settings changed: --t-sampler "
        "logit-normal -> uniform, --ot False -> True, --steps 4 -> 6, --lr 0.001 -> 0.0005, --warmup 3 -> 2, "
        "--ema-decay 0.9 -> 0.95"
    ]
    train.main(tiny(tmp_path / "run", steps=8, resume="yes", **changed))
    assert "settings changed: --steps 6 -> 8\n" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- non-finite losses


def inject_nonfinite(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None, value=float("nan")):
    """Make FlowMatching.loss return a non-finite loss on the given (1-based) calls."""
    real = FlowMatching.loss
    calls = {"n": 0}

    def loss(self, model, x1, y=None):
        calls["n"] += 1
        out = real(self, model, x1, y)
        if (bad_calls and calls["n"] in bad_calls) or (from_call and calls["n"] >= from_call):
            return out._replace(loss=out.loss + value)  # the gradient stays finite for +inf, NaN for NaN
        return out

    monkeypatch.setattr(FlowMatching, "loss", loss)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_loss_skips_its_update_exactly_and_is_counted(tmp_path, monkeypatch, capsys, value):
    reference = train.main(tiny(tmp_path / "ref", steps=2, ckpt_every=0))
    inject_nonfinite(monkeypatch, bad_calls={3}, value=value)
    capsys.readouterr()
    result = train.main(tiny(tmp_path / "bad", steps=3, ckpt_every=0, log_every=1))
    assert result["skipped_steps"] == 1
    assert "1 of 3 steps skipped for a non-finite loss" in capsys.readouterr().err  # the console hears of it
    # The skipped third step leaves weights, EMA and optimizer moments exactly as after two steps.
    assert_same(weights(tmp_path / "ref/checkpoints/last.pt"), weights(tmp_path / "bad/checkpoints/last.pt"))
    assert reference["step"] == 2 and result["step"] == 3
    assert load_checkpoint(tmp_path / "bad/checkpoints/last.pt")["skipped_steps"] == 1
    logged = [json.loads(line) for line in (tmp_path / "bad/metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["train/skipped_steps"] == 1 and logged[-1]["train/loss"] == "nan"


def test_nonfinite_losses_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    inject_nonfinite(monkeypatch, from_call=6)
    cfg = tiny(tmp_path / "run", steps=40, ckpt_every=4, log_every=2, nan_patience=3)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row") as info:
        train.main(cfg)
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["0000004.pt", "last.pt"]
    assert load_checkpoint(ckpts / "last.pt")["step"] == 4
    assert str(ckpts / "last.pt") in str(info.value)


# ----------------------------------------------------------------------------------------------- logging


def test_wandb_offline_run_holds_captioned_samples_videos_and_the_metrics_file_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no user settings or credentials
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    result = train.main(tiny(tmp_path / "run", steps=4, sample_every=2, wandb="offline"))
    assert result["step"] == 4
    runs = list((tmp_path / "wandb_dir/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files/media"
    assert len(list(media.glob("images/**/*.png"))) == 4  # steps 2 and 4, CFG 1 and 3
    assert len(list(media.glob("videos/**/*.gif"))) == 4
    samples = tmp_path / "run/samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        f"step{s:07d}_cfg{c}.{ext}" for s in (2, 4) for c in (1, 3) for ext in ("gif", "png")
    ]
    # EMA and raw samples side by side: 10 classes in rows of 1 EMA sample, a blank, 1 raw sample, 8x8 shown 8x.
    assert Image.open(samples / "step0000002_cfg3.png").size == (3 * 66 + 2, 10 * 66 + 2)

    rows = {row["_step"]: row for row in wandb_history(runs[0])}
    assert sorted(rows) == [2, 4]
    media = lambda key: {k[len(key) + 1 :]: v for k, v in rows[4].items() if k.startswith(key + "/")}  # noqa: E731
    image, video = media("samples/cfg3"), media("trajectory/cfg1")
    assert image["_type"] == "image-file" and image["caption"].startswith("step 4, cfg 3, heun 2 steps, NFE 4")
    assert "EMA left, raw weights right" in image["caption"]
    assert (
        video["_type"] == "video-file"
        and video["caption"].startswith("step 4, cfg 1")
        and video["path"].endswith(".gif")
    )
    # The metrics file and wandb carry the same numbers under the same names, the loss by t among them.
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4]
    for m in logged:
        keys = set(m) - {"step"}  # the scalars; wandb's rows hold the media too
        assert {f"loss_by_t/t{i}" for i in range(8)} | {"train/loss", "train/lr", "train/img_per_s"} <= keys
        for k in keys:
            mine, theirs = m[k], rows[m["step"]][k]
            assert mine == theirs or (str(mine) == "nan" and np.isnan(theirs)), k


def test_fid_during_training_is_logged_and_matches_a_direct_computation(tmp_path, monkeypatch):
    from evaluation.fid import compute_fid, real_statistics
    from sampler import Sampler

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the real statistics cache
    extractor = Features()
    result = train.main(tiny(tmp_path / "run", steps=4, fid_every=2, fid_samples=40), fid_extractor=extractor)
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    fids = {m["step"]: m["eval/fid"] for m in logged if "eval/fid" in m}
    assert sorted(fids) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fids.values())
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1  # real statistics computed once, then cached
    real = real_statistics("digits", "./datasets", 8, 1, extractor=extractor, progress=False)
    sampler = Sampler(result["ema"], steps=2, method="heun")
    fid, _ = compute_fid(sampler, real, 40, extractor=extractor, cfg_scale=1.0, seed=0, progress=False)
    assert fid == pytest.approx(fids[4], rel=1e-9)


def test_fid_keeps_resume_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    extractor = Features()
    train.main(tiny(tmp_path / "full", steps=8, fid_every=2, fid_samples=20), fid_extractor=extractor)
    train.main(tiny(tmp_path / "part", steps=4, fid_every=2, fid_samples=20), fid_extractor=extractor)
    train.main(tiny(tmp_path / "part", steps=8, fid_every=2, fid_samples=20, resume="yes"), fid_extractor=extractor)
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "part/checkpoints/last.pt"))


def test_fid_without_inception_weights_switches_off_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import evaluation.monitor
    from evaluation.fid import FIDError

    def offline(device):
        raise FIDError("cannot download the Inception weights; put the file at /somewhere")

    monkeypatch.setattr(evaluation.monitor, "load_inception", offline)
    result = train.main(tiny(tmp_path / "run", steps=4, fid_every=2))
    assert result["step"] == 4
    err = capsys.readouterr().err
    assert err.count("FID switched off") == 1 and "/somewhere" in err


def test_wandb_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    from utils.runlog import RunLogger

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    logger = RunLogger(tmp_path / "run", mode="online")
    try:
        assert logger.mode == "offline" and logger.run is not None
        out = capsys.readouterr()
        assert "wandb sync" in out.out and "offline" in out.err
    finally:
        logger.finish()


def test_a_logging_failure_never_stops_training(tmp_path, capsys):
    from utils.runlog import RunLogger

    class Broken:
        def log(self, *args, **kwargs):
            raise ConnectionError("network down")

        def finish(self):
            raise ConnectionError("network down")

    logger = RunLogger(tmp_path, mode="disabled")
    logger.run = Broken()
    for step in range(3):
        logger.log({"train/loss": 1.0}, step)
    logger.log_media(3, {"samples": (tmp_path / "missing.png", "a caption")}, {})
    logger.finish()
    err = capsys.readouterr().err
    assert err.count("wandb scalars failed") == 1  # warned once, not at every step
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_wandb_that_cannot_start_leaves_the_metrics_file(tmp_path, monkeypatch, capsys):
    import wandb

    from utils.runlog import RunLogger

    def refuse(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    logger = RunLogger(tmp_path, mode="offline")
    logger.log({"train/loss": 0.5}, 1)
    logger.log_media(1, {}, {"trajectory": (tmp_path / "x.gif", "a caption")})
    logger.finish()
    assert logger.run is None and "could not start" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 0.5}


# -------------------------------------------------------------------------------------------------- CLI


def test_defaults_reproduce_the_cifar10_run_and_every_flag_has_help():
    cfg = parse_args([])
    assert (cfg.dataset, cfg.model, cfg.num_registers, cfg.batch_size, cfg.lr, cfg.ema_decay) == (
        "cifar10",
        "DiT-S/2",
        4,
        128,
        1e-4,
        0.9999,
    )
    objective = cfg.build_objective()
    assert cfg.cfg_scales == (1.0, 2.5, 5.0) and cfg.objective == "flow" and cfg.objective_args == {}
    assert objective.t_sampler == "logit-normal" and objective.sigma == 0.0 and not objective.ot
    for action in build_parser(TrainConfig, "train.py", "")._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_preset_sets_defaults_that_explicit_flags_override():
    cfg = parse_args(["--preset", "digits-quick", "--steps", "7", "--lr", "0.01"])
    assert (cfg.dataset, cfg.image_size, cfg.channels, cfg.steps, cfg.lr) == ("digits", 8, 1, 7, 0.01)
    assert cfg.batch_size == train.PRESETS["digits-quick"]["batch_size"]


def test_cli_args_round_trip():
    cfg = tiny(Path("/tmp/x"), resume="yes", objective_args=dict(ot=True, t_mean=0.5), qk_norm=False)
    assert parse_args(cli_args(cfg)) == cfg
    mf = tiny(Path("/tmp/x"), objective="meanflow", objective_args=dict(mf_omega=1.5, mf_guidance_interval=(0.2, 0.9)))
    assert parse_args(cli_args(mf)) == mf


# ------------------------------------------------------------------------------------------- bad input


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop output of earlier calls
    code = train.cli(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def folder_args(tmp_path: Path, data: Path) -> list[str]:
    return cli_args(tiny(tmp_path / "out", dataset="folder", data_path=str(data), data_on_device=None))


def test_missing_data_path(tmp_path, capsys):
    code, err = run_cli(folder_args(tmp_path, tmp_path / "nowhere"), capsys)
    assert_one_error_line(code, err, "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, err = run_cli(folder_args(tmp_path, tmp_path / "data"), capsys)
    assert_one_error_line(code, err, "no class sub-folders")
    (tmp_path / "data/cat").mkdir()
    code, err = run_cli(folder_args(tmp_path, tmp_path / "data"), capsys)
    assert_one_error_line(code, err, "no images")
    assert not (tmp_path / "out").exists()


def test_unreadable_images(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "data/cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data/cat/good.png")
    (tmp_path / "data/cat/broken.png").write_bytes(b"not a png at all")
    code, err = run_cli(folder_args(tmp_path, tmp_path / "data"), capsys)
    assert_one_error_line(code, err, "broken.png")
    assert not (tmp_path / "out").exists()


def test_image_size_that_the_patch_size_does_not_divide(tmp_path, capsys):
    code, err = run_cli(cli_args(tiny(tmp_path / "out", image_size=9)), capsys)
    assert_one_error_line(code, err, "--image-size 9", "divisible")
    assert not (tmp_path / "out").exists()


def test_channels_that_do_not_match_the_data(tmp_path, capsys):
    code, err = run_cli(cli_args(tiny(tmp_path / "out", dataset="cifar10", data_path=str(tmp_path))), capsys)
    assert_one_error_line(code, err, "3 channels")
    assert not (tmp_path / "out").exists()


def test_resume_without_a_checkpoint(tmp_path, capsys):
    code, err = run_cli(cli_args(tiny(tmp_path / "out", resume="yes")), capsys)
    assert_one_error_line(code, err, "no checkpoint", "last.pt")
    assert not (tmp_path / "out").exists()


def test_resume_from_a_corrupt_checkpoint_leaves_it_untouched(tmp_path, capsys):
    last = tmp_path / "out/checkpoints/last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x80\x02garbage")
    code, err = run_cli(cli_args(tiny(tmp_path / "out", resume="yes")), capsys)
    assert_one_error_line(code, err, "cannot read checkpoint")
    assert last.read_bytes() == b"\x80\x02garbage"
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["checkpoints", "last.pt"]


def test_fresh_run_into_a_folder_with_checkpoints_refuses_to_overwrite(tmp_path, capsys):
    train.main(tiny(tmp_path / "out", steps=4))
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    code, err = run_cli(cli_args(tiny(tmp_path / "out", steps=8)), capsys)
    assert_one_error_line(code, err, "already holds a run", "checkpoints/", "--resume")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


def test_impossible_flags_are_one_line(tmp_path, capsys):
    args = cli_args(tiny(tmp_path / "out"))
    for flags, needle in [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--t-std", "0"], "--t-std must be > 0"),
        (["--ema-decay", "1"], "--ema-decay must be < 1"),
        (["--lr", "nan"], "lr must be finite"),
    ]:
        code, err = run_cli(args + flags, capsys)  # the last of a repeated flag wins
        assert_one_error_line(code, err, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_is_one_line(tmp_path, capsys):
    code, err = run_cli(cli_args(tiny(tmp_path / "out", device="cuda")), capsys)
    assert_one_error_line(code, err, "no CUDA device")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- run-folder upkeep


def test_keep_checkpoints_keeps_the_newest_and_what_last_points_to(tmp_path):
    train.main(tiny(tmp_path / "run", steps=20, ckpt_every=4, keep_checkpoints=2))
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["0000016.pt", "0000020.pt", "last.pt"]
    assert os.path.samefile(ckpts / "last.pt", ckpts / "0000020.pt")
    assert load_checkpoint(ckpts / "last.pt")["step"] == 20


def test_prune_never_touches_the_file_last_links_to_nor_later_steps(tmp_path):
    for step in (4, 8, 12, 16, 20):
        (tmp_path / f"{step:07d}.pt").write_bytes(str(step).encode())
    os.link(tmp_path / "0000008.pt", tmp_path / "last.pt")  # rolled back to step 8 by hand
    (tmp_path / "notes.pt").write_bytes(b"not numbered")
    removed = prune_checkpoints(tmp_path, keep=1, step=12)
    assert sorted(p.name for p in removed) == ["0000004.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0000008.pt",
        "0000012.pt",
        "0000016.pt",
        "0000020.pt",
        "last.pt",
        "notes.pt",
    ]
    assert (tmp_path / "last.pt").read_bytes() == b"8"
    assert prune_checkpoints(tmp_path, keep=0, step=20) == []  # 0 keeps all


def test_resume_drops_metrics_logged_after_the_checkpoint_and_keeps_config_json(tmp_path):
    full = tmp_path / "full"
    train.main(tiny(full, steps=8, ckpt_every=4, log_every=2))
    # A crash right after step 8's metrics were logged but before its checkpoint was complete: last.pt
    # still points at step 4, and the file ends in half a line.
    run = tmp_path / "run"
    train.main(tiny(run, steps=8, ckpt_every=4, log_every=2))
    ckpts = run / "checkpoints"
    os.replace(ckpts / "0000008.pt", tmp_path / "gone.pt")
    os.link(ckpts / "0000004.pt", ckpts / ".l")
    os.replace(ckpts / ".l", ckpts / "last.pt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "train/lo')
    config_before = (run / "config.json").read_bytes()

    train.main(tiny(run, steps=8, ckpt_every=4, log_every=2, lr=2e-3, resume="yes"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # 6 and 8 once each, from the resumed run
    reference = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in rows[:2]] == [r["train/loss"] for r in reference[:2]]
    assert (run / "config.json").read_bytes() == config_before  # the first run's settings stay
    resumed_cfg = json.loads((run / "config-resume-0000004.json").read_text())
    assert resumed_cfg["resume"] == "yes" and resumed_cfg["lr"] == 2e-3


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(cli_args(tiny(tmp_path / "file" / "out")), capsys)
    assert_one_error_line(code, err, "Not a directory", str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def test_impossible_upkeep_flags_are_one_line(tmp_path, capsys):
    code, err = run_cli(cli_args(tiny(tmp_path / "out")) + ["--keep-checkpoints", "-1"], capsys)
    assert_one_error_line(code, err, "--keep-checkpoints")
    code, err = run_cli(cli_args(tiny(tmp_path / "out")) + ["--dist-timeout", "0"], capsys)
    assert_one_error_line(code, err, "--dist-timeout")
    assert not (tmp_path / "out").exists()


def test_compile_and_precision_defaults_follow_the_device(monkeypatch):
    cpu = train.resolve(TrainConfig(), torch.device("cpu"))
    assert cpu.compile is False and cpu.precision == "fp32" and cpu.out == "runs/cifar10" and cpu.data_on_device
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # resolving needs no GPU
    cuda = train.resolve(TrainConfig(), torch.device("cuda"))
    assert cuda.compile is True and cuda.precision == "bf16"
    assert train.resolve(TrainConfig(compile=False), torch.device("cuda")).compile is False


@pytest.mark.parametrize("objective", ["flow", "meanflow"])
def test_a_checkpoint_of_the_version_before_the_interval_rename_resumes_exactly(tmp_path, objective, capsys):
    """Checkpoints written before DiT's mean_flow became average_velocity + time_scale (model_config with mean_flow
    and without the newer arguments) and before objectives owned their flags (run config flat) still resume: the
    run ends as an uninterrupted one, and an objective flag the resume changes is reported, not dropped."""
    whole = train.main(tiny(tmp_path / "whole", steps=8, objective=objective))
    train.main(tiny(tmp_path / "part", steps=4, objective=objective))
    path = tmp_path / "part" / "checkpoints" / "last.pt"  # a hard link to 0000004.pt: both are rewritten
    state = torch.load(path, weights_only=True)
    model, run = state["model_config"], state["config"]
    old_model = {k: v for k, v in model.items() if k not in ("average_velocity", "time_scale")}
    state["model_config"] = old_model | {"mean_flow": model["average_velocity"]}
    flat = {k: v for k, v in run.items() if k != "objective_args"} | run["objective_args"]
    state["config"] = flat | {"t_std": 0.5}  # the old layout, and a t_std that this resume changes back
    torch.save(state, path)
    capsys.readouterr()
    resumed = train.main(tiny(tmp_path / "part", steps=8, objective=objective, resume="yes"))
    assert "--t-std 0.5 -> 1.0" in capsys.readouterr().out
    for a, b in zip(whole["model"].parameters(), resumed["model"].parameters(), strict=True):
        assert torch.equal(a, b)
