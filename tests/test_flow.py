"""The flow-matching objective: t distributions, the linear path, the loss's zero, OT label pairing."""

import math

import torch
from stand_ins import all_close

from objectives.flow import FlowMatching, sample_t


def test_logit_normal_t_has_the_requested_logit_mean_and_std():
    torch.manual_seed(0)
    t = sample_t(200_000, "logit-normal", mean=0.5, std=1.5)
    assert t.shape == (200_000,) and t.min() > 0 and t.max() < 1
    logit = torch.log(t.double()) - torch.log1p(-t.double())
    # Standard errors: 1.5 / sqrt(2e5) ~ 0.0034 for the mean, ~0.0024 for the std.
    assert abs(logit.mean().item() - 0.5) < 0.015
    assert abs(logit.std().item() - 1.5) < 0.015


def test_uniform_t_is_uniform():
    torch.manual_seed(1)
    t = sample_t(200_000, "uniform").double()
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005
    assert abs(t.var().item() - 1 / 12) < 0.002


def test_logit_normal_default_puts_more_mass_in_the_middle_than_uniform():
    torch.manual_seed(2)
    t = sample_t(100_000, "logit-normal")
    # P(0.25 < sigmoid(n) < 0.75) = P(|n| < log 3) = 0.7266 for n ~ N(0, 1); uniform gives 0.5.
    frac = ((t > 0.25) & (t < 0.75)).double().mean().item()
    assert abs(frac - (2 * 0.5 * (1 + math.erf(math.log(3) / math.sqrt(2))) - 1)) < 0.01


def test_path_is_the_linear_interpolation_from_noise_at_t0_to_data_at_t1():
    torch.manual_seed(0)
    fm = FlowMatching(sigma=0.0)
    x0, x1 = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    y = torch.arange(5)
    t_out, xt, ut, y_out = fm.sample_path(x1, y, x0=x0, t=t)
    tt = t.view(-1, 1, 1, 1)
    assert torch.equal(t_out, t) and torch.equal(y_out, y)
    assert torch.equal(xt, tt * x1 + (1 - tt) * x0)
    assert torch.equal(ut, x1 - x0)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[-1], x1[-1])  # t=0 noise, t=1 data


def test_sigma_adds_gaussian_width_but_keeps_the_target():
    torch.manual_seed(0)
    fm = FlowMatching(sigma=0.5)
    x0, x1 = torch.zeros(20_000, 1, 1, 1), torch.ones(20_000, 1, 1, 1)
    t = torch.full((20_000,), 0.5)
    _, xt, ut, _ = fm.sample_path(x1, x0=x0, t=t)
    assert torch.equal(ut, x1 - x0)
    assert abs(xt.mean().item() - 0.5) < 0.02 and abs(xt.std().item() - 0.5) < 0.02


class _ExactVelocity(torch.nn.Module):
    """The true marginal velocity for a dataset of one point c: v(x, t) = (c - x) / (1 - t)."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c

    def forward(self, x, t, y=None):
        return (self.c - x) / (1 - t).view(-1, 1, 1, 1)


def test_loss_of_the_exact_velocity_field_is_zero_for_a_one_point_dataset():
    torch.manual_seed(0)
    c = torch.randn(1, 2, 4, 4)
    x1 = c.expand(64, -1, -1, -1)
    fm = FlowMatching(sigma=0.0, t_sampler="uniform")
    terms = fm.loss(_ExactVelocity(c), x1, torch.zeros(64, dtype=torch.long))
    assert terms.loss.item() < 1e-10 and terms.mse.shape == terms.t.shape == (64,)
    # A wrong field (zero) has loss E|x1 - x0|^2 / D = mean(c^2) + 1.
    zero = fm.loss(lambda x, t, y: torch.zeros_like(x), x1)
    assert abs(zero.loss.item() - (c.pow(2).mean().item() + 1)) < 0.1
    assert torch.equal(zero.loss, zero.mse.mean())  # the scalar is the mean of the per-sample errors


def test_loss_draws_from_the_global_rng_so_seeding_reproduces_it():
    model = lambda x, t, y: x * t.view(-1, 1, 1, 1)
    x1 = torch.randn(8, 1, 4, 4)
    fm = FlowMatching()
    torch.manual_seed(3)
    a = fm.loss(model, x1)
    torch.manual_seed(3)
    b = fm.loss(model, x1)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
    # The draws are the global generator's own, in this order: the noise x0, then the logit-normal normals.
    torch.manual_seed(3)
    x0, n = torch.randn_like(x1), torch.randn(8)
    assert torch.equal(a.t, torch.sigmoid(n))
    tt = a.t.view(-1, 1, 1, 1)
    expected = (model(tt * x1 + (1 - tt) * x0, a.t, None) - (x1 - x0)).square().flatten(1).mean(1)
    assert all_close(a.mse, expected)
    # and they move it: the next draw differs from a fresh seed's first
    torch.manual_seed(3)
    fm.loss(model, x1)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert not torch.equal(after, torch.rand(1))


def test_ot_pairing_keeps_each_images_label_with_it():
    torch.manual_seed(0)
    n = 32
    # Label i is encoded in its image: a constant image of value i, so pairs can be checked after resampling.
    x1 = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n)
    fm = FlowMatching(sigma=0.0, ot=True)
    x0 = torch.randn(n, 1, 2, 2) * 0.01 + x1  # noise next to each image: OT should pair i with i
    t = torch.full((n,), 1.0)  # at t=1, x_t is the data, so it reveals which image each row holds
    _, xt, ut, y_out = fm.sample_path(x1, y, x0=x0, t=t)
    assert torch.equal(xt[:, 0, 0, 0].round().long(), y_out)
    # The pairing is optimal: each noise is matched with its own (nearest) image, so u_t is tiny.
    assert ut.abs().max() < 0.1


def test_ot_pairing_with_random_noise_still_keeps_labels():
    torch.manual_seed(1)
    n = 16
    x1 = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 3, 3).contiguous()
    y = torch.arange(n) % 10
    fm = FlowMatching(ot=True)
    t = torch.ones(n)
    _, xt, _, y_out = fm.sample_path(x1, y, t=t)
    assert torch.equal(xt[:, 0, 0, 0].round().long() % 10, y_out)


def test_loss_makes_no_host_sync():
    # On a GPU a host sync per step stalls the pipeline; the objective must not read anything back.
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x1 = torch.randn(8, 1, 4, 4)
    with Record():
        FlowMatching().loss(lambda x, t, y: x * t.view(-1, 1, 1, 1), x1, torch.zeros(8, dtype=torch.long))
    assert ops and not any("_local_scalar_dense" in op for op in ops), ops
