"""LightningDiT's and JiT's blocks (models/blocks.py), the velocity-direction loss and train.py's --recipe:
known answers (RoPE depends on offsets only, parameter counts, the cosine loss at 0 and 2), the in-context tokens
never reaching the output, and every recipe's network starting at zero, resuming exactly and sampling."""

import dataclasses

import pytest
import torch
from test_train import assert_same, tiny, weights
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from models import DiT, ModelConfig, build_model, count_params, model_from_config
from models.blocks import MLPS, NORMS, SwiGLU, apply_rope, rope_angles, rope_tables, swiglu_width
from objectives.flow import FlowMatching, cosine_loss
from sampling import Sampler
from training.config import RECIPES
from utils.config import ConfigError, build_parser

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LIGHTNING = dict(mlp_type="swiglu", norm_type="rmsnorm", rope=True, class_tokens=3)


def small_dit(**kw) -> DiT:
    """A DiT on 8x8 gray images (16 patches, 2 registers) with every weight moved off its initial value."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_registers=2, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return model.eval()


def test_rope_scores_depend_only_on_the_offset_between_positions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 16, generator=g, dtype=torch.float64).unbind(0)  # (H, T, Dh) each
    pos = torch.randint(0, 8, (10, 2), generator=g)

    def scores(positions):
        angles = rope_angles(positions, 16)
        return apply_rope(q, angles.cos(), angles.sin()) @ apply_rope(k, angles.cos(), angles.sin()).transpose(-1, -2)

    shifted = scores(pos + torch.tensor([3, -5]))
    assert torch.allclose(scores(pos), shifted, atol=1e-12)
    assert not torch.allclose(scores(pos), q @ k.transpose(-1, -2), atol=1e-3)  # the rotation does something
    assert not torch.allclose(scores(pos), scores(pos.flip(1)), atol=1e-3)  # rows and columns are told apart
    angles = rope_angles(pos, 16)  # a rotation: norms unchanged
    assert torch.allclose(apply_rope(q, angles.cos(), angles.sin()).norm(dim=-1), q.norm(dim=-1))


def test_rope_leaves_registers_and_class_tokens_unrotated():
    cos, sin = rope_tables(grid_size=4, head_dim=8, num_prefix=3)
    assert cos.shape == sin.shape == (3 + 16, 4)
    assert (cos[:3] == 1).all() and (sin[:3] == 0).all() and (cos[3] == 1).all()  # patch (0, 0) is unrotated too
    x = torch.randn(1, 1, 19, 8)
    assert torch.equal(apply_rope(x, cos, sin)[:, :, :3], x[:, :, :3])
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles(torch.zeros(1, 2), 6)


def test_swiglu_has_the_gelu_mlps_weights_at_two_thirds_width():
    assert swiglu_width(1536) == 1024 and swiglu_width(512) == 344  # 2/3 of 4 x 384, and of 4 x 128 rounded to 8
    mlp = SwiGLU(384, 1536)
    assert count_params(mlp) == 384 * 2048 + 2048 + 1024 * 384 + 384
    assert mlp.w12.weight.numel() + mlp.w3.weight.numel() == 2 * 384 * 1536  # the GELU MLP's weights exactly
    gelu, swiglu = DiT(mlp_type="gelu"), DiT(mlp_type="swiglu")  # DiT-S/2: within 0.1%
    assert abs(count_params(swiglu) / count_params(gelu) - 1) < 1e-3
    x = torch.randn(2, 5, 384)
    gate, value = mlp.w12(x).chunk(2, dim=-1)
    assert torch.allclose(mlp(x), mlp.w3(torch.nn.functional.silu(gate) * value))


def test_rmsnorm_has_no_parameters_and_unit_root_mean_square():
    norm = NORMS["rmsnorm"](64)
    assert count_params(norm) == 0 and count_params(DiT(norm_type="rmsnorm")) == count_params(DiT())
    x = torch.randn(3, 7, 64) + 2.0
    assert torch.allclose(norm(x).square().mean(-1), torch.ones(3, 7), atol=1e-4)
    assert not torch.allclose(norm(x), NORMS["layernorm"](64)(x), atol=1e-2)  # no mean subtracted


def test_a_block_registered_in_one_file_is_a_flag_choice_and_builds(monkeypatch):
    class ReluMlp(torch.nn.Sequential):
        def __init__(self, dim, hidden_dim):
            super().__init__(torch.nn.Linear(dim, hidden_dim), torch.nn.ReLU(), torch.nn.Linear(hidden_dim, dim))

    monkeypatch.setitem(MLPS, "relu", ReluMlp)
    monkeypatch.setitem(NORMS, "identity", lambda dim: torch.nn.Identity())
    args = build_parser(ModelConfig, "test", "").parse_args(["--mlp", "relu", "--norm", "identity"])
    model = build_model(ModelConfig(**vars(args)), input_size=8, in_channels=1, num_classes=10)
    assert isinstance(model.blocks[0].mlp, ReluMlp) and isinstance(model.final_layer.norm_final, torch.nn.Identity)
    assert model.blocks[0].mlp[0].out_features == 4 * model.hidden_size
    with pytest.raises(ConfigError, match="unknown mlp 'tanh'; choose from gelu, swiglu, relu"):
        ModelConfig(mlp="tanh")


def test_cosine_loss_is_zero_aligned_one_orthogonal_two_opposite():
    v = torch.randn(4, 64)
    assert torch.allclose(cosine_loss(3 * v, v), torch.zeros(4), atol=1e-6)
    assert torch.allclose(cosine_loss(-0.5 * v, v), torch.full((4,), 2.0), atol=1e-6)
    e = torch.eye(2)
    assert torch.allclose(cosine_loss(e, e.flip(0)), torch.ones(2))


def test_flow_loss_adds_the_weighted_cosine_loss_and_logs_the_squared_error():
    x1, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    model = small_dit()
    torch.manual_seed(1)
    plain = FlowMatching().loss(model, x1, y)
    torch.manual_seed(1)
    terms = FlowMatching(cosine_loss_weight=0.5).loss(model, x1, y)
    torch.manual_seed(1)
    t, xt, ut, _ = FlowMatching().sample_path(x1, y)
    cos = cosine_loss(model(xt, t, y).flatten(1), ut.flatten(1)).mean()
    assert torch.equal(plain.mse, terms.mse) and torch.allclose(terms.loss, plain.loss + 0.5 * cos)


def test_class_tokens_condition_the_output_and_are_dropped_before_the_final_layer():
    model = small_dit(class_tokens=3, rope=True)
    seen = []
    model.final_layer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.randint(0, 10, (5,))
    out = model(x, t, y)
    assert out.shape == x.shape and seen == [(5, 16, 32)]  # 3 class tokens + 2 registers + 16 patches in; 16 out
    with torch.no_grad():
        model.class_token_embed.add_(torch.randn_like(model.class_token_embed))
    assert not torch.allclose(model(x, t, y), out, atol=1e-4)  # the tokens are read by the patches
    with pytest.raises(ValueError, match="unconditional"):
        DiT(num_classes=0, class_tokens=2)


def test_new_blocks_keep_the_cfg_formula_and_a_forward_mode_jvp():
    model = small_dit(**LIGHTNING, average_velocity=True, time_scale=1.0).double()  # MeanFlow's network
    x, t, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.tensor([1, 4, 7])
    v = model.forward_with_cfg(x, t, y, 2.5)
    v_c, v_u = model.forward_with_cfg(x, t, y, 1.0), model.forward_with_cfg(x, t, y, 0.0)
    assert torch.allclose(v, v_u + 2.5 * (v_c - v_u))
    # MeanFlow's total derivative: torch.func.jvp through RoPE equals a central difference.
    dx, h = torch.randn_like(x), torch.full((3,), 0.2, dtype=torch.float64)
    f = lambda x, t: model(x, t, y, interval=h)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):  # the attention kernel with a forward derivative, as MeanFlow runs it
        _, tangent = torch.func.jvp(f, (x, t), (dx, torch.ones_like(t)))
    eps = 1e-5
    diff = (f(x + eps * dx, t + eps) - f(x - eps * dx, t - eps)) / (2 * eps)
    assert torch.allclose(tangent, diff, atol=1e-6)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_network_starts_at_exactly_zero_and_samples(tmp_path, recipe):
    cfg = train.resolve(tiny(tmp_path / "run", recipe=recipe, steps=2, ckpt_every=0), torch.device("cpu"))
    assert all(getattr(cfg, k) == v for k, v in RECIPES[recipe].items() if hasattr(cfg, k))
    model = train.build_model(cfg, 8, 1, 10)
    out = model(torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 10, (4,)))
    assert torch.equal(out, torch.zeros_like(out))
    result = train.main(dataclasses.replace(cfg, out=str(tmp_path / "run")))
    sampler = Sampler.from_checkpoint(result["checkpoint"], device="cpu")
    recorded = {k: getattr(sampler.model, k) for k in ("mlp_type", "norm_type", "rope", "class_tokens")}
    assert recorded == dict(mlp_type=cfg.mlp, norm_type=cfg.norm, rope=cfg.rope, class_tokens=cfg.class_tokens)
    images = sampler.generate(4, torch.arange(4), steps=2).images
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_lightning_resumes_bit_exactly_and_refuses_another_recipe(tmp_path):
    run = lambda out, **kw: train.main(tiny(tmp_path / out, **{"recipe": "lightning", "steps": 8, **kw}))  # noqa: E731
    run("full")
    run("split", steps=4)
    run("split", resume="yes", recipe=None)  # a plain --resume: the settings that define the weights are the run's
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "split/checkpoints/last.pt"))
    same_model = dict(mlp="swiglu", norm="rmsnorm", rope=True, class_tokens=0)
    with pytest.raises(ConfigError, match="--recipe lightning -> dit"):
        train.main(tiny(tmp_path / "split", recipe="dit", steps=12, resume="yes", **same_model))
    with pytest.raises(ConfigError, match="--mlp 'swiglu' -> 'gelu'"):  # refusals name the flags
        train.main(tiny(tmp_path / "split", recipe=None, mlp="gelu", steps=12, resume="yes"))
    run("norope", steps=4, rope=False)  # a flag given against the recipe is kept on a plain resume too
    assert train.main(tiny(tmp_path / "norope", recipe=None, steps=6, resume="yes"))["model"].rope is False


def test_explicit_flags_override_the_recipe():
    cfg = train.resolve(
        train.parse_args(["--recipe", "lightning", "--no-rope", "--cosine-loss-weight", "0", "--adam-beta2", "0.99"]),
        torch.device("cpu"),
    )
    assert (cfg.mlp, cfg.norm, cfg.rope, cfg.class_tokens, cfg.adam_beta2) == ("swiglu", "rmsnorm", False, 0, 0.99)
    assert cfg.objective_args["cosine_loss_weight"] == 0
    meanflow = train.resolve(
        train.parse_args(["--recipe", "lightning", "--objective", "meanflow"]), torch.device("cpu")
    )
    assert "cosine_loss_weight" not in meanflow.objective_args and meanflow.mlp == "swiglu"  # flow's loss only


def test_a_model_config_without_the_new_arguments_builds_todays_dit():
    old = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2)
    config = {k: v for k, v in old.config.items() if k not in ("mlp_type", "norm_type", "rope", "class_tokens")}
    rebuilt = model_from_config(config)
    rebuilt.load_state_dict(old.state_dict())  # the same parameter names and shapes
    assert rebuilt.config == old.config
