"""import_weights.py: SiT's and REPA's state dicts (random weights in their layouts, from the reference networks of
benchmarks/official_sit.py) imported and sampled through Sampler.from_checkpoint; bad input is one line, exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stand_ins import CHILD_ENV, all_close
from test_latents import make_vae, offline  # noqa: F401 (a fixture)

import import_weights
from benchmarks.official_sit import OfficialREPA, OfficialSiT
from models.dit import DiT
from models.vae import VAEError
from sampling.options import seeded_noise, step_noise
from sampling.sampler import Sampler
from utils.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMES = (0.0, 0.25, 0.6, 0.96, 1.0)


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The network with every weight drawn at random (the fixed pos_embed kept), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.08)
    return model.eval()


def sit(**kw) -> OfficialSiT:
    arch = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4, num_classes=10)
    return randomized(OfficialSiT(**arch | kw), 0)


def repa(**kw) -> OfficialREPA:
    arch = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=3, num_heads=4, num_classes=10)
    return randomized(OfficialREPA(encoder_depth=2, z_dims=(16,), projector_dim=32, **arch | kw), 1)


def imported(tmp_path: Path, fmt: str, state: dict, *flags: str) -> Path:
    save_checkpoint(state, tmp_path / f"{fmt}-in.pt")
    out = tmp_path / f"{fmt}-out.pt"
    assert import_weights.cli([fmt, str(tmp_path / f"{fmt}-in.pt"), "--out", str(out), *flags]) == 0
    return out


def inputs(model: torch.nn.Module, n: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.x_embedder.img_size[0]
    return torch.randn(n, 4, size, size, generator=g), torch.randint(0, model.num_classes, (n,), generator=g)


@pytest.mark.parametrize(
    "arch, flags",
    [
        ({}, ()),  # hidden 128: DiT-XS's 4 heads; learned sigma, dropped
        (
            dict(learn_sigma=False, hidden_size=48, num_heads=3, patch_size=4, input_size=16, depth=3),
            ("--num-heads", "3"),
        ),
    ],
)
def test_sit_velocity_and_guidance_equal_sits_own(tmp_path, arch, flags):
    ref = sit(**arch)
    out = imported(tmp_path, "sit", ref.state_dict(), *flags)
    sampler = Sampler.from_checkpoint(out, device="cpu")
    guided = Sampler.from_checkpoint(out, device="cpu", cfg_scale=2.5)
    everywhere = Sampler.from_checkpoint(out, device="cpu", cfg_scale=2.5, guidance_channels=4)
    x, y = inputs(ref)
    with torch.no_grad():
        for t in TIMES:
            expected = ref(x, torch.full((len(x),), t), y)  # the first 4 of its output channels
            assert expected.shape == x.shape and expected.abs().max() > 0.1
            assert all_close(sampler.velocity(x, t, y), expected, 1e-5), t
            # guidance on 3 channels: SiT's forward_with_cfg on (x, x) with (y, null)
            null = torch.full_like(y, ref.num_classes)
            sit_cfg = ref.forward_with_cfg(torch.cat([x, x]), torch.full((2 * len(x),), t), torch.cat([y, null]), 2.5)
            ours = guided.velocity(x, t, y)
            assert all_close(ours, sit_cfg[: len(x)], 1e-5), t
            assert all_close(everywhere.velocity(x, t, y)[:, :3], ours[:, :3], 1e-6)
            assert not all_close(everywhere.velocity(x, t, y)[:, 3], ours[:, 3], 1e-3)  # the 4th guided too


def test_repa_velocity_is_minus_its_output_at_one_minus_t(tmp_path):
    ref = repa()
    out = imported(tmp_path, "repa", ref.state_dict())
    state = load_checkpoint(out)
    ignored = [k for k in ref.state_dict() if k == "pos_embed" or k.startswith("projectors.")]
    assert sorted(state["source"]["ignored_keys"]) == sorted(ignored) and len(ignored) == 7
    sampler = Sampler.from_checkpoint(out, device="cpu")
    guided = Sampler.from_checkpoint(out, device="cpu", cfg_scale=1.8, guidance_interval=(0.3, 1.0))
    x, y = inputs(ref)
    null = torch.full_like(y, ref.num_classes)
    with torch.no_grad():
        for t in TIMES:
            tt = torch.full((len(x),), 1 - t)
            expected = -ref(x, tt, y)[0]
            assert all_close(sampler.velocity(x, t, y), expected, 1e-5), t
            # REPA guides every channel: v_u + s (v_c - v_u) of minus its outputs
            cond, uncond = -ref(x, tt, y)[0], -ref(x, tt, null)[0]
            # inside REPA's interval (its t <= 0.7) guided, outside not
            expected = uncond + 1.8 * (cond - uncond) if t >= 0.3 else cond
            assert all_close(guided.velocity(x, t, y), expected, 1e-5), t


def test_checkpoint_records_the_vae_protocol_and_source(tmp_path, capsys):
    ref = sit()
    out = imported(tmp_path, "sit", ref.state_dict())
    assert "note: trained learned-sigma outputs" in capsys.readouterr().err  # random weights: as in DiT's
    with torch.no_grad():  # SiT never trains them: they stay at their zero initialisation
        ref.final_layer.linear.weight.unflatten(0, (4, 8, -1))[:, 4:] = 0
    imported(tmp_path, "sit", ref.state_dict(), "--overwrite")
    assert "note" not in capsys.readouterr().err
    state = load_checkpoint(out)
    assert state["latent_space"]["vae"] == "stabilityai/sd-vae-ft-ema"
    assert state["latent_space"]["scale"] == [0.18215] * 4 and state["latent_space"]["shift"] == [0.0] * 4
    assert state["latent_space"]["latent_shape"] == [4, 8, 8] and state["latent_space"]["image_size"] == 64
    assert state["sample_method"] == "sde"
    assert state["sampling"] | {} == import_weights.PROTOCOLS["sit"]
    assert state["sampling"]["steps"] == 250 and state["sampling"]["cfg_scale"] == 1.5
    assert state["sampling"]["guidance_channels"] == 3 and state["model_config"]["guidance_channels"] == 3
    assert import_weights.PROTOCOLS["repa"]["cfg_scale"] == 1.8
    assert import_weights.PROTOCOLS["repa"]["guidance_interval"] == (0.3, 1.0)  # REPA's t <= 0.7, its time reversed
    assert state["source"]["repository"] == "willisma/SiT" and len(state["source"]["sha256"]) == 64
    config = state["model_config"]
    assert (config["hidden_size"], config["depth"], config["num_heads"], config["patch_size"]) == (128, 2, 4, 2)
    assert (config["input_size"], config["num_classes"], config["learn_sigma"], config["time_scale"]) == (
        8,
        10,
        True,
        1.0,
    )
    assert config["num_registers"] == 0 and not config["qk_norm"] and not config["reverse_time"]
    # A training checkpoint of SiT's train.py holds the state dict under "ema", beside its pickled arguments.
    train_ckpt = {"model": {}, "ema": ref.state_dict(), "opt": {}, "args": argparse.Namespace(model="SiT-XL/2")}
    torch.save(train_ckpt, tmp_path / "train.pt")
    out2 = tmp_path / "from-train.pt"
    assert import_weights.cli(["sit", str(tmp_path / "train.pt"), "--out", str(out2)]) == 0
    assert all(torch.equal(v, load_checkpoint(out2)["ema"][k]) for k, v in state["ema"].items())


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("import_weights.py: error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    sd = sit().state_dict()
    save_checkpoint(sd, tmp_path / "sit.pt")

    def run(fmt: str, state: dict | None, *flags: str) -> str:
        path = tmp_path / "in.pt"
        if state is not None:
            save_checkpoint(state, path)
        assert import_weights.cli([fmt, str(path), "--out", str(tmp_path / "o.pt"), *flags]) == 2
        assert not (tmp_path / "o.pt").exists()
        return error_line(capsys)

    assert "predict the noise" in run("dit", sd) and "DDPM" in run("dit", sd)
    assert "unknown format 'ddpm'" in run("ddpm", sd)
    assert "not the sit layout: no -; unknown foo.weight" in run("sit", sd | {"foo.weight": torch.zeros(1)})
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.bias"}
    assert "not the sit layout: no blocks.1.attn.qkv.bias; unknown -" in run("sit", missing)
    assert "no pos_embed" in run("sit", {k: v for k, v in sd.items() if k != "pos_embed"})
    assert "not a sit state dict" in run("sit", {"weight": torch.zeros(2)})
    shifted = sd | {"pos_embed": sd["pos_embed"] + 0.1}
    assert "pos_embed is not the fixed 2-D sin-cos embedding" in run("sit", shifted)
    assert "import it as repa" in run("sit", repa().state_dict())  # REPA's time would be read backwards
    assert "import a SiT checkpoint as sit" in run("repa", sd)
    qk = repa(qk_norm=True).state_dict()
    assert "blocks.0.attn.q_norm.weight" in run("repa", qk)  # timm's LayerNorm qk-norm is not this DiT's
    odd = sit(hidden_size=48, num_heads=3).state_dict()
    assert "hidden size 48" in run("sit", odd) and "--num-heads" in run("sit", odd)
    ours = DiT(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2)
    text = run("sit", {"model_config": ours.config, "model": ours.state_dict(), "ema": ours.state_dict()})
    assert "not a sit state dict in DiT's layout: no pos_embed" in text
    (tmp_path / "in.pt").write_bytes(b"not a checkpoint")
    assert "cannot read" in run("sit", None)
    torch.save({"ema": sd, "args": object()}, tmp_path / "in.pt")  # a pickled object: never loaded
    text = run("sit", None)
    assert "cannot read" in text and "weights_only=False)['ema']" in text
    (tmp_path / "o.pt").write_bytes(b"keep me")
    assert import_weights.cli(["sit", str(tmp_path / "sit.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "exists" in error_line(capsys) and (tmp_path / "o.pt").read_bytes() == b"keep me"


def test_the_script_exits_2_with_one_line(tmp_path):
    save_checkpoint({"weight": torch.zeros(2)}, tmp_path / "x.pt")
    cmd = [
        sys.executable,
        str(ROOT / "import_weights.py"),
        "repa",
        str(tmp_path / "x.pt"),
        "--out",
        str(tmp_path / "o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "not a repa state dict" in result.stderr


def test_sde_protocol_is_sits_sampler(tmp_path):
    ref, n, steps, seed = sit(), 2, 12, 5
    sampler = Sampler.from_checkpoint(imported(tmp_path, "sit", ref.state_dict()), device="cpu")
    y = torch.tensor([3, 7])
    got = sampler.generate(n, y, seed=seed, steps=steps, cfg_scale=1.5, decode=False).images
    # SiT's sample_ddp.py SDE: Euler-Maruyama on [0, 0.96] with its "sigma" diffusion d = 1 - t (noise sqrt(2 d dt),
    # drift v + d s), then its "Mean" last step x + 0.04 drift; v is forward_with_cfg on the doubled batch.
    x = seeded_noise(seed, range(n), (4, 8, 8))
    noise = step_noise(x)
    yy = torch.cat([y, torch.full_like(y, ref.num_classes)])

    def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = ref.forward_with_cfg(torch.cat([x, x]), t.repeat(2 * n), yy, 1.5)[:n]
        return v + (1 - t) * (t * v - x) / (1 - t)

    ts = torch.linspace(0, 0.96, steps)
    with torch.no_grad():
        for t in ts[:-1]:
            x = x + drift(x, t) * (ts[1] - ts[0]) + torch.sqrt(2 * (1 - t) * (ts[1] - ts[0])) * noise()
        x = x + drift(x, ts[-1]) * 0.04
    assert all_close(got, x, 1e-5)


@pytest.mark.usefixtures("offline")
def test_the_vae_is_loaded_only_to_decode(tmp_path):
    out = imported(tmp_path, "sit", sit().state_dict())
    sampler = Sampler.from_checkpoint(out, device="cpu", steps=2)  # no SD-VAE here: the velocity needs none
    x, y = inputs(sit())
    assert sampler.velocity(x, 0.5, y).shape == x.shape
    calls = []
    sampler.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(VAEError, match="stabilityai/sd-vae-ft-ema"):
        sampler.generate(2, [0, 1], seed=0)
    assert not calls  # before any network evaluation
    make_vae(tmp_path / "vae")  # a local copy of a VAE with 4 latent channels decodes the samples
    images = Sampler.from_checkpoint(out, device="cpu", steps=2, vae=str(tmp_path / "vae")).sample(2, [0, 1], seed=0)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
