"""The SDE sampler (sampling/solvers.py sde_step, sde_grid) on the Gaussian oracle: the exact velocity of the linear
path from N(0, I) to N(mu, s^2 I), whose marginal at t is N(t mu, (1 - t)^2 + t^2 s^2)."""

from __future__ import annotations

import pytest
import torch
from test_sampler import GaussianFlow, gaussian_problem

from sampling.options import SamplingStopped, seeded_noise
from sampling.sampler import Sampler
from sampling.solvers import SBDM_T0, euler_step, sde_grid, sde_step

MU, S, N = torch.tensor([0.7, -0.4], dtype=torch.float64).view(2, 1, 1), 0.5, 20_000


def oracle():
    model = GaussianFlow(MU, S)
    return lambda x, t: model(x, torch.full((x.shape[0],), float(t), dtype=x.dtype))


def integrate(ts: list[float], diffusion: str, noisy_last: bool = False, seed: int = 1) -> torch.Tensor:
    """N samples (N, 2, 1, 1) from the noise at ts[0] along the grid; the last step noise-free unless noisy_last."""
    g, f = torch.Generator().manual_seed(seed), oracle()
    x = torch.randn(N, 2, 1, 1, generator=g, dtype=torch.float64)
    for i in range(len(ts) - 1):
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64) if noisy_last or i < len(ts) - 2 else None
        x = sde_step(f, x, ts[i], ts[i + 1], noise, diffusion)
    return x


def moment_errors(x: torch.Tensor, t: float) -> tuple[float, float]:
    """The largest |mean - t mu| / sd_t and |var / sd_t^2 - 1| over the two coordinates, against x_t's marginal."""
    sd = ((1 - t) ** 2 + t**2 * S**2) ** 0.5
    z = (x - t * MU) / sd
    return z.mean(0).abs().max().item(), (z.var(0) - 1).abs().max().item()


# Statistical tolerances over N samples: 5 standard errors of a mean (1 / sqrt(N)) and of a variance (sqrt(2 / N)).
MEAN_TOL, VAR_TOL = 5 / N**0.5, 5 * (2 / N) ** 0.5


@pytest.mark.parametrize("diffusion", ["sigma", "SBDM"])
def test_samples_match_the_target_and_converge_as_steps_grow(diffusion):
    errors = []
    for steps in (8, 32, 128):  # the noise-free last step shrinks with the steps: 1 / steps
        mean_err, var_err = moment_errors(integrate(sde_grid(steps, 1 / steps, diffusion).tolist(), diffusion), 1.0)
        assert mean_err < MEAN_TOL, (steps, mean_err)
        errors.append(var_err)
    assert errors[0] > 0.1 and errors[1] < errors[0] / 3 and errors[2] < VAR_TOL, errors  # Euler-Maruyama: O(h)


@pytest.mark.parametrize("diffusion", ["sigma", "SBDM"])
def test_sits_protocol_250_steps_and_a_last_step_of_0_04(diffusion):
    ts = sde_grid(250, 0.04, diffusion)
    assert len(ts) == 251 and ts[-1] == 1.0 and abs(ts[-2] - 0.96) < 1e-12 and ts[0] == (diffusion == "SBDM") * SBDM_T0
    assert torch.allclose(ts[:-1].diff(), torch.full((249,), (0.96 - ts[0].item()) / 249, dtype=torch.float64))
    mean_err, var_err = moment_errors(integrate(ts.tolist(), diffusion), 1.0)
    assert mean_err < MEAN_TOL and var_err < 0.05, (mean_err, var_err)  # the last step of 0.04 costs ~2.5 %


@pytest.mark.parametrize("diffusion", ["sigma", "SBDM"])
def test_the_marginal_at_an_intermediate_time_is_x_ts(diffusion):
    t0 = SBDM_T0 if diffusion == "SBDM" else 0.0
    x = integrate(torch.linspace(t0, 0.5, 257, dtype=torch.float64).tolist(), diffusion, noisy_last=True)
    mean_err, var_err = moment_errors(x, 0.5)
    assert mean_err < MEAN_TOL and var_err < VAR_TOL, (mean_err, var_err)


def test_zero_diffusion_is_euler_on_the_same_grid():
    f, ts = oracle(), sde_grid(20, 0.04).tolist()
    x = y = torch.randn(5, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for i in range(20):
        noise = torch.randn_like(x) if i < 19 else None
        x, y = sde_step(f, x, ts[i], ts[i + 1], noise, norm=0.0), euler_step(f, y, ts[i], ts[i + 1])
    assert torch.equal(x, y)
    # SiT's drift v + (w/2) s with w = 2 (1 - t) and s = (t v - x) / (1 - t) is (1 + t) v - x; its noise sqrt(w h).
    v, z = torch.tensor([0.3]), torch.tensor([1.0])
    out = sde_step(lambda x, t: v, torch.tensor([2.0]), 0.25, 0.75, z)
    assert torch.allclose(out, 2.0 + 0.5 * (1.25 * v - 2.0) + (2 * 0.75 * 0.5) ** 0.5 * z)
    out = sde_step(lambda x, t: v, torch.tensor([2.0]), 0.25, 0.75, z, "SBDM")  # w = 2 (1 - t) / t
    assert torch.allclose(out, 2.0 + 0.5 * (v + (0.25 * v - 2.0) / 0.25) + (2 * 0.75 / 0.25 * 0.5) ** 0.5 * z)
    assert torch.equal(sde_step(lambda x, t: v, z, 0.96, 1.0, None, last_step="euler"), z + 0.04 * v)


def test_the_samplers_sde_noise_depends_only_on_the_seed_and_the_sample():
    model, z, _ = gaussian_problem()
    sampler, shape = Sampler(model, method="sde", steps=6), tuple(z.shape[1:])
    model.calls = 0
    a = sampler.generate(5, seed=3, batch_size=2, trajectory=True)
    assert a.nfe == 6 and model.calls == 18  # one evaluation a step, three chunks
    assert torch.equal(a.trajectory, sampler.generate(5, seed=3, batch_size=5, trajectory=True).trajectory)
    assert torch.equal(a.trajectory[:, :3], sampler.generate(3, seed=3, trajectory=True).trajectory)
    assert not torch.equal(a.trajectory[-1], sampler.generate(5, seed=4, trajectory=True).trajectory[-1])
    x0 = seeded_noise(3, range(5), shape).double()  # the step noise follows each sample's starting noise:
    assert torch.equal(sampler.generate(5, noise=x0, trajectory=True).trajectory, a.trajectory)
    shard = sampler.generate(2, noise=x0[3:], trajectory=True).trajectory  # as evaluate.py's shards draw them
    assert torch.equal(shard, a.trajectory[:, 3:])
    # Without diffusion it is Euler on the same grid: SiT's window and its last step of 0.04.
    ts, x = sde_grid(6, 0.04).tolist(), x0
    for i in range(6):
        x = euler_step(lambda x, t: model(x, torch.full((len(x),), t, dtype=x.dtype)), x, ts[i], ts[i + 1])
    zero = sampler.generate(5, seed=3, sde_norm=0.0, trajectory=True).trajectory[-1]
    assert torch.allclose(zero.double(), x, atol=1e-6)
    with pytest.raises(ValueError, match="last.step.size must be < 1"):
        sampler.generate(1, seed=0, last_step_size=1.0)
    asked, model.calls = [], 0  # should_stop is asked before every step, as for the other fixed-grid methods
    with pytest.raises(SamplingStopped, match="before step 4 of 6"):
        sampler.generate(5, seed=3, should_stop=lambda: asked.append(1) or len(asked) > 3)
    assert model.calls == 3
