"""The improved MeanFlow objective: the re-parameterised velocity on a closed-form Gaussian flow, the tangent, the
guided target, guidance as a network input in the Sampler, a short digits run sampled in one step, an exact resume
and bad inputs."""

import pytest
import torch
from stand_ins import all_close
from test_meanflow import GaussianMeanVelocity, dit_inputs, gaussian_case
from test_train import assert_same, tiny, weights

import sampler as sampler_cli
import train
from models.config import model_from_config
from models.dit import DiT
from objectives.imf import ImprovedMeanFlow, guided_target
from objectives.meanflow import Conditioning
from sampling.sampler import Sampler
from utils.checkpoint import load_checkpoint

UNGUIDED = dict(imf_guidance_max=1.0)


def guided_dit(dtype=torch.float64, **kwargs) -> DiT:
    """A small DiT with random weights everywhere (the output layers too), with iMF's network options."""
    args = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    model = DiT(**{**args, **ImprovedMeanFlow().network_options(), **kwargs})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.to(dtype).eval()


def test_exact_average_velocity_gives_the_marginal_velocity_and_wrong_models_do_not():
    model, x, s, t = gaussian_case()
    imf = ImprovedMeanFlow(**UNGUIDED)
    assert torch.equal(imf.velocity(model, x, s), model.velocity(x, s))  # the tangent: u at a zero interval
    residual = imf.velocity_estimate(model, x, s, t) - model.velocity(x, s)
    assert residual.abs().max() < 1e-12  # float64: ~1e-16

    class Wrong(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x_, t_, y=None, interval=None):
            return self.f(x_, t_, interval)

    wrongs = [
        lambda x_, s_, h: model.velocity(x_, s_),  # a flow model taken for an average-velocity one
        lambda x_, s_, h: model(x_, s_, interval=h) + 0.1 * h.reshape(-1, 1, 1, 1),  # right at h = 0 only
        lambda x_, s_, h: model(x_, s_ + h, interval=-h),  # the average velocity read from the other end
        lambda x_, s_, h: GaussianMeanVelocity(model.mu, 0.5, input_size=4)(x_, s_, interval=h),  # another flow's
    ]
    jumps = t > s
    for f in wrongs:
        residual = (imf.velocity_estimate(Wrong(f), x, s, t) - model.velocity(x, s)).flatten(1).abs().amax(1)
        assert residual[jumps].min() > 1e-3
    # Only the last is wrong at s = t too: there V is u(x, s, s), the flow-matching term.
    assert residual[~jumps].min() > 1e-3


def test_the_tangent_is_the_networks_own_velocity_with_the_rows_conditioning():
    model = guided_dit()
    x, s, t, v, y = dit_inputs()
    w = torch.tensor([1.0, 2.0, 3.5, 8.0, 1.0, 5.0], dtype=torch.float64)
    drop = torch.tensor([False, False, True, False, False, False])
    imf, cond = ImprovedMeanFlow(), Conditioning(y, drop, w)
    tangent = imf.velocity(model, x, s, cond)
    assert torch.equal(tangent, model(x, s, y, interval=torch.zeros_like(s), drop_mask=drop, guidance=w))
    est = imf.velocity_estimate(model, x, s, t, cond)
    eps, e = 1e-5, 1e-5 * torch.ones_like(s)

    def u(a, ds):
        return model(x + a * tangent, s + ds, y, interval=t - s - ds, drop_mask=drop, guidance=w)

    fd = (u(eps, e) - u(-eps, -e)) / (2 * eps)  # d/ds u along (tangent, 1, 0)
    assert all_close(est, u(0, 0) - (t - s).reshape(-1, 1, 1, 1) * fd, rel=1e-7)
    # Not the per-sample velocity: with x1 - x0 as the tangent the estimate would differ.
    duds_v = imf.total_derivative(model, x, s, t, v, cond)
    assert not all_close(est, u(0, 0) - (t - s).reshape(-1, 1, 1, 1) * duds_v, rel=1e-3)


def test_guided_target_is_its_formula_and_plain_at_scale_one():
    g = torch.Generator().manual_seed(0)
    v, v_c, v_u = (torch.randn(4, 1, 8, 8, generator=g) for _ in range(3))
    w = torch.tensor([1.0, 2.0, 4.0, 7.5])
    out = guided_target(v, v_c, v_u, w)
    for i in range(4):
        assert all_close(out[i], v[i] + (1 - 1 / w[i]) * (v_c[i] - v_u[i]), rel=1e-6)
    assert torch.equal(out[0], v[0])
    # Its fixed point is classifier-free guidance: v_c = v_u + w (v - v_u) solves v_c = target(v_c).
    fixed = v_u + w.reshape(-1, 1, 1, 1) * (v - v_u)
    assert all_close(guided_target(v, fixed, v_u, w), fixed, rel=1e-5)


def test_the_loss_is_the_estimate_regressed_on_the_guided_velocity_row_by_row():
    model = guided_dit(torch.float32, class_dropout_prob=0.3).train()
    x1, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    imf = ImprovedMeanFlow(imf_guidance_fraction=0.5, imf_weight_power=0.0)
    torch.manual_seed(0)
    terms = imf.loss(model, x1, y)
    terms.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # Replay the draws (noise, two times, label dropout, guidance scales) and build every row's target by hand.
    torch.manual_seed(0)
    x0 = torch.randn_like(x1)
    s, t = imf.sample_times(16)
    drop = torch.rand(16) < 0.3
    k, (gk, ge) = imf.num_unequal(16), imf.num_guided(16, 8)
    assert (k, gk, ge) == (8, 4, 4) and 0 < drop.sum() < 16
    w = torch.where(drop, 1.0, imf.sample_guidance(16, k))
    assert (w[:gk] > 1).sum() + (w[k : k + ge] > 1).sum() == (~drop[:gk]).sum() + (~drop[k : k + ge]).sum()
    assert (w[gk:k] == 1).all() and (w[k + ge :] == 1).all()
    model.eval()
    xs, v = s.reshape(-1, 1, 1, 1) * x1 + (1 - s.reshape(-1, 1, 1, 1)) * x0, x1 - x0
    null, one = torch.ones(16, dtype=torch.bool), torch.ones(16)
    v_c = model(xs, s, y, interval=0.0, drop_mask=drop, guidance=w)
    v_u = model(xs, s, y, interval=0.0, drop_mask=null, guidance=one)
    target = guided_target(v, v_c, v_u, w)
    est = torch.cat(
        [
            imf.velocity_estimate(model, xs[:k], s[:k], t[:k], Conditioning(y, drop, w).head(k)),
            model(xs[k:], s[k:], y[k:], interval=0.0, drop_mask=drop[k:], guidance=w[k:]),
        ]
    )
    assert all_close(terms.mse, (est - target).square().flatten(1).mean(1), rel=1e-4)
    assert torch.equal(terms.t, s)


def test_guidance_as_an_input_samples_in_one_pass_of_n_and_equals_the_unguided_model_at_one():
    model = guided_dit(torch.float32)
    assert model.guidance_max == 8.0 and model_from_config(model.config).guidance_max == 8.0
    z, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(model(z, 0.3, y, interval=0.5, guidance=1.0), model(z, 0.3, y, interval=0.5))
        assert not torch.equal(model(z, 0.3, y, guidance=2.0), model(z, 0.3, y))
    batches = []
    model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    sampler = Sampler(model, method="mean", steps=1)
    for w in (1.0, 2.0, 8.0):
        batches.clear()
        out = sampler.generate(6, y, noise=z, cfg_scale=w)
        with torch.no_grad():
            expected = z + model(z, torch.zeros(6), y, interval=torch.ones(6), guidance=w)
        assert batches == [6, 6] and out.nfe == 1  # one pass of N (the second: the check above)
        assert all_close(out.images, ((expected + 1) / 2).clamp(0, 1), rel=1e-6)
    for bad in (0.5, 8.5):
        with pytest.raises(ValueError, match=r"outside \[1, 8\]") as info:
            sampler.generate(6, y, noise=z, cfg_scale=bad)
        assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"cfg_scale 9 is outside"):
        Sampler(model, cfg_scale=9.0)
    assert "guidance-input [1, 8]" in repr(sampler)
    # An old network without the guidance input: unchanged, classifier-free guidance at any scale (2N).
    old = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=4).eval()
    old_config = {k: v for k, v in old.config.items() if k != "guidance_max"}
    assert model_from_config(old_config).w_embedder is None and Sampler(old).guidance_range is None
    assert (
        DiT(
            **ImprovedMeanFlow().network_options(),
            input_size=8,
            patch_size=2,
            in_channels=1,
            hidden_size=32,
            depth=1,
            num_heads=4,
        )(z, 0.5, y, interval=0.5, guidance=3.0)
        .abs()
        .max()
        == 0
    )  # untrained: zero


def test_one_step_samples_of_a_short_digits_run_classify_as_their_labels(one_thread):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from data import BatchStream, build_dataset

    torch.manual_seed(0)
    imf = ImprovedMeanFlow(imf_guidance_max=2.0, imf_equal_fraction=0.75, imf_guidance_fraction=0.25)
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        num_registers=0,
        **imf.network_options(),
    )
    stream = iter(
        BatchStream(build_dataset("digits", image_size=8, channels=1), 32, seed=0, flip=False, on_device=True)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    errors, steps = [], 400
    for step in range(steps):
        x, y = next(stream)
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        terms = imf.loss(model, x, y)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        errors.append(terms.mse.mean().item())
    assert sum(errors[-50:]) / 50 < 0.6 * sum(errors[:25]) / 25
    digits = load_digits()
    clf = LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)
    y = torch.arange(10).repeat_interleave(20)
    z = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(model, method="mean", steps=1)
    accuracy = {}
    for w in (1.0, 2.0):
        pixels = sampler.sample(200, y, noise=z, cfg_scale=w).flatten(1).numpy()  # one network evaluation
        accuracy[w] = (clf.predict(pixels) == y.numpy()).mean()
    # Chance is 0.1; 0.77 here. The guided samples come out of the same single pass (guidance needs longer runs to
    # tell the scales apart: the README's digits runs).
    assert accuracy[1.0] > 0.5 and accuracy[2.0] > 0.5, accuracy


def test_resume_is_bit_identical_and_the_checkpoint_samples_guided_in_one_step(tmp_path, capsys):
    imf = dict(objective="imf", objective_args={"imf_guidance_max": 4.0}, ckpt_every=0)
    train.main(tiny(tmp_path / "full", steps=6, **imf))
    train.main(tiny(tmp_path / "part", steps=3, **imf))
    train.main(tiny(tmp_path / "part", steps=6, resume="yes", **imf))
    last = tmp_path / "part/checkpoints/last.pt"
    assert load_checkpoint(last)["config"]["objective"] == "imf"
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(last))
    sampler = Sampler.from_checkpoint(last, device="cpu")
    assert sampler.options.method == "mean" and sampler.guidance_range == (1.0, 4.0)
    assert sampler.generate(4, 0, seed=0, steps=1, cfg_scale=3.0).nfe == 1
    with pytest.raises(SystemExit) as info:
        sampler_cli.cli(["--ckpt", str(last), "--cfg-scale", "5", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert str(info.value).startswith("error: cfg_scale 5 is outside [1, 4]") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--objective", "imf", "--imf-guidance-max", "0.5"], "--imf-guidance-max must be a finite number >= 1"),
        (["--objective", "imf", "--imf-guidance-fraction", "1.5"], "--imf-guidance-fraction must be <= 1"),
        (["--objective", "imf", "--imf-equal-fraction", "-0.1"], "--imf-equal-fraction must be >= 0"),
        (["--objective", "imf", "--imf-weight-eps", "0"], "--imf-weight-eps must be > 0"),
        (["--objective", "imf", "--imf-velocity-weight", "-1"], "--imf-velocity-weight must be >= 0"),
    ],
)
def test_bad_imf_flags_are_one_line_errors(flags, match, tmp_path, capsys):
    assert train.cli([*flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and match in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_guidance_input_is_no_flag_of_other_objectives(tmp_path, capsys):
    for objective in ("flow", "meanflow"):
        with pytest.raises(SystemExit) as info:  # argparse's own exit for an unknown flag
            train.cli(["--objective", objective, "--imf-guidance-max", "4", "--out", str(tmp_path / "run")])
        assert info.value.code == 2 and "unrecognized arguments: --imf-guidance-max 4" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_loss_calls_raise_value_error():
    x1, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="interval input"):
        ImprovedMeanFlow().loss(
            DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=4), x1, y
        )
    unguided_net = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=1,
        num_heads=4,
        **ImprovedMeanFlow(**UNGUIDED).network_options(),
    )
    with pytest.raises(ValueError, match="guidance input"):
        ImprovedMeanFlow().loss(unguided_net, x1, y)
    with pytest.raises(ValueError, match="needs class labels"):
        ImprovedMeanFlow().loss(guided_dit(torch.float32), x1)
    ImprovedMeanFlow(**UNGUIDED).loss(unguided_net, x1, y).loss.backward()  # no guidance range: no input needed
    with pytest.raises(ValueError, match="guidance_max must be 0"):
        DiT(input_size=8, patch_size=2, in_channels=1, num_classes=0, guidance_max=4.0)
