"""REPA (objectives/repa.py, models/encoder.py, --repa-*): the alignment loss and grid matching on known cases, a
frozen encoder and a learning projector, bit-exact resume, weight 0 = no flags, one-line errors, learning on digits."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_train import (
    assert_one_error_line,
    assert_same,
    cli_args,
    learning_run,
    run_cli,
    sample_accuracy,
    tiny,
    weights,
)

import train
from models import DiT, model_from_checkpoint
from objectives.flow import FlowMatching
from objectives.repa import RepresentationAlignment, alignment_loss, match_grid
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class PatchTokens(nn.Module):
    """A fixed digits encoder: stride x stride patches of an 8x8 image -> tokens (B, (8 / stride)^2, 12)."""

    def __init__(self, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(1, 12, stride, stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(images)).flatten(2).transpose(1, 2)


def export(tmp_path: Path, module: nn.Module | None = None, name: str = "encoder.pt2") -> Path:
    """module (default PatchTokens) saved as a torch.export program with a dynamic batch dimension."""
    torch.manual_seed(0)
    module = (module or PatchTokens()).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (torch.rand(3, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / name)
    return tmp_path / name


def repa(tmp_path: Path, out: str, **overrides):
    """tiny() with REPA on, aligning the one block's tokens with the exported encoder."""
    encoder = tmp_path / "encoder.pt2" if (tmp_path / "encoder.pt2").exists() else export(tmp_path)
    settings = dict(repa_weight=0.5, repa_encoder=str(encoder), repa_projector_dim=16) | overrides
    return tiny(tmp_path / out, **settings)


def test_alignment_loss_is_minus_one_for_aligned_tokens_and_zero_for_orthogonal_ones():
    torch.manual_seed(0)
    target = torch.randn(3, 5, 7)
    scales = torch.rand(3, 5, 1) * 10 + 0.1  # aligned up to a positive scale per token
    assert alignment_loss(target * scales, target).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss(-target, target).item() == pytest.approx(1.0, abs=1e-6)
    e = torch.eye(7)
    assert alignment_loss(e[:3].expand(2, 3, 7), e[3:6].expand(2, 3, 7)).item() == pytest.approx(0.0, abs=1e-7)
    # A vector target (B, D) aligns with the mean of the projected tokens.
    vector = torch.randn(4, 7)
    tokens = vector[:, None] * 2 + torch.tensor([1.0, -1.0])[None, :, None] * torch.randn(4, 1, 7)  # mean = 2 vector
    assert alignment_loss(tokens, vector).item() == pytest.approx(-1.0, abs=1e-6)
    # Normalised in float32: half-precision tokens of a large norm give no inf or nan.
    assert alignment_loss((target * 1e4).half(), target.half()).item() == pytest.approx(-1.0, abs=1e-3)


def test_token_grids_are_matched_by_block_means_and_bilinear_growth():
    torch.manual_seed(0)
    fine = torch.randn(2, 64, 5)  # an 8 x 8 grid, row-major
    coarse = match_grid(fine, 4)
    blocks = fine.view(2, 4, 2, 4, 2, 5).mean((2, 4)).reshape(2, 16, 5)  # each 2 x 2 block's mean
    torch.testing.assert_close(coarse, blocks)
    assert match_grid(fine, 8) is fine
    grown = match_grid(torch.arange(4.0).view(1, 4, 1), 4).view(
        4, 4
    )  # bilinear (half-pixel centres) of [[0, 1], [2, 3]]
    torch.testing.assert_close(grown[0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(grown[:, 0], torch.tensor([0.0, 0.5, 1.5, 2.0]))
    with pytest.raises(ValueError, match="5 tokens, not a square grid"):
        match_grid(torch.zeros(1, 5, 3), 4)


def test_the_encoder_gets_no_gradient_and_the_projector_learns():
    torch.manual_seed(0)
    encoder = PatchTokens().requires_grad_(False)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    aligned = DiT(**{**net.config, "repa_depth": 1, "repa_dim": 12, "repa_projector_dim": 16})
    for k, v in net.state_dict().items():  # the projector is built last: the network's own weights are the same
        assert torch.equal(v, aligned.state_dict()[k]), k
    objective = RepresentationAlignment(FlowMatching(), encoder, 0.5, grid=4)
    opt = torch.optim.AdamW(aligned.parameters(), lr=1e-2)
    x, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    terms = objective.loss(aligned, x, y, images=(x + 1) / 2)
    terms.loss.backward()
    assert -1 <= terms.align.item() <= 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligned.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    projector = [p.clone() for p in aligned.projector.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(projector, aligned.projector.parameters(), strict=True))
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    # Sampling never calls the projector: the plain forward is the network's velocity alone.
    aligned.eval()
    out, tokens = aligned(x, 0.5, y, align=True)
    assert tokens.shape == (8, 16, 12) and torch.equal(out, aligned(x, 0.5, y))


def test_defaults_are_repas_settings_scaled_to_the_network():
    from training.config import repa_defaults

    def scaled(model, **sizes):
        settings = repa_defaults(train.TrainConfig(model=model, **sizes))
        return settings["repa_depth"], settings["repa_projector_dim"]

    assert scaled("DiT-XL/2") == (8, 2048) and scaled("DiT-L/2") == (8, 2048)  # REPA's SiT-XL/2 and SiT-L/2
    assert scaled("DiT-B/2") == (4, 2048) and scaled("DiT-S/2") == (4, 2048)  # REPA's SiT-B/2: block 4
    assert scaled("DiT-XS/2", hidden_size=128, depth=4) == (2, 256) and scaled("DiT-XS/2", depth=1) == (1, 64)


def test_a_repa_run_resumes_bit_exactly_across_the_end_of_the_alignment(tmp_path):
    full = train.main(repa(tmp_path, "full", repa_until=5))
    train.main(repa(tmp_path, "split", repa_until=5, steps=6))
    train.main(repa(tmp_path, "split", repa_until=5, resume="yes"))
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "split/checkpoints/last.pt"))
    state = load_checkpoint(full["checkpoint"])
    assert any(k.startswith("projector.") for k in state["model"])
    assert state["config"]["repa_depth"] == 1 and state["model_config"]["repa_dim"] == 12
    model_from_checkpoint(full["checkpoint"])  # a REPA checkpoint samples like any other


def test_weight_zero_is_bit_identical_to_a_run_without_the_flags(tmp_path):
    train.main(tiny(tmp_path / "plain", steps=6))
    train.main(repa(tmp_path, "zero", repa_weight=0.0, steps=6))
    assert_same(weights(tmp_path / "plain/checkpoints/last.pt"), weights(tmp_path / "zero/checkpoints/last.pt"))


def test_a_plain_resume_keeps_the_alignment(tmp_path, capsys):
    train.main(repa(tmp_path, "run", steps=4))
    resumed = tiny(tmp_path / "run", steps=6, resume="yes")  # no --repa-* flags: the checkpoint's
    assert train.main(resumed)["step"] == 6
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["config"]["repa_weight"] == 0.5


def test_bad_encoders_are_one_line_errors_before_anything_is_written(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("It looks like there is no internet connection and the repo could not be found")

    monkeypatch.setattr(torch.hub, "load", offline)
    args = cli_args(repa(tmp_path, "out", repa_encoder="dinov2_vits14"))
    code, err = run_cli(args, capsys)
    assert_one_error_line(code, err, "--repa-encoder dinov2_vits14 could not be loaded (RuntimeError: It looks")
    assert "torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14')" in err
    code, err = run_cli(cli_args(repa(tmp_path, "out", repa_encoder=str(tmp_path / "none.pt2"))), capsys)
    assert_one_error_line(code, err, "none.pt2: no such file")
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    code, err = run_cli(cli_args(repa(tmp_path, "out", repa_encoder=str(tmp_path / "junk.pt2"))), capsys)
    assert_one_error_line(code, err, "junk.pt2 is not a torch.export program")
    odd = export(tmp_path, nn.Flatten(1, 2), "odd.pt2")  # (B, 8, 8): 8 tokens
    code, err = run_cli(cli_args(repa(tmp_path, "out", repa_encoder=str(odd))), capsys)
    assert_one_error_line(code, err, "on 1-channel 8px images", "not a square grid")
    code, err = run_cli([*cli_args(repa(tmp_path, "out")), "--objective", "meanflow"], capsys)
    assert_one_error_line(code, err, "--repa-weight needs --objective flow")
    code, err = run_cli([*cli_args(repa(tmp_path, "out")), "--repa-depth", "3"], capsys)
    assert_one_error_line(code, err, "repa_depth must be in [1, depth 1]")
    assert not (tmp_path / "out").exists()


def test_digits_run_with_an_exported_encoder_aligns_and_learns(tmp_path):
    """An encoder on a 2x finer grid (8 x 8 tokens, matched to the DiT's 4 x 4) aligns, and the run learns (a
    vector encoder (B, D): tests/test_latent_images.py)."""
    fine = export(tmp_path, PatchTokens(stride=1), "fine.pt2")
    result = train.main(learning_run(tmp_path / "run", steps=300, repa_weight=0.5, repa_encoder=str(fine)))
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    align = [row["train/repa_loss"] for row in logged]
    assert align[-1] < -0.9 < align[0], align  # from about 0 to aligned
    accuracy = sample_accuracy(result["checkpoint"])
    assert accuracy > 0.7, accuracy


def test_pretrained_vits_see_normalised_rgb_at_the_dit_grid_and_give_patch_tokens_only():
    """A timm ViT (random weights: nothing is downloaded) and a stand-in of DINOv2's hub model, on gray 8x8 images."""
    import timm

    from models.encoder import PretrainedViT

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    encoder = PretrainedViT(vit, grid=4)  # 4 x 16 = 64 px
    images = torch.rand(2, 1, 8, 8)
    tokens = encoder(images)
    assert encoder.size == 64 and tokens.shape == (2, 16, 192)  # the class token dropped
    rgb = torch.nn.functional.interpolate(images.expand(-1, 3, -1, -1), size=64, mode="bicubic")
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(tokens, vit.forward_features((rgb - mean) / std.view(1, 3, 1, 1))[:, 1:])

    class HubStandIn(nn.Module):  # DINOv2's own code: patch_size, a dict of features
        patch_size = 14

        def forward_features(self, x):
            self.seen = x
            return {"x_norm_patchtokens": x[:, :, :4, :4].flatten(2).transpose(1, 2)}

    hub = HubStandIn()
    out = PretrainedViT(hub, grid=16)(torch.rand(3, 3, 32, 32))
    assert hub.seen.shape == (3, 3, 224, 224) and out.shape == (3, 16, 3)  # REPA's 224 px for a 16 x 16 grid
