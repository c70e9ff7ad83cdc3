"""The MeanFlow objective: the identity on a closed-form Gaussian flow, the JVP against finite differences, the
flow-matching limit, a short digits run that samples in one step, and bad inputs."""

import warnings

import pytest
import torch
from stand_ins import all_close

from models.dit import DiT
from objectives.flow import FlowMatching, sample_t
from objectives.meanflow import Conditioning, MeanFlow, average_velocity_jvp, total_derivative_fd


class GaussianMeanVelocity(torch.nn.Module):
    """The exact average velocity u*(x, s, t) of the straight-path flow from N(0, I) noise to N(mu, S^2 I) data.

    x_tau has the law N(tau mu, sigma_tau^2 I) with sigma_tau^2 = tau^2 S^2 + (1 - tau)^2, and the flow is the affine
    map x_t = t mu + (sigma_t / sigma_s) (x_s - s mu), so
        u*(x, s, t) = mu + g(s, t) (x - s mu),   g = (sigma_t / sigma_s - 1) / (t - s)   (t != s),
        v(x, s) = u*(x, s, s) = mu + (sigma_s' / sigma_s) (x - s mu),   sigma_s' = (s S^2 - (1 - s)) / sigma_s.
    One step from noise z at s = 0 to t = 1 lands on mu + S z. Called like the DiT: (x, t, y=None, interval=None)
    with t the current time and interval = t_end - t. Has the attributes ``Sampler`` reads (input_size, in_channels,
    num_classes = 0).
    """

    def __init__(self, mu: torch.Tensor | float, scale: float, in_channels: int = 1, input_size: int = 4):
        super().__init__()
        self.register_buffer(
            "mu", torch.as_tensor(mu, dtype=torch.float64).expand(in_channels, input_size, input_size).clone()
        )
        self.scale = float(scale)
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, 0

    def sigma(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(tau**2 * self.scale**2 + (1 - tau) ** 2)

    def velocity(self, x: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """The marginal velocity E[x1 - x0 | x_s = x] (N, C, H, W)."""
        s = self._col(s, x)
        rate = (s * self.scale**2 - (1 - s)) / self.sigma(s) ** 2
        mu = self.mu.to(x.dtype)
        return mu + rate * (x - s * mu)

    def forward(self, x, t, y=None, interval=None):
        s = self._col(t, x)
        h = torch.zeros_like(s) if interval is None else self._col(interval, x)
        end = s + h
        equal = h == 0
        safe_h = torch.where(equal, torch.ones_like(h), h)
        g_jump = (self.sigma(end) / self.sigma(s) - 1) / safe_h
        g_zero = (s * self.scale**2 - (1 - s)) / self.sigma(s) ** 2  # the limit h -> 0
        mu = self.mu.to(x.dtype)
        return mu + torch.where(equal, g_zero, g_jump) * (x - s * mu)

    @staticmethod
    def _col(a, x):
        a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
        return a.expand(x.shape[0]).reshape(-1, 1, 1, 1) if a.ndim == 0 else a.reshape(-1, 1, 1, 1)


def gaussian_case(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = GaussianMeanVelocity(mu=torch.randn(1, 4, 4, generator=g, dtype=torch.float64), scale=0.35)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) * 1.5
    a, b = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    s, t = torch.minimum(a, b), torch.maximum(a, b)
    t[: n // 4] = s[: n // 4]  # some rows with s = t
    return model, x, s, t


def test_stand_in_is_the_exact_average_velocity_of_its_flow():
    model, x, s, t = gaussian_case()
    # Integrate dx/dtau = v from s to t with RK4; the average velocity's jump must land on the same point.
    xs, steps = x.clone(), 400
    for i in range(steps):
        a = s + (t - s) * i / steps
        dt = ((t - s) / steps).reshape(-1, 1, 1, 1)
        k1 = model.velocity(xs, a)
        k2 = model.velocity(xs + dt / 2 * k1, a + (t - s) / (2 * steps))
        k3 = model.velocity(xs + dt / 2 * k2, a + (t - s) / (2 * steps))
        k4 = model.velocity(xs + dt * k3, a + (t - s) / steps)
        xs = xs + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    jump = x + (t - s).reshape(-1, 1, 1, 1) * model(x, s, interval=t - s)
    assert (jump - xs).abs().max() < 1e-10
    assert torch.equal(model(x, s), model.velocity(x, s))
    z = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    one_step = z + model(z, 0.0, interval=1.0)
    assert (one_step - (model.mu + 0.35 * z)).abs().max() < 1e-12


def test_exact_average_velocity_has_zero_meanflow_residual_with_the_marginal_velocity():
    model, x, s, t = gaussian_case()
    target = MeanFlow().target(model, x, s, t, model.velocity(x, s))
    residual = model(x, s, interval=t - s) - target
    assert residual.abs().max() < 1e-12  # float64: ~1e-16


@pytest.mark.parametrize(
    "wrong",
    [
        lambda m, x, s, h: m.velocity(x, s),  # the instantaneous velocity: a flow model taken for a MeanFlow one
        lambda m, x, s, h: m(x, s, interval=h) + 0.1 * h.reshape(-1, 1, 1, 1),  # right at h = 0, wrong beyond
        lambda m, x, s, h: m(x, s + h, interval=-h),  # the average velocity read from the other end
    ],
)
def test_any_other_model_has_a_nonzero_residual(wrong):
    exact, x, s, t = gaussian_case()

    class Wrong(torch.nn.Module):
        def forward(self, x_, t_, y=None, interval=None):
            return wrong(exact, x_, t_, interval)

    model = Wrong()
    target = MeanFlow().target(model, x, s, t, exact.velocity(x, s))
    residual = (model(x, s, interval=t - s) - target).flatten(1).abs().amax(1)
    jumps = t > s
    assert residual[~jumps].max() < 1e-12 and residual[jumps].min() > 1e-3


def small_dit(dtype=torch.float64, **kwargs) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    args.update(kwargs)
    model = DiT(average_velocity=True, time_scale=1.0, **args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.to(dtype).eval()


def dit_inputs(n=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g).to(dtype)
    s = torch.rand(n, generator=g).to(dtype) * 0.6
    t = s + torch.rand(n, generator=g).to(dtype) * 0.4
    return x, s, t, torch.randn(n, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def test_jvp_is_the_finite_difference_total_derivative_on_a_dit():
    model = small_dit()
    x, s, t, v, y = dit_inputs()
    u, duds = average_velocity_jvp(model, x, s, t, v, Conditioning(y))
    eps = 1e-5
    e = eps * torch.ones_like(s)
    fd = (model(x + eps * v, s + e, y, interval=t - s - e) - model(x - eps * v, s - e, y, interval=t - s + e)) / (
        2 * eps
    )
    assert all_close(u, model(x, s, y, interval=t - s), rel=1e-12)  # the math attention kernel: not bit-equal
    assert all_close(duds, fd, rel=1e-7)
    assert duds.abs().max() > 0.1  # the derivative is not trivially zero
    target = MeanFlow().target(model, x, s, t, v, Conditioning(y))
    assert all_close(target, v + (t - s).reshape(-1, 1, 1, 1) * fd, rel=1e-7)


def test_jvp_with_a_drop_mask_is_the_null_class_derivative():
    model = small_dit()
    x, s, t, v, y = dit_inputs()
    drop = torch.tensor([True, False, True, False, False, True])
    _, with_mask = average_velocity_jvp(model, x, s, t, v, Conditioning(y, drop))
    null = Conditioning(torch.where(drop, 0, y), torch.ones(6, dtype=torch.bool))
    _, with_null = average_velocity_jvp(model, x, s, t, v, null)
    assert all_close(with_mask[drop], with_null[drop], rel=1e-12)
    assert not all_close(with_mask[~drop], with_null[~drop], rel=1e-3)


def test_finite_difference_fallback_warns_once_and_matches_the_jvp():
    class NoForwardAD(torch.autograd.Function):  # an operator without a forward derivative
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

    class Wrapped(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, y=None, interval=None, drop_mask=None):
            return self.net(NoForwardAD.apply(x), t, y, interval=interval, drop_mask=drop_mask)

    net = small_dit(torch.float32)
    x, s, t, v, y = dit_inputs(dtype=torch.float32)
    mf = MeanFlow()
    with pytest.warns(UserWarning, match="finite-difference"):
        fallback = mf.target(Wrapped(net), x, s, t, v, Conditioning(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(mf.target(Wrapped(net), x, s, t, v, Conditioning(y)), fallback)  # no second warning
    exact = MeanFlow().target(net, x, s, t, v, Conditioning(y))
    assert all_close(fallback, exact, rel=1e-3)
    duds_fd = total_derivative_fd(net, x, s, t, v, Conditioning(y))
    _, duds = average_velocity_jvp(net, x, s, t, v, Conditioning(y))
    assert all_close(duds_fd, duds, rel=1e-3)


def test_jvp_under_bf16_autocast_is_close_to_float32():
    model = small_dit(torch.float32)
    x, s, t, v, y = dit_inputs(dtype=torch.float32)
    exact = MeanFlow().target(model, x, s, t, v, Conditioning(y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = MeanFlow().target(model, x, s, t, v, Conditioning(y))
    assert low.dtype == torch.float32 and all_close(low, exact, rel=5e-2)
    # The whole training loss under autocast, as train.py runs it on a GPU.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = MeanFlow(mf_omega=1.5).loss(model.train(), x, y)
    terms.loss.backward()
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_equal_times_without_weighting_is_the_flow_matching_loss():
    model = small_dit(torch.float32)
    x1 = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    mf = MeanFlow(mf_equal_fraction=1.0, mf_weight_power=0.0, t_mean=0.0, t_std=1.0)
    torch.manual_seed(3)
    expected = FlowMatching().loss(model, x1, y)  # draws x0, then t
    torch.manual_seed(3)
    x0 = torch.randn_like(x1)
    t = sample_t(8, "logit-normal", 0.0, 1.0)
    terms = mf.loss(model, x1, y, x0=x0, s=t, t=t)
    assert torch.equal(terms.t, expected.t)
    assert all_close(terms.mse, expected.mse, rel=1e-6)
    assert all_close(terms.loss, expected.loss, rel=1e-6)
    # The target itself is x1 - x0, exactly.
    xs = t.reshape(-1, 1, 1, 1) * x1 + (1 - t.reshape(-1, 1, 1, 1)) * x0
    assert torch.equal(mf.target(model, xs, t, t, x1 - x0, Conditioning(y)), x1 - x0)
    # Drawn times with equal_fraction 1 are all equal.
    s_drawn, t_drawn = mf.sample_times(100)
    assert torch.equal(s_drawn, t_drawn)


def test_times_are_ordered_logit_normal_with_the_requested_equal_fraction():
    torch.manual_seed(0)
    mf = MeanFlow(t_mean=0.4, t_std=1.0, mf_equal_fraction=0.75)
    s, t = mf.sample_times(200_000)
    assert (s <= t).all() and s.min() > 0 and t.max() < 1
    assert mf.num_unequal(200_000) == 50_000 and (s[:50_000] < t[:50_000]).all() and torch.equal(s[50_000:], t[50_000:])
    # Both times together are the two logit-normal draws: their pooled logits have the requested mean and std.
    both = torch.cat([s[:50_000], t[:50_000]]).double()
    logit = torch.log(both) - torch.log1p(-both)
    assert abs(logit.mean().item() - 0.4) < 0.02 and abs(logit.std().item() - 1.0) < 0.02
    assert MeanFlow(mf_equal_fraction=0.0).num_unequal(128) == 128 and MeanFlow().num_unequal(128) == 32


def test_adaptive_weight_divides_each_sample_by_its_squared_error():
    model = small_dit(torch.float32)
    x1, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    x0, (s, t) = torch.randn_like(x1), MeanFlow().sample_times(8)
    plain = MeanFlow(mf_weight_power=0.0).loss(model, x1, y, x0=x0, s=s, t=t)
    for p, c in ((1.0, 1e-3), (0.5, 0.1)):
        weighted = MeanFlow(mf_weight_power=p, mf_weight_eps=c).loss(model, x1, y, x0=x0, s=s, t=t)
        sq = plain.mse * 64  # squared L2 norm over the sample's 64 elements
        assert torch.equal(weighted.mse, plain.mse)
        assert all_close(weighted.loss, (plain.mse / (sq + c) ** p).mean(), rel=1e-6)


def test_loss_uses_the_same_label_dropout_in_both_passes_and_has_gradients():
    model = small_dit(torch.float32, class_dropout_prob=0.5).train()
    x1, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    mf = MeanFlow(mf_equal_fraction=0.5)
    torch.manual_seed(0)
    terms = mf.loss(model, x1, y)
    terms.loss.backward()
    assert terms.loss.ndim == 0 and terms.mse.shape == (16,) and terms.t.shape == (16,)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Replay the draws (noise, two times, then the drop mask) and rebuild the loss by hand in eval mode, where the
    # network drops nothing by itself: the target's pass and the prediction must both have used that mask.
    torch.manual_seed(0)
    x0 = torch.randn_like(x1)
    s, t = mf.sample_times(16)
    drop = torch.rand(16) < 0.5
    assert 0 < drop.sum() < 16
    model.eval()
    xs, v, k = s.reshape(-1, 1, 1, 1) * x1 + (1 - s.reshape(-1, 1, 1, 1)) * x0, x1 - x0, mf.num_unequal(16)
    target = torch.cat([mf.target(model, xs[:k], s[:k], t[:k], v[:k], Conditioning(y, drop).head(k)), v[k:]])
    pred = model(xs, s, y, interval=t - s, drop_mask=drop)
    assert all_close(terms.mse, (pred - target).square().flatten(1).mean(1), rel=1e-5)


def test_training_time_guidance_target():
    model = small_dit(torch.float32)
    x, s, _, v, y = dit_inputs(dtype=torch.float32)
    null = torch.ones(6, dtype=torch.bool)
    u_c = model(x, s, y, interval=0.0)
    u_n = model(x, s, y, interval=0.0, drop_mask=null)
    guided = MeanFlow(mf_omega=2.0, mf_kappa=0.5).guided_velocity(model, x, s, v, Conditioning(y))
    assert all_close(guided, 2.0 * v + 0.5 * u_c + (1 - 2.0 - 0.5) * u_n, rel=1e-5)
    only_omega = MeanFlow(mf_omega=1.5).guided_velocity(model, x, s, v, Conditioning(y))
    assert all_close(only_omega, 1.5 * v - 0.5 * u_n, rel=1e-5)
    # Dropped labels and times outside the guidance interval keep the plain velocity.
    drop = torch.tensor([True, False, False, False, False, False])
    lo = float(s.sort().values[3])
    part = MeanFlow(mf_omega=2.0, mf_guidance_interval=(lo, 1.0)).guided_velocity(model, x, s, v, Conditioning(y, drop))
    keep = drop | (s < lo)
    assert torch.equal(part[keep], v[keep]) and all_close(part[~keep], (2.0 * v - u_n)[~keep], rel=1e-5)
    # The guided loss runs end to end.
    MeanFlow(mf_omega=2.0, mf_kappa=0.3).loss(model.train(), torch.randn(6, 1, 8, 8), y).loss.backward()


def test_one_step_samples_of_a_short_digits_run_classify_as_their_labels(one_thread):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from data import BatchStream, build_dataset

    torch.manual_seed(0)
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        num_registers=0,
        **MeanFlow().network_options(),
    )
    stream = iter(
        BatchStream(build_dataset("digits", image_size=8, channels=1), 32, seed=0, flip=False, on_device=True)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mf = MeanFlow()
    errors, steps = [], 500
    for step in range(steps):
        x, y = next(stream)
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        terms = mf.loss(model, x, y)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        errors.append(terms.mse.mean().item())
    # Early training is stable: the MeanFlow error (whose target holds the network's own time derivative) never
    # climbs above its start, and halves. With DiT's t * 1000 time embedding this run's error climbs from 1.9 to
    # over 100 instead (the reason MeanFlow models embed t unscaled; see models/dit.py).
    first = sum(errors[:25]) / 25
    assert max(sum(errors[i : i + 25]) / 25 for i in range(0, steps - 24, 25)) <= first * 1.05
    assert sum(errors[-50:]) / 50 < 0.5 * first
    model.eval()
    digits = load_digits()
    clf = LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)
    y = torch.arange(10).repeat_interleave(20)
    with torch.no_grad():
        z = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        x1 = z + model(z, 0.0, y, interval=1.0)  # one network evaluation
    pixels = ((x1.clamp(-1, 1) + 1) / 2).flatten(1).numpy()
    accuracy = (clf.predict(pixels) == y.numpy()).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.1; 0.92 to 0.99 over three seeds


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--mf-equal-fraction", "1.5"], "--mf-equal-fraction must be <= 1"),
        (["--mf-equal-fraction", "-0.1"], "--mf-equal-fraction must be >= 0"),
        (["--mf-weight-power", "-1"], "--mf-weight-power must be >= 0"),
        (["--mf-weight-eps", "0"], "--mf-weight-eps must be > 0"),
        (["--mf-omega", "0"], "--mf-omega must be > 0"),
        (["--mf-kappa", "1"], "--mf-kappa must be < 1"),
        (["--t-std", "0"], "--t-std must be > 0"),
        (["--mf-guidance-interval", "0.5", "0.2"], "mf_guidance_interval must satisfy 0 <= lo <= hi <= 1"),
    ],
)
def test_bad_meanflow_flags_are_one_line_errors(flags, match, tmp_path, capsys):
    import train

    assert train.cli(["--objective", "meanflow", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and match in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--ot"], ["--sigma", "0.1"], ["--t-sampler", "uniform"]])
def test_flow_matching_flags_are_not_meanflow_flags(flags, tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as info:  # argparse's own exit for an unknown flag
        train.cli(["--objective", "meanflow", "--out", str(tmp_path / "run"), *flags])
    assert info.value.code == 2 and f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_loss_calls_raise_value_error():
    x1, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    flow_model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="interval input"):
        MeanFlow().loss(flow_model, x1, y)
    model = small_dit(torch.float32)
    with pytest.raises(ValueError, match="needs class labels"):
        MeanFlow(mf_omega=2.0).loss(small_dit(torch.float32, num_classes=0), x1)
    with pytest.raises(ValueError, match="both times"):
        MeanFlow().loss(model, x1, y, s=torch.rand(4))
