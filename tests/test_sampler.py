"""Tests of sampler.py: solver orders on closed-form flows, CFG and its interval, seeds, chunks, precision, outputs,
devices, CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from stand_ins import all_close

import evaluation.images
import sampler as sampler_mod
import sampling.sampler
import sampling.solvers
from models.dit import DiT
from sampler import Sampler, save_grid, save_npz, time_grid, to_gif, to_uint8
from sampling.sampler import Samples, SamplingOptions, sampling_options
from sampling.solvers import FIXED_GRID_SOLVERS, GRIDS, METHODS, SOLVERS, solver_step
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.config import ConfigError, build_parser
from utils.device import resolve_device, resolve_precision

# ----------------------------------------------------------------------------- stand-in models


class GaussianFlow(nn.Module):
    """Exact marginal velocity of the linear path from N(0, I) (t=0) to data N(mu, s^2 I) (t=1).

    x_t = t x1 + (1 - t) x0 has marginal N(t mu, sigma_t^2 I), sigma_t = sqrt((1-t)^2 + t^2 s^2), so
    v(x, t) = mu + (sigma_t' / sigma_t) (x - t mu), and the flow maps noise z to mu + s z.
    """

    input_size, in_channels, num_classes = 4, 2, 0

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.register_buffer("mu", mu.double())  # a float64 model: the sampler keeps a float64 state
        self.s = s
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert y is None and t.shape == (x.shape[0],)
        self.calls += 1
        t = t.view(-1, 1, 1, 1).to(x.dtype)
        sigma = torch.sqrt((1 - t) ** 2 + t**2 * self.s**2)
        dsigma = (-(1 - t) + t * self.s**2) / sigma
        return self.mu + dsigma / sigma * (x - t * self.mu)


class Exponential(nn.Module):
    """v(x, t) = x: the flow maps z to e * z; every RK method shows exactly its textbook order here."""

    input_size, in_channels, num_classes = 2, 1, 0

    def __init__(self):
        super().__init__()
        self.register_buffer("dummy", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x


def tiny_dit(num_classes: int = 3, seed: int = 0) -> DiT:
    """A small DiT with random (non-zero) weights, so its velocity depends on x, t and y."""
    torch.manual_seed(seed)
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=num_classes,
        num_registers=2,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def gaussian_problem(s: float = 0.5):
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(2, 4, 4, generator=g)
    z = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    return GaussianFlow(mu, s), z, (mu.double() + s * z)


def final_state(sampler: Sampler, n: int, **kw) -> torch.Tensor:
    """The raw final ODE state (last trajectory frame), float64."""
    _, traj = sampler.sample(n, return_trajectory=True, **kw)
    return traj[-1].double()


# ----------------------------------------------------------------------------- time grids


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_time_grid_runs_from_noise_to_data(grid, steps):
    t = time_grid(steps, grid)
    assert t.shape == (steps + 1,) and t.dtype == torch.float64
    assert t[0] == 0.0 and t[-1] == 1.0
    assert (t.diff() > 0).all()


def test_time_grids_refine_near_data():
    assert torch.allclose(time_grid(10, "uniform"), torch.linspace(0, 1, 11, dtype=torch.float64))
    for grid in ("shifted", "edm"):
        h = time_grid(20, grid).diff()
        assert h[-1] < h.mean() / 2, grid  # the last step, at the data end, is finer than average
    # The shifted grid is SD3's shift with factor 1/s on the noise level 1 - t.
    u, s = torch.linspace(0, 1, 11, dtype=torch.float64), 3.0
    noise_level = 1 - time_grid(10, "shifted", shift=s)
    assert torch.allclose(noise_level, (1 / s) * (1 - u) / (1 + (1 / s - 1) * (1 - u)))
    # EDM interior points: t = 1 / (1 + sigma) for the rho = 7 noise levels.
    sigma = (80 ** (1 / 7) + torch.arange(5, dtype=torch.float64) / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(time_grid(5, "edm")[1:-1], 1 / (1 + sigma[1:]))


# ----------------------------------------------------------------------------- exact solutions and orders


def test_exact_gaussian_flow_orders_and_time_direction():
    model, z, exact = gaussian_problem()
    sampler = Sampler(model)
    errors = {}
    for method in ("euler", "midpoint", "heun"):
        errors[method] = []
        for steps in (16, 32, 64):
            model.calls = 0
            out = sampler.generate(len(z), noise=z, steps=steps, method=method, grid="uniform", trajectory=True)
            x = out.trajectory[-1].double()
            errors[method].append((x - exact).abs().max().item())
            expected_nfe = steps if method == "euler" else 2 * steps
            assert out.nfe == expected_nfe == model.calls
    for method, errs in errors.items():
        ratios = [errs[i] / errs[i + 1] for i in range(len(errs) - 1)]
        if method == "euler":
            assert all(1.8 < r < 2.2 for r in ratios), (method, errs)
        elif method == "heun":
            assert all(3.4 < r < 4.6 for r in ratios), (method, errs)
        else:
            # On this flow the h^2 term of midpoint's global error vanishes (sigma_t^2 is quadratic in t), so
            # it converges even faster; test_exponential_flow_orders pins its order at exactly two.
            assert all(r > 3.4 for r in ratios), (method, errs)
    assert errors["heun"][-1] < 1e-3
    # Integrating in the wrong direction (data to noise) would not land on mu + s z at all.
    assert errors["euler"][-1] < 0.05


def test_exponential_flow_orders():
    model = Exponential()
    z = torch.linspace(-1, 1, 8, dtype=torch.float64).view(2, 1, 2, 2)
    exact = np.e * z
    expected_ratio = {"euler": 2.0, "midpoint": 4.0, "heun": 4.0}
    sampler = Sampler(model)
    for method, ratio in expected_ratio.items():
        errs = [(final_state(sampler, 2, noise=z, steps=s, method=method) - exact).abs().max().item() for s in (32, 64)]
        assert abs(errs[0] / errs[1] - ratio) < 0.1 * ratio, (method, errs)


@pytest.mark.parametrize("grid", ["shifted", "edm"])
def test_refined_grids_converge(grid):
    model, z, exact = gaussian_problem()
    sampler = Sampler(model, method="heun", grid=grid)
    errs = [(final_state(sampler, len(z), noise=z, steps=s) - exact).abs().max().item() for s in (16, 64)]
    assert errs[1] < errs[0] / 10 and errs[1] < 2e-3, errs


def test_dopri5_within_tolerance_and_counts_nfe():
    model, z, exact = gaussian_problem()
    errs = []
    for tol in (1e-5, 1e-7):
        sampler = Sampler(model, method="dopri5", rtol=tol, atol=tol)
        model.calls = 0
        out = sampler.generate(len(z), noise=z, trajectory=True)
        x = out.trajectory[-1].double()
        errs.append((x - exact).abs().max().item())
        assert out.nfe == model.calls > 0  # counted by wrapping the velocity function
        assert errs[-1] < 10 * (tol + tol * exact.abs().max().item())
    assert errs[1] < errs[0] / 10


# ----------------------------------------------------------------------------- guidance


def test_cfg_matches_formula_and_interval():
    model = tiny_dit()
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    null = torch.full_like(y, model.num_classes)
    sampler = Sampler(model, method="euler")

    def v(x, t, labels):  # eval mode: no label dropout; the index num_classes is the null class
        return model(x, torch.full((len(x),), t), labels)

    def guided(x, t, scale):
        v_u = v(x, t, null)
        return v_u + scale * (v(x, t, y) - v_u)

    with torch.no_grad():
        # One Euler step from t=0 to t=1: x1 = z + v_u + s (v_c - v_u), on every channel.
        out = sampler.generate(4, y=y, noise=z, steps=1, cfg_scale=2.5, trajectory=True)
        assert all_close(out.trajectory[-1].double(), (z + guided(z, 0.0, 2.5)).double())
        assert out.nfe == 1  # a guided pass of 2N counts as one evaluation

        # Guidance interval [0.5, 1]: the first of two steps (t=0) is unguided, the second (t=0.5) guided.
        x = final_state(sampler, 4, y=y, noise=z, steps=2, cfg_scale=2.5, guidance_interval=(0.5, 1.0))
        x_half = z + 0.5 * v(z, 0.0, y)
        assert all_close(x, (x_half + 0.5 * guided(x_half, 0.5, 2.5)).double())

        # An interval that holds no grid time equals no guidance at all.
        outside = final_state(sampler, 4, y=y, noise=z, steps=2, cfg_scale=2.5, guidance_interval=(0.6, 0.9))
        plain = final_state(sampler, 4, y=y, noise=z, steps=2, cfg_scale=1.0)
        assert torch.equal(outside, plain)


def test_scale_one_runs_a_single_pass():
    model = tiny_dit()
    batches: list[int] = []
    model.x_embedder.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    sampler = Sampler(model, method="euler", steps=3)
    sampler.sample(5, cfg_scale=1.0, seed=0)
    assert batches == [5, 5, 5]
    batches.clear()
    out = sampler.generate(5, cfg_scale=3.0, seed=0, guidance_interval=(0.3, 1.0))  # grid 0, 1/3, 2/3
    assert batches == [5, 10, 10]
    assert out.nfe == 3


def test_train_mode_model_samples_like_eval_and_keeps_its_mode():
    model = tiny_dit()
    model.class_dropout_prob = 0.9  # label dropout must not act while sampling
    ref = Sampler(model, steps=4).sample(6, seed=0)
    model.train()
    out = Sampler(model, steps=4).sample(6, seed=0)
    assert model.training
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------- seeds, chunks, labels


def test_seed_repeatable_and_chunking_invariant():
    model = tiny_dit()
    sampler = Sampler(model, steps=3, method="midpoint", batch_size=64)
    first = sampler.generate(7, seed=3, cfg_scale=2.0)
    a, labels = first.images, first.labels
    assert labels.shape == (7,) and labels.dtype == torch.int64 and labels.device.type == "cpu"
    assert first.seed == 3 and first.nfe_per_chunk == [6] and first.nfe == 6
    second = sampler.generate(7, seed=3, cfg_scale=2.0)
    assert torch.equal(a, second.images) and torch.equal(second.labels, labels)
    assert not torch.allclose(a, sampler.sample(7, seed=4, cfg_scale=2.0))
    assert a.shape == (7, 3, 8, 8) and a.min() >= 0 and a.max() <= 1

    chunked = Sampler(model, steps=3, method="midpoint", batch_size=3)
    c = chunked.generate(7, seed=3, cfg_scale=2.0)
    assert torch.equal(c.labels, labels)
    assert all_close(c.images, a)
    assert c.nfe_per_chunk == [6, 6, 6] and c.nfe == 6

    # Sample i depends only on (seed, i): a shorter run is a prefix of a longer one.
    y = torch.tensor([2, 0, 1, 1, 0])
    assert all_close(sampler.sample(5, y, seed=9)[:3], sampler.sample(3, y[:3], seed=9))

    # Given noise: chunked equals one batch too, and a global torch seed repeats an unseeded call.
    z = torch.randn(7, 3, 8, 8)
    assert all_close(chunked.sample(7, y=labels, noise=z), sampler.sample(7, y=labels, noise=z))
    torch.manual_seed(5)
    d = sampler.sample(4)
    torch.manual_seed(5)
    assert torch.equal(d, sampler.sample(4))


def test_int_label_and_each_class_order():
    model = tiny_dit()
    sampler = Sampler(model, steps=2, method="euler")
    assert sampler.generate(4, 2, seed=0).labels.tolist() == [2, 2, 2, 2]
    each = sampler.generate_each_class(2, seed=0, cfg_scale=1.5)
    out = sampler.sample_each_class(2, seed=0, cfg_scale=1.5)
    assert out.shape == (6, 3, 8, 8) and torch.equal(out, each.images)
    assert each.labels.tolist() == [0, 0, 1, 1, 2, 2]  # grid nrow=2: one class per row, as in training
    assert torch.equal(out, sampler.sample(6, torch.tensor([0, 0, 1, 1, 2, 2]), seed=0, cfg_scale=1.5))


# ----------------------------------------------------------------------------- trajectories and files


def test_trajectory_frames_bounded_and_ends_right():
    model, z, _ = gaussian_problem()
    sampler = Sampler(model, method="euler", max_frames=10)
    images, traj = sampler.sample(len(z), noise=z, steps=100, return_trajectory=True)
    assert traj.shape == (10, *z.shape) and traj.dtype == torch.float32 and traj.device.type == "cpu"
    assert torch.equal(traj[0], z.float())
    assert torch.allclose(images, ((traj[-1] + 1) / 2).clamp(0, 1))
    _, traj = sampler.sample(len(z), noise=z, steps=3, return_trajectory=True)
    assert traj.shape[0] == 4  # fewer steps than max_frames: every state
    _, traj = sampler.sample(len(z), noise=z, method="dopri5", return_trajectory=True)
    assert traj.shape[0] == 10 and torch.equal(traj[0], z.float())


def test_gif_frames_size_and_clipping(tmp_path):
    k, n, nrow = 7, 5, 3
    # One constant value per frame; neighbours differ after clipping (the encoder merges identical frames).
    values = torch.tensor([-2.0, 0.0, 0.5, 3.0, -0.5, 1.0, -1.0])
    traj = values.view(k, 1, 1, 1, 1).expand(k, n, 1, 8, 8)
    path = tmp_path / "sub" / "traj.gif"
    to_gif(traj, path, fps=5, nrow=nrow)
    gif = Image.open(path)
    assert gif.n_frames == k
    assert gif.size == (nrow * 66 + 2, 2 * 66 + 2)  # 8x8 tiles enlarged 8x to 64, padding 2 (make_grid), 2 rows
    expected = [0, 128, 191, 255, 64, 255, 0]  # clipped to [-1, 1], then mapped to [0, 255]
    for i in range(k):
        gif.seek(i)
        assert np.asarray(gif.convert("RGB"))[5, 5].tolist() == [expected[i]] * 3


def test_save_grid_and_npz_round_trip(tmp_path):
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    save_grid(images, tmp_path / "g.png", nrow=2, min_size=0)  # the real size
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (3 * 10 + 2, 2 * 10 + 2, 3)
    assert np.array_equal(grid[2:10, 2:10], to_uint8(images[:1])[0])
    # Under 64 pixels a grid is enlarged by an integer factor (8 here): every pixel an exact 8x8 block.
    save_grid(images, tmp_path / "big.png", nrow=2)
    big = np.asarray(Image.open(tmp_path / "big.png"))
    assert big.shape == (3 * 66 + 2, 2 * 66 + 2, 3)
    tile = big[2:66, 2:66]
    assert np.array_equal(tile, to_uint8(images[:1])[0].repeat(8, axis=0).repeat(8, axis=1))
    save_grid(torch.rand(2, 3, 32, 32), tmp_path / "cifar.png", nrow=2)  # 32 -> 64: a factor of 2
    assert Image.open(tmp_path / "cifar.png").size == (2 * 66 + 2, 66 + 2)
    save_grid(torch.rand(2, 1, 64, 64), tmp_path / "large.png", nrow=2)  # 64 and up: the real size
    assert Image.open(tmp_path / "large.png").size == (2 * 66 + 2, 66 + 2)
    labels = torch.tensor([1, 0, 2, 2, 1])
    save_npz(images, labels, tmp_path / "s.npz")
    data = np.load(tmp_path / "s.npz")
    assert data["images"].dtype == np.uint8 and data["images"].shape == (5, 8, 8, 3)
    assert np.array_equal(data["images"], (images.permute(0, 2, 3, 1) * 255).round().byte().numpy())
    assert data["labels"].tolist() == [1, 0, 2, 2, 1]


def interrupted_encoder(fp, *args, **kwargs):
    """An encoder stopped by Ctrl-C half-way: some bytes written, then KeyboardInterrupt."""
    import os

    f = open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp  # np.savez gets a path or a file
    f.write(b"half a file")
    f.flush()
    raise KeyboardInterrupt


@pytest.mark.parametrize("writer", ["grid", "gif", "npz"])
# imageio's GIF writer flushes again when it is garbage-collected, and meets the stand-in encoder's interrupt twice
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupted_write_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch, writer):
    images = torch.rand(4, 1, 8, 8)
    path = tmp_path / {"grid": "g.png", "gif": "t.gif", "npz": "s.npz"}[writer]
    write = {
        "grid": lambda: save_grid(images, path, nrow=2),
        "gif": lambda: to_gif(images.unsqueeze(0).repeat(3, 1, 1, 1, 1) * 2 - 1, path, nrow=2),
        "npz": lambda: save_npz(images, None, path),
    }[writer]
    write()
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", lambda file, **arrays: interrupted_encoder(file))
    for fmt in ("PNG", "GIF"):  # what PIL calls to encode (imageio's pillow plugin too, for the GIF)
        monkeypatch.setitem(Image.SAVE, fmt, lambda im, fp, filename: interrupted_encoder(fp))
        monkeypatch.setitem(Image.SAVE_ALL, fmt, lambda im, fp, filename: interrupted_encoder(fp))
    with pytest.raises(KeyboardInterrupt):
        write()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    path.unlink()
    with pytest.raises(KeyboardInterrupt):
        write()
    assert not path.exists()  # a new file appears whole or not at all


def test_ctrl_c_while_the_cli_writes_its_grid_leaves_no_file_to_block_the_rerun(tmp_path):
    """A real SIGINT, sent by the PNG encoder to its own process half-way through the file."""
    import subprocess
    import sys

    from stand_ins import CHILD_ENV

    write_checkpoint(tmp_path / "ckpt.pt", tiny_dit())
    out = tmp_path / "grid.png"
    argv = ["--ckpt", str(tmp_path / "ckpt.pt"), "--n", "4", "--steps", "2", "--device", "cpu", "--out", str(out)]
    runner = (
        "import os, signal, sys, time\n"
        "from PIL import Image, PngImagePlugin\n"
        "import sampler\n"
        "def save(im, fp, filename):\n"
        "    fp.write(b'half a png'); fp.flush(); os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "Image.SAVE['PNG'] = save\n"
        "sampler.cli(sys.argv[1:])\n"
    )
    root = Path(__file__).resolve().parents[1]
    stopped = subprocess.run(
        [sys.executable, "-c", runner, *argv], cwd=root, env=CHILD_ENV, capture_output=True, text=True, timeout=120
    )
    assert stopped.returncode != 0, stopped.stderr[-2000:]  # stopped by the Ctrl-C, not finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no truncated grid.png, no temporary file
    rerun = subprocess.run(
        [sys.executable, "sampler.py", *argv], cwd=root, env=CHILD_ENV, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert Image.open(out).size == (2 * 66 + 2, 2 * 66 + 2)


# ----------------------------------------------------------------------------- checkpoints and CLI


def write_checkpoint(path, model: DiT) -> dict:
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    save_checkpoint(
        {"model_config": model.config, "model": model.state_dict(), "ema": ema, "step": 3, "config": {}}, path
    )
    return ema


def test_from_checkpoint_loads_ema_or_raw(tmp_path):
    model = tiny_dit()
    ema = write_checkpoint(tmp_path / "ckpt.pt", model)
    s_ema = Sampler.from_checkpoint(tmp_path / "ckpt.pt", device="cpu", steps=2)
    s_raw = Sampler.from_checkpoint(tmp_path / "ckpt.pt", ema=False, device="cpu", steps=2)
    assert s_ema.options.steps == 2 and s_ema.num_classes == 3
    for k, v in s_ema.model.state_dict().items():
        assert torch.equal(v, ema[k])
    ref = Sampler(model, steps=2)
    assert torch.equal(s_raw.sample(3, seed=1), ref.sample(3, seed=1))
    with pytest.raises(TypeError):
        Sampler.from_checkpoint(tmp_path / "ckpt.pt", device="cpu", stepz=2)
    with pytest.raises(CheckpointError, match="not found"):
        Sampler.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        Sampler.from_checkpoint(tmp_path / "bad.pt")


def test_cli_writes_grid_gif_npz(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt.pt", tiny_dit())
    out, gif, npz = tmp_path / "grid.png", tmp_path / "traj.gif", tmp_path / "s.npz"
    argv = [
        "--ckpt",
        str(tmp_path / "ckpt.pt"),
        "--n",
        "5",
        "--cfg-scale",
        "2.5",
        "--steps",
        "4",
        "--method",
        "heun",
        "--seed",
        "0",
        "--out",
        str(out),
        "--gif",
        str(gif),
        "--npz",
        str(npz),
        "--class-label",
        "1",
        "--device",
        "cpu",
        "--nrow",
        "5",
    ]
    cfg = sampler_mod.parse_args(argv)
    assert cfg.cfg_scale == 2.5 and cfg.steps == 4 and cfg.class_label == 1
    result = sampler_mod.main(cfg)
    assert "NFE 8" in capsys.readouterr().out
    data = np.load(npz)
    assert np.array_equal(data["images"], to_uint8(result["images"]))
    assert data["labels"].tolist() == [1] * 5
    assert Image.open(out).size == (5 * 66 + 2, 66 + 2)  # 8x8 samples shown 8x larger
    assert Image.open(gif).n_frames == 5  # every state of 4 steps
    # The same flags again: nothing is overwritten without --overwrite, with one clear error line.
    with pytest.raises(SystemExit) as e:
        sampler_mod.cli(argv)
    assert str(e.value).startswith("error:") and "already exists" in str(e.value) and "\n" not in str(e.value)
    sampler_mod.cli([*argv, "--overwrite"])


def test_cli_errors_are_one_line(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", tiny_dit())
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    cases = [
        (["--ckpt", str(tmp_path / "missing.pt")], "not found"),
        (["--ckpt", str(tmp_path / "bad.pt")], "cannot read checkpoint"),
        (["--ckpt", str(tmp_path / "ckpt.pt"), "--class-label", "3"], "labels must lie in [0, 3)"),
        (["--ckpt", str(tmp_path / "ckpt.pt"), "--guidance-interval", "0.8", "0.2"], "guidance_interval"),
        (["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "x.txt")], "must end in"),
        (["--ckpt", str(tmp_path / "ckpt.pt"), "--method", "mean"], "method 'mean' needs an average-velocity network"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sampler_mod.cli([*argv, "--out", str(tmp_path / "o.png")] if "--out" not in argv else argv)
        text = str(e.value)
        assert text.startswith("error:") and message in text and "\n" not in text, text
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        sampler_mod.parse_args(["--ckpt", "x", "--steps", "0"])
    with pytest.raises(SystemExit) as e:  # a malformed flag is argparse's error
        sampler_mod.parse_args(["--ckpt", "x", "--steps", "two"])
    assert e.value.code == 2


def test_help_documents_every_flag_and_defaults_match(capsys):
    parser = build_parser(sampler_mod.SampleConfig, "sampler.py", "")
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        sampler_mod.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--ckpt",
        "--n",
        "--cfg-scale",
        "--steps",
        "--method",
        "--seed",
        "--out",
        "--gif",
        "--npz",
        "--class-label",
        "--guidance-interval",
        "--grid",
        "--batch-size",
    ):
        assert flag in text
    # The sampling flags are the Sampler's own options: one declaration, one set of defaults.
    cfg = sampler_mod.parse_args(["--ckpt", "x"])
    assert cfg.method is None  # the checkpoint's objective's method; a bare network's is heun
    assert Sampler(tiny_dit()).options == Sampler(tiny_dit(), **sampling_options(cfg)).options
    assert Sampler(tiny_dit()).options == dataclasses.replace(SamplingOptions(**sampling_options(cfg)), method="heun")


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_value_errors():
    model = tiny_dit()
    sampler = Sampler(model, steps=2)
    cases = [
        (dict(n=3, y=torch.tensor([0, 1])), "expected 3 labels"),
        (dict(n=2, y=torch.tensor([0, 3])), r"labels must lie in \[0, 3\)"),
        (dict(n=2, y=torch.tensor([-1, 0])), r"labels must lie in \[0, 3\)"),
        (dict(n=2, y=torch.tensor([0.0, 1.0])), "must be integers"),
        (dict(n=2, steps=0), "steps must be >= 1"),
        (dict(n=2, steps=2.5), "steps must be an integer"),
        (dict(n=2, method="rk4"), "unknown method 'rk4'"),
        (dict(n=2, method="mean"), r"method 'mean' needs an average-velocity network"),
        (dict(n=2, grid="cosine"), "unknown grid"),
        (dict(n=2, noise=torch.randn(2, 3, 4, 4)), r"noise must be a float tensor of shape \(2, 3, 8, 8\)"),
        (dict(n=2, guidance_interval=(0.7, 0.2)), "guidance_interval"),
        (dict(n=0), "n must be an integer >= 1"),
        (dict(n=2, seed=-1), "seed must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sampler.sample(**kwargs)
    with pytest.raises(TypeError):
        sampler.sample(2, stepz=3)  # a misspelled option is refused, not ignored
    with pytest.raises(ValueError, match="unknown method"):
        Sampler(model, method="adams")
    with pytest.raises(ValueError, match="--batch-size"):
        Sampler(model, batch_size=0)

    uncond = Sampler(tiny_dit(num_classes=0), steps=2)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(2, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample_each_class(1)
    assert uncond.sample(2, seed=0).shape == (2, 3, 8, 8) and uncond.generate(2, seed=0).labels is None


# ----------------------------------------------------------------------------- precision


class BF16Velocity(nn.Module):
    """A constant velocity 1/3 returned in bf16 (as a network under autocast returns it); records what it sees."""

    input_size, in_channels, num_classes = 2, 1, 0

    def __init__(self):
        super().__init__()
        self.register_buffer("dummy", torch.zeros(()))
        self.seen: list[tuple[torch.dtype, torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append((x.dtype, t.dtype, torch.is_autocast_enabled("cpu")))
        return torch.full_like(x, 1 / 3, dtype=torch.bfloat16)


def test_bf16_velocity_goes_back_to_a_float32_state():
    model = BF16Velocity()
    sampler = Sampler(model, method="euler", grid="edm", steps=5, precision="bf16")
    z = torch.linspace(-1, 1, 8).view(2, 1, 2, 2)
    out = sampler.generate(2, noise=z, trajectory=True)
    traj = out.trajectory
    assert out.precision == "bf16"
    assert model.seen == [(torch.float32, torch.float32, True)] * 5  # autocast on; state and times float32
    # The same Euler steps in float32 with the bf16-rounded velocity (0.333984375): a bf16 state would round
    # every step's sum to 8 bits of mantissa and miss this bit-for-bit.
    v = torch.tensor(1 / 3, dtype=torch.bfloat16).float()
    x = z.clone()
    for h in time_grid(5, "edm").diff().tolist():
        x = x + h * v
    assert torch.equal(traj[-1], x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sampler.velocity(z, 0.5).dtype == torch.float32


# CPU bf16 autocast hands RMSNorm (qk-norm) a bf16 input with float32 weights: torch warns it is not fused.
bf16_on_cpu = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


@bf16_on_cpu
def test_precision_auto_on_cpu_is_fp32_and_bf16_is_close():
    model = tiny_dit()
    sampler = Sampler(model, steps=3, method="heun")
    kw = dict(seed=0, cfg_scale=2.0)
    auto_out = sampler.generate(6, **kw)
    auto = auto_out.images
    assert sampler.options.precision == "auto" and auto_out.precision == "fp32"
    fp32 = sampler.sample(6, precision="fp32", **kw)
    assert torch.equal(auto, fp32)  # auto on the CPU is fp32, bit for bit
    bf16_out = sampler.generate(6, precision="bf16", **kw)
    bf16 = bf16_out.images
    assert bf16_out.precision == "bf16" and bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # the network really ran in bf16 ...
    assert (bf16 - fp32).abs().max() < 0.1 and (bf16 - fp32).abs().mean() < 0.01  # ... and lands close to fp32
    assert torch.equal(Sampler(model, steps=3, precision="bf16").sample(6, **kw), bf16)  # constructor == per call
    assert torch.equal(Sampler(model, steps=3, precision="bf16").sample(6, precision="fp32", **kw), fp32)


def test_resolve_precision(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cuda) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere GPUs
    assert resolve_precision("auto", cuda) == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        Sampler(tiny_dit(), precision="half")
    with pytest.raises(ValueError, match="unknown precision"):
        Sampler(tiny_dit(), steps=1).sample(1, precision="half")


# ----------------------------------------------------------------------------- devices, shared flags, layout


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    for name in ("foo", "cuda:x", "meta", ""):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(name)
    with pytest.raises(ValueError, match="CUDA devices|no CUDA device"):
        resolve_device("cuda:99")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="no CUDA device is available"):
                resolve_device(name)


def test_cli_bad_device_is_one_line(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", tiny_dit())
    cases = [("foo", "unknown device 'foo'")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "no CUDA device is available"))
    for device, message in cases:
        with pytest.raises(SystemExit) as e:
            sampler_mod.cli(["--ckpt", str(tmp_path / "ckpt.pt"), "--device", device, "--out", str(tmp_path / "o.png")])
        text = str(e.value)
        assert text.startswith("error:") and message in text and "\n" not in text, text
    assert not (tmp_path / "o.png").exists()


@bf16_on_cpu
def test_cli_precision_flag(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt.pt", tiny_dit())
    argv = ["--ckpt", str(tmp_path / "ckpt.pt"), "--n", "3", "--steps", "2", "--method", "euler", "--device", "cpu"]
    fp32 = sampler_mod.main(sampler_mod.parse_args([*argv, "--out", str(tmp_path / "a.png")]))
    cfg = sampler_mod.parse_args([*argv, "--precision", "bf16", "--out", str(tmp_path / "b.png")])
    assert cfg.precision == "bf16" and sampling_options(cfg)["precision"] == "bf16"
    bf16 = sampler_mod.main(cfg)
    assert fp32["precision"] == "fp32" and fp32["config"]["precision"] == "auto"
    assert bf16["precision"] == "bf16" and "bf16 on cpu" in capsys.readouterr().out
    assert not torch.equal(fp32["images"], bf16["images"])
    with pytest.raises(SystemExit) as e:
        sampler_mod.parse_args([*argv, "--precision", "fp16"])
    assert e.value.code == 2


def test_sampling_options_are_declared_once():
    import evaluate

    # sampler.py's and evaluate.py's configs are SamplingOptions: nothing else declares the sampling fields.
    names = {f.name for f in fields(sampling.sampler.SamplingOptions)}
    for config in (sampler_mod.SampleConfig, evaluate.EvalConfig):
        assert issubclass(config, sampling.sampler.SamplingOptions)
        assert not set(config.__annotations__) & names, config
    # A bare network's Sampler resolves the default method (None) to heun and keeps every other default.
    assert SamplingOptions().method is None
    assert dataclasses.replace(SamplingOptions(), method="heun") == Sampler(tiny_dit()).options
    # One helper takes the sampling options out of both scripts' configs.
    for parse_args in (sampler_mod.parse_args, evaluate.parse_args):
        cfg = parse_args(["--ckpt", "x", "--steps", "7"])
        assert sampling_options(cfg) == {**dataclasses.asdict(SamplingOptions()), "steps": 7}


def test_layout_reexports():
    # `from sampler import Sampler, save_grid, to_gif` keeps working: the code lives in evaluation/ and sampling/.
    for name in ("to_uint8", "save_grid", "to_gif", "save_npz"):
        assert getattr(sampler_mod, name) is getattr(evaluation.images, name)
    assert sampler_mod.Sampler is sampling.sampler.Sampler and sampler_mod.Samples is sampling.sampler.Samples
    assert sampler_mod.time_grid is sampling.solvers.time_grid


def test_heun_corrects_the_last_step_on_every_grid():
    model, z, _ = gaussian_problem()
    sampler = Sampler(model, method="heun", steps=5)
    for grid in GRIDS:
        model.calls = 0
        out = sampler.generate(len(z), noise=z, grid=grid)
        assert out.nfe == model.calls == 10, grid  # 2 * steps (EDM's own sampler: 2 * steps - 1)


def test_mean_method_lands_on_the_exact_endpoint():
    from test_meanflow import GaussianMeanVelocity  # the exact average velocity of a Gaussian flow

    model = GaussianMeanVelocity(0.7, 0.5, in_channels=1, input_size=4)
    model.average_velocity = True  # what Sampler checks before it jumps along an average velocity
    z = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = 0.7 + 0.5 * z  # the flow's endpoint for noise z
    sampler = Sampler(model, method="mean")
    for steps, grid in [(1, "uniform"), (2, "uniform"), (3, "edm"), (4, "shifted")]:
        out = sampler.generate(5, noise=z, steps=steps, grid=grid, trajectory=True)
        x = out.trajectory[-1].double()
        assert out.nfe == steps and all_close(x, exact, rel=1e-6), (steps, grid)  # frames are float32
    # The instantaneous velocity (interval 0) is the flow's own: one Euler step misses, many converge.
    one = final_state(sampler, 5, noise=z, steps=1, method="euler")
    many = final_state(sampler, 5, noise=z, steps=256, method="heun")
    assert (one - exact).abs().max() > 0.05 and all_close(many, exact, rel=1e-5)


def test_repr_names_the_model_and_the_defaults():
    text = repr(Sampler(tiny_dit(), steps=7, method="midpoint", cfg_scale=2.5))
    for part in (
        "DiT",
        "M params",
        "3 classes",
        "3x8x8 images",
        "cpu",
        "midpoint 7 steps",
        "cfg 2.5",
        "precision auto",
    ):
        assert part in text, (part, text)


# ----------------------------------------------------------------------------- Samples: results come back from the call


def test_generate_returns_samples_equal_to_what_sample_gives():
    model = tiny_dit()
    sampler = Sampler(model, steps=3, method="heun", batch_size=4, max_frames=3)
    out = sampler.generate(6, seed=5, cfg_scale=2.0, trajectory=True)
    images, trajectory = sampler.sample(6, seed=5, cfg_scale=2.0, return_trajectory=True)
    assert isinstance(out, Samples)
    assert torch.equal(out.images, images) and torch.equal(out.trajectory, trajectory)
    assert torch.equal(out.images, sampler.sample(6, seed=5, cfg_scale=2.0))
    assert out.images.shape == (6, 3, 8, 8) and out.images.dtype == torch.float32
    assert out.trajectory.shape == (3, 6, 3, 8, 8) and out.trajectory.dtype == torch.float32
    assert out.trajectory.device.type == "cpu"
    assert torch.equal(out.labels, sampling.sampler.seeded_labels(5, 6, 3)) and out.labels.dtype == torch.int64
    assert out.nfe == 6 and out.nfe_per_chunk == [6, 6]  # heun: 2 per step; chunks of 4 and 2
    assert out.seed == 5 and out.precision == "fp32"
    assert sampler.generate(6, seed=5).trajectory is None  # only when asked for
    each = sampler.generate_each_class(2, seed=1, trajectory=True)
    each_images, each_trajectory = sampler.sample_each_class(2, seed=1, return_trajectory=True)
    assert torch.equal(each.images, each_images) and torch.equal(each.trajectory, each_trajectory)
    assert each.labels.tolist() == [0, 0, 1, 1, 2, 2] and each.seed == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.nfe = 0
    # The sampler keeps nothing of its calls.
    assert not [name for name in vars(sampler) if name.startswith("last") or name == "_nfe"]
    assert set(f.name for f in fields(Samples)) == {
        "images",
        "labels",
        "trajectory",
        "nfe",
        "nfe_per_chunk",
        "seed",
        "precision",
    }


def test_samples_seed_is_the_one_that_repeats_the_call():
    sampler = Sampler(tiny_dit(), steps=2, method="euler")
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    drawn = sampler.generate(4)  # no seed: one is drawn and reported
    assert isinstance(drawn.seed, int) and torch.equal(sampler.sample(4, seed=drawn.seed), drawn.images)
    random_labels = sampler.generate(4, noise=z)  # the noise is given, the labels are drawn from a reported seed
    assert torch.equal(random_labels.labels, sampling.sampler.seeded_labels(random_labels.seed, 4, 3))
    assert sampler.generate(4, noise=z, seed=7).labels.tolist() == sampling.sampler.seeded_labels(7, 4, 3).tolist()
    assert sampler.generate(4, y=1, noise=z).seed is None  # nothing random


def test_nfe_per_chunk_counts_each_chunk_of_an_adaptive_solver():
    # v(x, t) = x: dopri5's step count depends on the state's scale (atol or rtol dominates), so chunks differ.
    model = Exponential()
    calls: list[int] = []
    model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    z = torch.cat([torch.full((2, 1, 2, 2), 1e-9), torch.full((2, 1, 2, 2), 1e3)]).double()
    sampler = Sampler(model, method="dopri5", rtol=1e-9, atol=1e-9, batch_size=2)
    out = sampler.generate(4, noise=z)
    assert len(out.nfe_per_chunk) == 2 and out.nfe_per_chunk[0] != out.nfe_per_chunk[1]
    assert out.nfe == max(out.nfe_per_chunk) and sum(out.nfe_per_chunk) == len(calls)
    assert calls == [2] * len(calls)
    # Each chunk counts what the same samples cost in a call of their own.
    assert [sampler.generate(2, noise=z[i : i + 2]).nfe for i in (0, 2)] == out.nfe_per_chunk


# ----------------------------------------------------------------------------- the solver registry


class CountingVelocity(nn.Module):
    """v = 0 (or any average velocity 0); records each call's batch and whether it had an interval."""

    input_size, in_channels, num_classes = 2, 1, 0

    def __init__(self, average_velocity: bool):
        super().__init__()
        self.register_buffer("dummy", torch.zeros(()))
        self.average_velocity = average_velocity
        self.intervals: list[bool] = []

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, interval: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert interval is None or self.average_velocity
        self.intervals.append(interval is not None)
        return torch.zeros_like(x)


@pytest.mark.parametrize("method", FIXED_GRID_SOLVERS)
def test_registry_nfe_per_step_matches_counted_network_calls(method):
    solver = SOLVERS[method]
    calls: list[float | None] = []

    def f(x, t, h=None):
        calls.append(h)
        return -x

    x = torch.ones(3, 1, 2, 2)
    out = solver_step(f, x, 0.25, 0.75, method)
    assert len(calls) == solver.nfe_per_step and out.shape == x.shape
    assert all((h is not None) == solver.average_velocity for h in calls)  # only jumps take the interval
    if solver.average_velocity:
        assert calls == [0.5] and torch.equal(out, x - 0.5 * x)  # x + h u(x, t0, h)
    # Through the Sampler: steps * nfe_per_step network calls, all reported as NFE.
    model = CountingVelocity(average_velocity=solver.average_velocity)
    result = Sampler(model, method=method, steps=3).generate(2, seed=0)
    assert result.nfe == 3 * solver.nfe_per_step == len(model.intervals)
    assert all(had == solver.average_velocity for had in model.intervals)


def test_method_choices_come_from_the_registry_and_unknown_methods_are_errors():
    assert METHODS == (*FIXED_GRID_SOLVERS, "dopri5") and FIXED_GRID_SOLVERS == tuple(SOLVERS)
    assert set(FIXED_GRID_SOLVERS) >= {"euler", "midpoint", "heun", "mean"}
    method = next(f for f in fields(SamplingOptions) if f.name == "method")
    assert method.default is None and tuple(method.metadata["choices"]) == METHODS
    help_text = method.metadata["help"]
    assert all(name in help_text for name in METHODS) and "default" in help_text
    assert "ODE" not in SOLVERS["mean"].about  # a jump along an average velocity is no ODE solver
    assert {name: s.nfe_per_step for name, s in SOLVERS.items()} == {"euler": 1, "midpoint": 2, "heun": 2, "mean": 1}
    assert [name for name, s in SOLVERS.items() if s.average_velocity] == ["mean"]

    def f(x, t, h=None):
        raise AssertionError("an unknown method must not evaluate the network")

    for name in ("rk4", "Mean", "dopri5", ""):  # dopri5 has no fixed grid: the Sampler runs it itself
        with pytest.raises(ValueError, match=f"unknown fixed-grid method {name!r}"):
            solver_step(f, torch.zeros(1, 1, 2, 2), 0.0, 1.0, name)
    with pytest.raises(ValueError, match="unknown method 'rk4'"):
        SamplingOptions(method="rk4")
    with pytest.raises(ValueError, match="unknown grid 'cosine'"):
        time_grid(4, "cosine")


def test_mean_method_on_a_network_without_average_velocity_is_one_line():
    for model in (tiny_dit(), CountingVelocity(average_velocity=False), Exponential()):
        with pytest.raises(ValueError) as e:
            Sampler(model, method="mean", steps=1).generate(1, y=0 if getattr(model, "num_classes", 0) else None)
        text = str(e.value)
        assert (
            text
            == (
                "method 'mean' needs an average-velocity network (one trained with an objective whose "
                "sample_method is 'mean')"
            )
            and "meanflow" not in text.lower()
        )
    # An average-velocity network jumps with "mean" and takes every ODE solver at interval 0.
    model = CountingVelocity(average_velocity=True)
    for method in METHODS:
        model.intervals.clear()
        Sampler(model, method=method, steps=2).generate(1, seed=0)
        assert model.intervals and all(had == (method == "mean") for had in model.intervals), method


# ----------------------------------------------------------------------------- default method


def objective_checkpoint(path, objective: str | None) -> DiT:
    """A checkpoint of a tiny DiT built as the objective builds it; objective None: an old one that names none."""
    from objectives import OBJECTIVES

    torch.manual_seed(0)
    options = OBJECTIVES[objective or "flow"]().network_options()
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=3,
        num_registers=2,
        **options,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    sd = model.state_dict()
    config = {} if objective is None else {"objective": objective}
    save_checkpoint({"model_config": model.config, "model": sd, "ema": sd, "step": 1, "config": config}, path)
    return model.eval()


def test_default_method_is_the_checkpoints_objectives(tmp_path):
    from objectives import OBJECTIVES

    expected = {"flow": "heun", "meanflow": "mean"}
    assert {name: cls.sample_method for name, cls in OBJECTIVES.items() if name in expected} == expected
    for objective in [*OBJECTIVES, None]:
        path = tmp_path / f"{objective}.pt"
        model = objective_checkpoint(path, objective)
        method = OBJECTIVES[objective or "flow"].sample_method
        sampler = Sampler.from_checkpoint(path, device="cpu", steps=2)
        assert sampler.options.method == method, objective
        assert Sampler.from_checkpoint(path, device="cpu", method=None).options.method == method
        assert Sampler.from_checkpoint(path, device="cpu", method="euler").options.method == "euler"
        out = sampler.generate(3, seed=0)
        assert out.nfe == 2 * SOLVERS[method].nfe_per_step
        assert torch.equal(out.images, Sampler(model, steps=2, method=method).sample(3, seed=0))
        assert sampler.generate(3, seed=0, method=None).nfe == out.nfe  # None per call: the sampler's method
        # A bare network samples with heun, whatever it is.
        assert Sampler(model).options.method == "heun" and Sampler(model, method=None).options.method == "heun"
    meanflow = Sampler.from_checkpoint(tmp_path / "meanflow.pt", device="cpu", steps=1)
    assert meanflow.average_velocity and "average-velocity" in repr(meanflow) and meanflow.generate(2, seed=0).nfe == 1
    # A checkpoint records its objective's method (training/resume.py): an objective unknown here samples with it.
    state = {"model_config": tiny_dit().config, "model": tiny_dit().state_dict(), "config": {"objective": "x"}}
    save_checkpoint(state | {"sample_method": "midpoint"}, tmp_path / "odd.pt")
    assert Sampler.from_checkpoint(tmp_path / "odd.pt", ema=False, device="cpu").options.method == "midpoint"


def test_cli_without_method_uses_the_checkpoints_objective(tmp_path, capsys):
    for objective, method, nfe in (("flow", "heun", 6), ("meanflow", "mean", 3)):
        objective_checkpoint(tmp_path / f"{objective}.pt", objective)
        cfg = sampler_mod.parse_args(
            [
                "--ckpt",
                str(tmp_path / f"{objective}.pt"),
                "--n",
                "2",
                "--steps",
                "3",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / f"{objective}.png"),
            ]
        )
        assert cfg.method is None
        result = sampler_mod.main(cfg)
        assert result["method"] == method and result["nfe"] == nfe and result["config"]["method"] is None
        assert f"{method} on a uniform grid, NFE {nfe}" in capsys.readouterr().out
    text = build_parser(sampler_mod.SampleConfig, "sampler.py", "").format_help()
    assert "--method" in text and "checkpoint's objective" in text.replace("\n", " ").replace("  ", " ")


# ----------------------------------------------------------------------------- checks at the boundary


def test_sampler_checks_what_the_network_no_longer_does():
    """Every check the DiT made on a sampling call, now a one-line ValueError at the Sampler, before any work."""
    model = tiny_dit(num_classes=10)
    calls: list[int] = []
    model.x_embedder.register_forward_hook(lambda mod, inp, out: calls.append(1))
    sampler = Sampler(model, steps=1, method="euler")
    x = torch.randn(2, 3, 8, 8)
    cases = [
        # states of the wrong shape or kind
        (lambda: sampler.generate(2, noise=torch.randn(2, 1, 8, 8)), r"noise must be a float tensor of shape \(2, 3,"),
        (lambda: sampler.generate(2, noise=torch.randn(2, 3, 16, 16)), r"noise must be a float tensor of shape"),
        (lambda: sampler.generate(2, noise=torch.randn(2, 3, 8)), r"noise must be a float tensor of shape"),
        (lambda: sampler.generate(2, noise=torch.randn(3, 3, 8, 8)), r"noise must be a float tensor of shape"),
        (lambda: sampler.generate(2, noise=torch.zeros(2, 3, 8, 8, dtype=torch.long)), "noise must be a float"),
        (lambda: sampler.generate(2, noise=np.zeros((2, 3, 8, 8))), "noise must be a float tensor"),
        (lambda: sampler.velocity(torch.randn(2, 1, 8, 8), 0.5, torch.zeros(2, dtype=torch.long)), "x must be"),
        (lambda: sampler.velocity(torch.randn(2, 3, 8), 0.5, torch.zeros(2, dtype=torch.long)), "x must be"),
        # times: one number per call
        (lambda: sampler.velocity(x, torch.rand(3), torch.zeros(2, dtype=torch.long)), "t must be one number"),
        (lambda: sampler.velocity(x, torch.rand(2, 1), torch.zeros(2, dtype=torch.long)), "t must be one number"),
        # labels: range (the null class num_classes included), count, shape, dtype, presence
        (lambda: sampler.generate(2, torch.tensor([0, 10])), r"labels must lie in \[0, 10\)"),
        (lambda: sampler.generate(2, torch.tensor([-1, 0])), r"labels must lie in \[0, 10\)"),
        (lambda: sampler.generate(2, 10), r"labels must lie in \[0, 10\)"),
        (lambda: sampler.generate(2, torch.tensor([0, 10]), cfg_scale=2.0), r"labels must lie in \[0, 10\)"),
        (lambda: sampler.velocity(x, 0.5, torch.tensor([0, 10])), r"labels must lie in \[0, 10\)"),
        (lambda: sampler.generate(2, torch.zeros(3, dtype=torch.long)), r"expected 2 labels y of shape \(2,\)"),
        (lambda: sampler.generate(2, torch.zeros(2, 1, dtype=torch.long)), r"expected 2 labels y of shape \(2,\)"),
        (lambda: sampler.generate(2, torch.zeros(2)), "labels y must be integers"),
        (lambda: sampler.generate(2, [0.5, 1.0]), "labels y must be integers"),
        (lambda: sampler.generate(2, torch.tensor([True, False])), "labels y must be integers"),
        (lambda: sampler.generate(2, ["a", "b"]), "labels y must be integers"),
        (lambda: sampler.velocity(x, 0.5), "class-conditional: pass labels y"),
        (lambda: sampler.velocity(x, 0.5, torch.zeros(2)), "labels y must be integers"),
        # an interval only for an average-velocity network
        (lambda: sampler.velocity(x, 0.5, torch.zeros(2, dtype=torch.long), interval=0.0), "average-velocity"),
        (lambda: sampler.generate(2, method="mean"), "average-velocity"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value), str(e.value)
    assert calls == []  # refused before the network ran
    uncond = Sampler(tiny_dit(num_classes=0), steps=1)
    for call in (
        lambda: uncond.generate(2, torch.zeros(2, dtype=torch.long)),
        lambda: uncond.velocity(x, 0.5, 0),
        lambda: uncond.generate(2, cfg_scale=2.0),
    ):
        with pytest.raises(ValueError, match="unconditional"):
            call()
    # What passes: labels of any integer dtype, on any device, and the checked velocity equals the network's.
    small = sampler.generate(2, torch.tensor([1, 9], dtype=torch.uint8), seed=0)
    assert torch.equal(small.labels, torch.tensor([1, 9])) and small.labels.dtype == torch.int64
    with torch.no_grad():
        y = torch.tensor([3, 4])
        assert torch.equal(sampler.velocity(x, 0.5, y), model(x, torch.full((2,), 0.5), y))


def test_few_step_benchmark_reports_each_calls_nfe():
    from benchmarks.few_step import digits_quality, main

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    rows = digits_quality(Sampler(model), {"euler": [1, 2], "heun": [1]}, n=20)
    assert [(r["method"], r["steps"], r["nfe"]) for r in rows] == [("euler", 1, 1), ("euler", 2, 2), ("heun", 1, 2)]
    assert all(r["fd"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    with pytest.raises(SystemExit) as e:  # before the checkpoint is read
        main(["--ckpt", "missing.pt", "--methods", "rk4:1"])
    assert e.value.code == 2


def test_should_stop_is_asked_before_each_chunk_and_a_stop_returns_nothing():
    """What a training run's diagnostics pass: asked between chunks of batch_size; True raises SamplingStopped."""
    sampler = Sampler(tiny_dit(), steps=1, method="euler", batch_size=2)
    asked = []
    out = sampler.generate(5, 0, seed=0, should_stop=lambda: asked.append(len(asked)) is not None and False)
    assert len(asked) == 3 and out.images.shape[0] == 5  # chunks of 2, 2 and 1
    with pytest.raises(sampling.sampler.SamplingStopped, match="after 4 of 5 samples"):
        sampler.generate(5, 0, seed=0, should_stop=lambda: asked.append(len(asked)) is None and len(asked) > 5)


def test_each_class_of_some_classes_keeps_their_order():
    sampler = Sampler(tiny_dit(), steps=2, method="euler")
    each = sampler.generate_each_class(2, [2, 0], seed=0)
    assert each.labels.tolist() == [2, 2, 0, 0]  # the training grids' rows: a class per row
    assert torch.equal(each.images, sampler.sample(4, torch.tensor([2, 2, 0, 0]), seed=0))
    with pytest.raises(ValueError, match="at least one class"):
        sampler.generate_each_class(2, [])
