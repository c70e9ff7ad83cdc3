"""utils/phema.py: the power-function EMA (EDM2) and its post-hoc reconstruction, against known answers."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.integrate import quad
from test_train import assert_one_error_line, assert_same, cli_args, run_cli, tiny, weights

import posthoc_ema
import train
from models.dit import DiT
from sampling.sampler import Sampler
from train import parse_args
from training.resume import OPTIONAL_KEYS
from utils.checkpoint import TRAINING_KEYS, load_checkpoint
from utils.config import ConfigError
from utils.phema import (
    PowerEMA,
    gamma_to_sigma_rel,
    overlap,
    power_beta,
    sigma_rel_to_gamma,
    solve,
)


def scalar_model(dtype=torch.float64) -> nn.Module:
    """Five parameters: a (1, 4) weight and a (1,) bias."""
    return nn.Linear(4, 1).to(dtype)


def set_weights(model: nn.Module, v: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(v[:4].view(1, 4))
        model.bias.copy_(v[4:])


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def trajectory(steps: int, seed: int = 0) -> torch.Tensor:
    """(steps, 5) float64 weights: a decaying start, a random walk and per-step noise, like SGD's."""
    g = torch.Generator().manual_seed(seed)
    start, drift = torch.randn(5, generator=g), 0.05 * torch.randn(steps, 5, generator=g).cumsum(0)
    t = torch.arange(1, steps + 1, dtype=torch.float64)[:, None]
    return start * torch.exp(-t / 300) + drift + 0.5 * torch.randn(steps, 5, generator=g, dtype=torch.float64)


def track(traj: torch.Tensor, sigma_rels, every: int) -> tuple[PowerEMA, list[tuple[int, float, torch.Tensor]]]:
    """Run a PowerEMA along traj; snapshots (step, sigma_rel, flat weights) every ``every`` steps."""
    model = scalar_model()
    ema, snaps = PowerEMA(model, sigma_rels), []
    for t, v in enumerate(traj, start=1):
        set_weights(model, v)
        ema.update(t)
        if t % every == 0:
            snaps += [(t, s, flat(e).clone()) for s, e in zip(sigma_rels, ema.emas, strict=True)]
    return ema, snaps


def test_sigma_rel_and_gamma_convert_both_ways_with_edm2s_values():
    # EDM2 (Sec. 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; gamma 0 is the plain mean, sqrt(1/12).
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(12**-0.5, rel=1e-15)
    for s in (0.001, 0.01, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    for g in (0.5, 1.0, 6.94, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9)
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(ConfigError, match="is outside"):
            sigma_rel_to_gamma(bad)


def test_the_tracked_ema_has_edm2s_per_step_decay_and_the_power_profile():
    gamma = sigma_rel_to_gamma(0.1)
    assert power_beta(gamma, 1) == 0.0  # the first update replaces the initial weights
    assert power_beta(gamma, 7) == (1 - 1 / 7) ** (gamma + 1)
    traj = trajectory(300)
    model = scalar_model()
    ema = PowerEMA(model, [0.1])
    for t, v in enumerate(traj, start=1):
        set_weights(model, v)
        ema.update(t)
        if t in (1, 2, 50, 300):  # theta_j's weight at step t: (j^(g+1) - (j-1)^(g+1)) / t^(g+1), the profile's mass
            j = torch.arange(1, t + 1, dtype=torch.float64)
            w = (j ** (gamma + 1) - (j - 1) ** (gamma + 1)) / t ** (gamma + 1)
            torch.testing.assert_close(flat(ema.emas[0]), w @ traj[:t], rtol=1e-12, atol=1e-12)


def test_profile_overlap_equals_the_integral_of_the_product():
    def product(tau, t_a, g_a, t_b, g_b):
        return (g_a + 1) * tau**g_a / t_a ** (g_a + 1) * (g_b + 1) * tau**g_b / t_b ** (g_b + 1)

    for (t_a, s_a), (t_b, s_b) in [((1000, 0.05), (1500, 0.10)), ((1500, 0.05), (700, 0.2)), ((900, 0.1), (900, 0.1))]:
        g_a, g_b = sigma_rel_to_gamma(s_a), sigma_rel_to_gamma(s_b)
        expected = quad(product, 0, min(t_a, t_b), args=(t_a, g_a, t_b, g_b), limit=200, epsrel=1e-12)[0]
        assert overlap(t_a, g_a, t_b, g_b) == pytest.approx(expected, rel=1e-9)
        assert overlap(t_a, g_a, t_b, g_b) == pytest.approx(overlap(t_b, g_b, t_a, g_a), rel=1e-14)


def test_a_tracked_profile_at_a_snapshot_step_reconstructs_to_itself():
    _, snaps = track(trajectory(1000), [0.05, 0.10], every=100)
    snaps = [s for s in snaps if s[0] <= 700]  # the target is a snapshot step before the last
    x, residual = solve([s[0] for s in snaps], [s[1] for s in snaps], 700, [0.05, 0.10])
    weights = torch.stack([s[2] for s in snaps])
    for k, sigma_rel in enumerate((0.05, 0.10)):
        own = next(i for i, s in enumerate(snaps) if s[:2] == (700, sigma_rel))
        np.testing.assert_allclose(x[:, k], np.eye(len(snaps))[own], atol=1e-10)
        assert residual[k] < 1e-6
        torch.testing.assert_close(torch.from_numpy(x[:, k]) @ weights, snaps[own][2], rtol=0, atol=1e-10)


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15])
def test_an_untracked_length_matches_the_directly_tracked_power_ema(sigma_rel):
    # Snapshots of 0.05 and 0.10 every 100 of 2000 steps; the weights move by ~1 and jitter by 0.5 a step.
    traj = trajectory(2000)
    _, snaps = track(traj, [0.05, 0.10], every=100)
    direct, _ = track(traj, [sigma_rel], every=2000)
    x, residual = solve([s[0] for s in snaps], [s[1] for s in snaps], 2000, [sigma_rel])
    rebuilt = torch.from_numpy(x[:, 0]) @ torch.stack([s[2] for s in snaps])
    error = (rebuilt - flat(direct.emas[0])).abs().max().item()
    nearest = min((flat(direct.emas[0]) - s[2]).abs().max().item() for s in snaps if s[0] == 2000)
    print(f"sigma_rel {sigma_rel}: error {error:.2e}, tracked profiles {nearest:.2e} away, residual {residual[0]:.4f}")
    assert error < 1e-3 and nearest > 30 * error  # within 1e-3; the tracked lengths are 30x+ farther
    assert residual[0] < 0.01


def test_lengths_far_outside_the_tracked_pair_have_a_large_residual():
    steps = [s for s in range(250, 1501, 250) for _ in (0, 1)]
    _, residual = solve(steps, [0.05, 0.10] * 6, 1500, [0.005, 0.08, 0.28])
    assert residual[0] > 0.5 and residual[1] < 0.05 and residual[2] > 0.25


def test_update_makes_no_host_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    model = scalar_model(torch.float32)
    ema = PowerEMA(model, [0.05, 0.10])
    with Record():
        ema.update(1)
        ema.update(2)
    assert any("_foreach_lerp" in name for name in seen) and not any("_local_scalar_dense" in n for n in seen), seen


def test_state_round_trips_exactly_and_refuses_a_checkpoint_without_profiles(tmp_path):
    traj = trajectory(40).float()
    model = scalar_model(torch.float32)
    whole, half = PowerEMA(model, [0.05, 0.10]), PowerEMA(model, [0.05, 0.10])
    for t, v in enumerate(traj[:20], start=1):
        set_weights(model, v)
        whole.update(t)
        half.update(t)
    torch.save(half.state_dict(), tmp_path / "state.pt")
    resumed = PowerEMA(model, [0.05, 0.10])
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.run_id == half.run_id != PowerEMA(model, [0.05, 0.10]).run_id
    for t, v in enumerate(traj[20:], start=21):
        set_weights(model, v)
        whole.update(t)
        resumed.update(t)
    for a, b in zip(whole.emas, resumed.emas, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ConfigError, match="tracked no power EMA"):
        PowerEMA(model, [0.05, 0.10]).load_state_dict(None)


def test_a_snapshot_holds_every_profile_as_a_state_dict_in_the_training_dtype(tmp_path):
    model = scalar_model(torch.float32)
    model.register_buffer("scale", torch.tensor([2.0]))  # a persistent buffer comes from the model
    ema = PowerEMA(model, [0.05, 0.10], meta={"model_config": {"width": 4}})
    set_weights(model, torch.arange(5.0))
    ema.update(1)
    path = ema.save_snapshot(tmp_path / "phema", 1)
    assert path == tmp_path / "phema/0000001.pt" and not list((tmp_path / "phema").glob(".*"))
    snap = torch.load(path, weights_only=True)
    assert snap["step"] == 1 and snap["sigma_rels"] == [0.05, 0.10] and snap["run_id"] == ema.run_id
    assert snap["model_config"] == {"width": 4}
    for profile in snap["ema"]:
        assert profile.keys() == model.state_dict().keys()
        assert all(v.dtype == torch.float32 for v in profile.values())
        torch.testing.assert_close(flat([profile["weight"], profile["bias"]]), torch.arange(5.0), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ posthoc_ema.py


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A tiny DiT whose weights wander for 300 steps with snapshots of 0.05 and 0.10 every 50 (run/phema), and the
    directly tracked power EMA of 0.07 beside them."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    run = tmp_path_factory.mktemp("run")
    meta = dict(model_config=model.config, config={"objective": "flow", "dataset": "digits"}, latent_space=None)
    ema, direct = PowerEMA(model, [0.05, 0.10], meta), PowerEMA(model, [0.07])
    start = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    for t in range(1, 301):
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start, strict=True):
                p.copy_(p0 * (1 + t / 300) + 0.05 * torch.randn(p.shape, generator=g))
        ema.update(t)
        direct.update(t)
        if t % 50 == 0:
            ema.save_snapshot(run / "phema", t)
    return run, ema, direct


def posthoc(args, capsys):
    code = posthoc_ema.cli([str(a) for a in args])
    return code, capsys.readouterr().err


def test_posthoc_checkpoints_sample_like_any_other_and_hold_the_reconstruction(run_folder, tmp_path, capsys):
    run, ema, direct = run_folder
    code, err = posthoc([run, "--sigma-rel", 0.1, 0.07, "--out", tmp_path], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phema-0000300-0.0700.pt", "phema-0000300-0.1000.pt"]
    state = load_checkpoint(tmp_path / "phema-0000300-0.1000.pt")
    assert state["phema"]["sigma_rel"] == 0.1 and state["phema"]["step"] == 300 and state["phema"]["snapshots"] == 6
    for k, v in ema.weights(1).items():  # the tracked profile itself, to float32 rounding
        torch.testing.assert_close(state["ema"][k], v, rtol=0, atol=2e-6)
    sampler = Sampler.from_checkpoint(tmp_path / "phema-0000300-0.0700.pt", device="cpu", steps=2)
    for p, q in zip(sampler.model.parameters(), direct.emas[0], strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)  # the weights span ~1; 0.05 and 0.10 differ by up to 0.07
    assert sampler.sample(4, torch.arange(4), seed=0).shape == (4, 1, 8, 8)
    code, err = posthoc([run, "--sweep", 0.04, 0.12, 3, "--step", 200, "--out", tmp_path / "sweep"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [
        f"phema-0000200-{s}.pt" for s in ("0.0400", "0.0800", "0.1200")
    ]


def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(run_folder, tmp_path, capsys):
    run, ema, _ = run_folder
    other = tmp_path / "other"
    for name in ("0000050.pt", "0000100.pt"):
        (other / "phema").mkdir(parents=True, exist_ok=True)
        (other / "phema" / name).write_bytes((run / "phema" / name).read_bytes())
    foreign = PowerEMA(ema.model, [0.05, 0.10], {"model_config": ema.meta["model_config"]})
    foreign.save_snapshot(other / "phema", 150)  # another run's, with the same model
    (tmp_path / "broken/phema").mkdir(parents=True)
    (tmp_path / "broken/phema/0000050.pt").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "done").mkdir()
    (tmp_path / "done/phema-0000300-0.0800.pt").write_bytes(b"x")
    cases = [
        ([tmp_path / "none", "--sigma-rel", 0.1], "no snapshots in"),
        ([run, "--sigma-rel", 0.3], "sigma_rel 0.3 is outside (0, 0.2887)"),
        ([run, "--sigma-rel", 0.01], "represent it only to a relative residual"),
        ([run, "--sigma-rel", 0.1, "--step", 50], "too few snapshots: 1"),
        ([run, "--sigma-rel", 0.1, "--step", 120], "--step 120: no snapshot of that step"),
        ([other, "--sigma-rel", 0.1], "0000150.pt is a snapshot of another run"),
        ([tmp_path / "broken", "--sigma-rel", 0.1], "cannot read snapshot"),
        ([run, "--sweep", 0.05, 0.1, 2.5], "--sweep: N must be a whole number"),
        ([run], "nothing to rebuild"),
    ]
    for args, message in cases:
        code, err = posthoc([*args, "--out", tmp_path / "out"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
        assert not (tmp_path / "out").exists()
    code, err = posthoc([run, "--sigma-rel", 0.08, "--out", tmp_path / "done"], capsys)
    assert code == 2 and "exists; pass --overwrite" in err
    assert (tmp_path / "done/phema-0000300-0.0800.pt").read_bytes() == b"x"
    torch.manual_seed(0)
    wider = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=1, num_heads=2, num_classes=10)
    PowerEMA(wider, [0.05, 0.10], {"model_config": wider.config}).save_snapshot(other / "phema", 150)
    code, err = posthoc([other, "--sigma-rel", 0.1, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "0000150.pt is a snapshot of another model" in err


# ----------------------------------------------------------------------------------------------- train.py --phema


def snapshot_weights(folder: Path) -> dict[int, list]:
    return {int(p.stem): torch.load(p, weights_only=True)["ema"] for p in sorted(folder.glob("*.pt"))}


def test_phema_off_changes_nothing_and_on_only_adds_its_state(tmp_path):
    off = train.main(tiny(tmp_path / "off"))
    on = train.main(tiny(tmp_path / "on", phema=(0.05, 0.10), phema_every=5))
    assert not (tmp_path / "off/phema").exists()
    state_off, state_on = (load_checkpoint(tmp_path / f"{r}/checkpoints/last.pt") for r in ("off", "on"))
    assert set(state_off) == set(TRAINING_KEYS) | set(OPTIONAL_KEYS) and set(state_on) == set(state_off) | {"phema"}
    assert_same(weights(tmp_path / "off/checkpoints/last.pt"), weights(tmp_path / "on/checkpoints/last.pt"))
    assert off["losses"] == on["losses"]
    # snapshots at every 5th step and the last (12); the newest holds the checkpoint's profiles
    snaps = snapshot_weights(tmp_path / "on/phema")
    assert sorted(snaps) == [5, 10, 12]
    names = [name for name, _ in on["model"].named_parameters()]
    for k, profile in enumerate(state_on["phema"]["ema"]):
        assert all(torch.equal(snaps[12][k][name], v) for name, v in zip(names, profile, strict=True))


def test_resume_with_phema_is_bit_exact(tmp_path):
    full = tiny(tmp_path / "full", phema=(0.05, 0.10), phema_every=4, ckpt_every=3)
    train.main(full)
    train.main(tiny(tmp_path / "split", phema=(0.05, 0.10), phema_every=4, ckpt_every=3, steps=7))
    train.main(tiny(tmp_path / "split", phema=(0.05, 0.10), phema_every=4, ckpt_every=3, resume="yes"))
    a, b = (load_checkpoint(tmp_path / f"{r}/checkpoints/last.pt") for r in ("full", "split"))
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "split/checkpoints/last.pt"))
    for pa, pb in zip(a["phema"]["ema"], b["phema"]["ema"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    sa, sb = snapshot_weights(tmp_path / "full/phema"), snapshot_weights(tmp_path / "split/phema")
    assert sorted(sa) == [4, 8, 12] and sorted(sb) == [4, 7, 8, 12]  # 7: the last step of the first part
    for step in sa:
        for wa, wb in zip(sa[step], sb[step], strict=True):
            assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ids = {torch.load(p, weights_only=True)["run_id"] for p in (tmp_path / "split/phema").glob("*.pt")}
    assert ids == {b["phema"]["run_id"]}  # the resumed run's snapshots are the same run's


def test_phema_flags_and_their_refusals(tmp_path, capsys):
    assert parse_args([]).phema == () and parse_args(["--phema"]).phema == (0.05, 0.10)
    assert parse_args(["--phema", "0.08", "0.2", "--phema-every", "100"]).phema == (0.08, 0.2)
    code, err = run_cli([*cli_args(tiny(tmp_path / "bad")), "--phema", "0.3"], capsys)
    assert_one_error_line(code, err, "sigma_rel 0.3 is outside (0, 0.2887)")
    assert not (tmp_path / "bad").exists()
    train.main(tiny(tmp_path / "plain", steps=4))
    code, err = run_cli([*cli_args(tiny(tmp_path / "plain", steps=8, resume="yes")), "--phema"], capsys)
    assert_one_error_line(code, err, "--phema")
    train.main(tiny(tmp_path / "tracked", steps=4, phema=(0.05, 0.10)))
    code, err = run_cli(cli_args(tiny(tmp_path / "tracked", steps=8, resume="yes", phema=(0.05,))), capsys)
    assert_one_error_line(code, err, "--phema 0.05 0.1 -> 0.05")


def test_a_trained_run_rebuilds_into_checkpoints_that_sample(tmp_path, capsys):
    train.main(tiny(tmp_path / "run", steps=40, phema=(0.05, 0.10), phema_every=10, ckpt_every=0))
    assert "phema: sigma_rel 0.05 0.1: " in capsys.readouterr().out
    code, err = posthoc([tmp_path / "run", "--sigma-rel", 0.1, 0.15, "--out", tmp_path / "posthoc"], capsys)
    assert code == 0, err
    tracked = torch.load(tmp_path / "run/phema/0000040.pt", weights_only=True)["ema"][1]
    rebuilt = load_checkpoint(tmp_path / "posthoc/phema-0000040-0.1000.pt")
    assert all(torch.allclose(rebuilt["ema"][k], v, rtol=0, atol=1e-6) for k, v in tracked.items())
    assert rebuilt["config"]["phema"] == (0.05, 0.10)
    sampler = Sampler.from_checkpoint(tmp_path / "posthoc/phema-0000040-0.1500.pt", device="cpu", steps=2)
    images = sampler.sample(4, torch.arange(4), seed=0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
