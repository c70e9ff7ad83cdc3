"""The guarded optimizer step: exact skips of non-finite steps, no host sync, device-side statistics."""

import math

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from utils.optim import StepStats, build_adamw, guarded_step


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, build_adamw(model.parameters(), lr=1e-2, weight_decay=0.1)


def _loss(model, scale=1.0):
    return model(torch.randn(16, 4)).square().mean() * scale


def test_adamw_is_fused_on_this_cpu():
    _, opt = _setup()
    assert opt.defaults["fused"]  # the no-sync skip relies on it; torch >= 2.4 has fused AdamW on the CPU


def test_a_finite_step_equals_plain_adamw_with_clipping():
    model, opt = _setup()
    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1)
    loss = _loss(model, 100.0)
    loss.backward()
    ok, norm = guarded_step(opt, list(model.parameters()), loss, max_norm=0.5)
    torch.manual_seed(1)
    ref_loss = _loss(ref, 100.0)
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert ok.item() and torch.allclose(norm, ref_norm) and norm > 0.5  # clipping was active
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert all(p.grad is None for p in model.parameters())


def test_nan_and_inf_steps_change_nothing():
    model, opt = _setup()
    loss = _loss(model)
    loss.backward()
    guarded_step(opt, list(model.parameters()), loss)  # one real step, so there are moments to protect
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    for bad in (float("nan"), float("inf")):
        loss = _loss(model) + bad  # inf keeps finite gradients: the loss alone must trigger the skip
        loss.backward()
        ok, _ = guarded_step(opt, list(model.parameters()), loss)
        assert not ok.item()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in opt.state[next(model.parameters())].items():
        assert torch.equal(v, moments[k]), k  # step count and moments untouched too


def test_another_process_failing_skips_the_step_here(monkeypatch):
    import utils.optim

    model, opt = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _loss(model)
    loss.backward()
    # The all-reduce (min) over processes as another rank with a non-finite loss would make it.
    monkeypatch.setattr(utils.optim, "all_reduce_", lambda ok, op: torch.zeros_like(ok))
    ok, _ = guarded_step(opt, list(model.parameters()), loss)
    assert not ok.item()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_guarded_step_and_stats_make_no_host_sync():
    model, opt = _setup()
    stats = StepStats("cpu")
    loss = _loss(model)
    loss.backward()
    per_sample, t = loss.detach().expand(16), torch.rand(16)
    rec = RecordOps()
    with rec:
        ok, norm = guarded_step(opt, list(model.parameters()), loss, max_norm=1.0)
        stats.update(ok, per_sample, t, norm)
    assert rec.ops and not any("_local_scalar_dense" in op for op in rec.ops), rec.ops


def test_stats_known_answers():
    stats = StepStats("cpu")
    seq = [(True, 1.0), (False, math.nan), (False, math.inf), (True, 3.0), (False, math.nan)]
    t = torch.tensor([0.1, 0.6])
    for ok, loss in seq:
        align = torch.tensor(-loss / 4 if ok else math.nan)  # REPA's alignment loss: -0.25, -0.75 on good steps
        stats.update(torch.tensor(ok), torch.full((2,), loss), t, torch.tensor(2.0 if ok else math.nan), align)
    s = stats.read()
    by_t = s.pop("loss_by_t")
    assert s == {"loss": 2.0, "grad_norm": 2.0, "align": -0.5, "good_steps": 2.0, "skipped": 3.0, "worst_streak": 2.0}
    assert by_t[0] == by_t[4] == 2.0 and all(math.isnan(v) for i, v in enumerate(by_t) if i not in (0, 4))
    stats.update(torch.tensor(False), torch.full((2,), math.nan), t, torch.tensor(math.nan))
    s = stats.read()
    assert math.isnan(s["loss"]) and s["good_steps"] == 0 and s["skipped"] == 4 and s["worst_streak"] == 2
    stats.update(torch.tensor(False), torch.full((2,), math.nan), t, torch.tensor(math.nan))
    assert stats.read()["worst_streak"] == 3  # the streak carried over the read: 3 in a row


def test_loss_by_t_bins_sum_weighted_to_the_logged_loss():
    torch.manual_seed(0)
    stats = StepStats("cpu", bins=8)
    everything = []
    for _ in range(5):
        mse, t = torch.rand(32) * 3, torch.rand(32)
        stats.update(torch.tensor(True), mse, t, torch.tensor(1.0))
        everything.append((mse, t))
    s = stats.read()
    mse, t = (torch.cat(x) for x in zip(*everything, strict=True))
    counts = torch.bincount((t * 8).long(), minlength=8).double()
    for i in range(8):  # each bin is the mean loss of the samples drawn in it
        assert math.isclose(s["loss_by_t"][i], mse[(t * 8).long() == i].double().mean().item(), rel_tol=1e-12)
    weighted = (torch.tensor(s["loss_by_t"], dtype=torch.float64) * counts).sum() / counts.sum()
    assert math.isclose(weighted.item(), s["loss"], rel_tol=1e-12)  # the bins' weighted mean is the logged loss


def test_stats_are_summed_over_processes(monkeypatch):
    import utils.optim

    stats = StepStats("cpu")
    stats.update(torch.tensor(True), torch.ones(4), torch.rand(4), torch.tensor(1.0))
    monkeypatch.setattr(utils.optim, "all_reduce_", lambda t: t * 2)  # two processes with the same numbers
    s = stats.read()
    assert s["loss"] == 1.0 and s["good_steps"] == 2  # the mean is unchanged
