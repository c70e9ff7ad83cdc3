"""The DiT network: shapes, zero init, parameter and FLOP counts, CFG, registers, the interval input.

Inputs are checked at the boundaries (tests/test_sampler.py, tests/test_train.py), not by the network."""

import math

import pytest
import torch
from stand_ins import all_close, close

from models.cost import count_params, forward_macs
from models.dit import DiT, DiT_models, get_2d_sincos_pos_embed, modulate


def tiny(**kwargs) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    args.update(kwargs)
    return DiT(**args)


def randomize(model: DiT, seed: int = 0) -> DiT:
    """Give every parameter non-zero values so outputs depend on all inputs (init zeroes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(n=4, c=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, size, size, generator=g),
        torch.rand(n, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_every_registry_entry_builds_and_outputs_zero_at_init(name):
    # Shrink depth and width so the XL entries stay cheap; the patch size comes from the name.
    model = DiT_models[name](input_size=16, in_channels=3, num_classes=10, depth=1, hidden_size=64, num_heads=4)
    x, t, y = inputs(size=16)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: the untrained network is exactly 0


def test_full_size_model_outputs_exactly_zero_at_init():
    model = DiT_models["DiT-S/2"](input_size=32, in_channels=3, num_classes=10)
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 7]))
    assert out.shape == (2, 3, 32, 32) and torch.count_nonzero(out) == 0


def test_dit_s2_parameter_count_matches_paper():
    model = DiT_models["DiT-S/2"](input_size=32, in_channels=3, num_classes=10)
    assert abs(count_params(model) - 33e6) < 1e6


@pytest.mark.parametrize(
    "name, gmacs", [("DiT-S/2", 6.06), ("DiT-S/8", 0.36), ("DiT-B/4", 5.56), ("DiT-L/2", 80.71), ("DiT-XL/2", 118.64)]
)
def test_forward_macs_match_dit_paper_table(name, gmacs):
    # Table 4 of the DiT paper: 256 tokens of a 32x32x4 latent, no registers (printed to 2 decimals).
    with torch.device("meta"):  # no memory for the weights: only the shapes matter
        model = DiT_models[name](input_size=32, in_channels=4, num_classes=1000, num_registers=0)
    assert forward_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.005, abs=0.005)


def test_modulate_is_shift_plus_scaled_input():
    x, shift, scale = torch.randn(2, 5, 3), torch.randn(2, 3), torch.randn(2, 3)
    expected = x * (1 + scale[:, None]) + shift[:, None]
    assert torch.allclose(modulate(x, shift, scale), expected)


def test_final_layer_applies_shift_and_scale_in_the_right_order():
    model = randomize(tiny(num_registers=0, depth=1))
    final = model.final_layer
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    shift, scale = final.adaLN_modulation(c).chunk(2, dim=1)
    normed = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
    expected = final.linear(normed * (1 + scale[:, None]) + shift[:, None])
    assert all_close(final(x, c), expected)


def test_pos_embed_is_fixed_sincos():
    emb = get_2d_sincos_pos_embed(8, 4)
    assert emb.shape == (16, 8)
    assert emb[0, 0] == 0.0 and emb[0, 2] == 1.0  # sin(0) and cos(0) at the origin
    model = tiny()
    assert "pos_embed" not in model.state_dict() and not model.pos_embed.requires_grad


def batch_sizes(model: DiT) -> list[int]:
    """The batch size of every forward pass of model from now on (a hook on the patch embedding)."""
    sizes: list[int] = []
    model.x_embedder.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes


def test_cfg_scale_one_runs_the_conditional_pass_alone_and_matches_the_formula():
    model = randomize(tiny())
    x, t, y = inputs()
    both = model(torch.cat([x, x]), t.repeat(2), y.repeat(2), drop_mask=torch.arange(8) >= 4)  # one pass of 2N
    v_cond, v_uncond = both.chunk(2)
    sizes = batch_sizes(model)
    out = model.forward_with_cfg(x, t, y, 1.0)
    assert sizes == [4]  # the shortcut: N, not the 2N of a guided pass
    assert all_close(out, v_uncond + 1.0 * (v_cond - v_uncond))
    model.forward_with_cfg(x, t, y, 2.0)
    assert sizes == [4, 8]


def test_cfg_scale_zero_ignores_labels():
    model = randomize(tiny())
    x, t, y = inputs()
    a = model.forward_with_cfg(x, t, y, 0.0)
    b = model.forward_with_cfg(x, t, (y + 3) % 10, 0.0)
    assert all_close(a, b)
    assert not torch.allclose(model(x, t, y), model(x, t, (y + 3) % 10))


def test_cfg_matches_formula_from_two_separate_passes():
    model = randomize(tiny())
    x, t, y = inputs()
    v_cond = model(x, t, y)
    v_uncond = model(x, t, y, drop_mask=torch.ones(4, dtype=torch.bool))  # every label the null class
    for w in (0.5, 2.5, 4.0):
        expected = v_uncond + w * (v_cond - v_uncond)
        assert all_close(model.forward_with_cfg(x, t, y, w), expected)


def test_batched_and_scalar_t_agree():
    model = randomize(tiny())
    x, _, y = inputs()
    for scalar in (0.3, torch.tensor(0.3)):
        assert torch.allclose(model(x, scalar, y), model(x, torch.full((4,), 0.3), y))
        assert torch.allclose(
            model.forward_with_cfg(x, scalar, y, 2.0), model.forward_with_cfg(x, torch.full((4,), 0.3), y, 2.0)
        )


def test_registers_are_used_and_never_in_output():
    model = randomize(tiny(num_registers=4))
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    with torch.no_grad():
        model.registers.add_(1.0)
    assert not torch.allclose(model(x, t, y), out)


def test_zero_registers():
    model = randomize(tiny(num_registers=0))
    assert model.registers is None
    x, t, y = inputs()
    assert model(x, t, y).shape == x.shape


def test_unconditional_model():
    model = randomize(tiny(num_classes=0))
    assert model.y_embedder is None
    x, t, _ = inputs()
    assert model(x, t).shape == x.shape
    with pytest.raises(ValueError, match="class-conditional"):
        model.forward_with_cfg(x, t, torch.zeros(4, dtype=torch.long), 2.0)


def test_label_dropout_only_in_train_mode():
    model = randomize(tiny(class_dropout_prob=0.5))
    x, t, y = inputs(n=64)
    x, t = x[:1].expand(64, -1, -1, -1), t[:1].expand(64)
    y = torch.full((64,), 3)
    eval_out = model(x, t, y)
    assert all_close(eval_out, eval_out[:1].expand_as(eval_out))  # same input, same output (up to batch kernels)
    model.train()
    torch.manual_seed(0)
    train_out = model(x, t, y)
    null_out = model(x[:1], t[:1], y[:1], drop_mask=torch.tensor([True]))  # exactly the null class
    # A batch of 64 and a batch of 1 run different kernels: compare at the scale of the outputs.
    dropped = close(train_out, null_out.expand_as(train_out)).flatten(1).all(1)
    kept = close(train_out, eval_out).flatten(1).all(1)
    assert (dropped | kept).all() and 10 < dropped.sum() < 54  # about half replaced by the null class
    model.eval()
    assert all_close(model.forward_with_cfg(x, t, y, 1.0), eval_out)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(hidden_size=30, num_heads=4)
    with pytest.raises(TypeError):
        DiT_models["DiT-S/2"](input_sise=32)  # a misspelled keyword is rejected, not swallowed


def test_config_rebuilds_the_same_network():
    model = randomize(tiny())
    clone = DiT(**model.config)
    clone.load_state_dict(model.state_dict())
    x, t, y = inputs()
    assert torch.equal(clone.eval()(x, t, y), model(x, t, y))


def test_qk_norm_is_rmsnorm_of_each_heads_queries_and_keys():
    from models.dit import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4)
    with torch.no_grad():
        attn.q_norm.weight.normal_(), attn.k_norm.weight.normal_()
    x = torch.randn(3, 10, 32)
    qkv = attn.qkv(x).view(3, 10, 3, 4, 8)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.nn.functional.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v)
    expected = attn.proj(o.transpose(1, 2).reshape(3, 10, 32))
    assert all_close(attn(x), expected)
    attn.qk_norm = False  # the same weights without the norm: another result
    assert not all_close(attn(x), expected, rel=1e-2)


# ------------------------------------------------------------------ average velocity: the interval input


def test_flow_model_is_unchanged_by_the_average_velocity_option():
    model = tiny()
    assert model.config["average_velocity"] is False and model.h_embedder is None
    assert not any(k.startswith("h_embedder") for k in model.state_dict())
    assert model.t_embedder.time_scale == 1000.0  # DiT's integer-timestep range, as before
    # The time embedding is the sinusoid of t * 1000 in float32 through the MLP, as it always was.
    t = torch.rand(4)
    emb = model.t_embedder
    half = emb.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t * 1000.0)[:, None] * freqs[None]
    expected = emb.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    assert torch.equal(emb(t), expected)


def test_average_velocity_model_outputs_zero_at_init_and_rebuilds_from_its_config():
    model = tiny(average_velocity=True, time_scale=1.0)
    x, t, y = inputs()
    out = model(x, t, y, interval=torch.rand(4))
    assert torch.equal(out, torch.zeros_like(out))
    assert model.config["average_velocity"] is True and model.h_embedder is not None
    assert model.t_embedder.time_scale == 1.0 and model.h_embedder.time_scale == 1.0
    assert count_params(model) - count_params(tiny()) == count_params(model.h_embedder)
    assert forward_macs(model) - forward_macs(tiny()) == 256 * 32 + 32 * 32  # the interval MLP
    model = randomize(model)
    clone = DiT(**model.config)
    clone.load_state_dict(model.state_dict())
    h = torch.rand(4)
    assert torch.equal(clone.eval()(x, t, y, interval=h), model(x, t, y, interval=h))


def test_interval_conditions_the_output():
    model = randomize(tiny(average_velocity=True, time_scale=1.0))
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), model(x, t, y, interval=0.0))  # None means 0: the instantaneous velocity
    assert torch.equal(model(x, t, y, interval=0.25), model(x, t, y, interval=torch.full((4,), 0.25)))
    assert not all_close(model(x, t, y, interval=0.5), model(x, t, y), rel=1e-3)


def test_cfg_matches_formula_with_an_interval():
    model = randomize(tiny(average_velocity=True, time_scale=1.0))
    x, t, y = inputs()
    h = torch.rand(4)
    u_cond = model(x, t, y, interval=h)
    u_uncond = model(x, t, y, interval=h, drop_mask=torch.ones(4, dtype=torch.bool))
    assert all_close(model.forward_with_cfg(x, t, y, 1.0, interval=h), u_cond)
    assert all_close(model.forward_with_cfg(x, t, y, 3.0, interval=h), u_uncond + 3.0 * (u_cond - u_uncond))
    assert all_close(
        model.forward_with_cfg(x, t, y, 3.0, interval=0.3),
        model.forward_with_cfg(x, t, y, 3.0, interval=torch.full((4,), 0.3)),
    )


@pytest.mark.parametrize("train", [True, False])
def test_drop_mask_replaces_exactly_those_labels_by_the_null_class(train):
    model = randomize(tiny(class_dropout_prob=0.5))
    x, t, y = inputs(n=8)
    mask = torch.tensor([True, False, False, True, False, True, False, False])
    null = model(x, t, torch.full_like(y, 10))  # label index 10: the null class
    cond = model(x, t, y)
    model.train(train)
    out = model(x, t, y, drop_mask=mask)  # in train mode: no random dropout on top
    assert all_close(out[mask], null[mask]) and all_close(out[~mask], cond[~mask])
    assert all_close(model(x, t, y, drop_mask=torch.zeros(8, dtype=torch.bool)), cond)


def test_label_drop_mask_is_the_dropout_a_forward_in_that_mode_draws():
    model = randomize(tiny(class_dropout_prob=0.5)).train()
    x, t, y = inputs(n=16)
    torch.manual_seed(0)
    own = model(x, t, y)
    torch.manual_seed(0)
    mask = model.label_drop_mask(y)
    assert 0 < mask.sum() < 16 and torch.equal(model(x, t, y, drop_mask=mask), own)
    assert not model.eval().label_drop_mask(y).any() and not tiny(class_dropout_prob=0.0).label_drop_mask(y).any()


def test_float64_network_embeds_time_in_float64():
    model = randomize(tiny(average_velocity=True, time_scale=1.0)).double()
    x, t, y = inputs()
    x, t = x.double(), t.double()
    # A time step far below float32 resolution still moves a float64 network's output.
    assert not torch.equal(model(x, t + 1e-12, y, interval=0.1), model(x, t, y, interval=0.1))


def test_checkpoints_of_the_old_interval_option_rebuild_the_same_network():
    from models import model_from_config

    model = randomize(tiny(average_velocity=True, time_scale=1.0))
    old = {k: v for k, v in model.config.items() if k not in ("average_velocity", "time_scale")} | {"mean_flow": True}
    clone = model_from_config(old)
    clone.load_state_dict(model.state_dict())
    x, t, y = inputs()
    assert clone.config == model.config and torch.equal(
        clone.eval()(x, t, y, interval=0.3), model(x, t, y, interval=0.3)
    )
