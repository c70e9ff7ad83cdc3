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


def test_agree_overrides_the_local_decision():
    model, opt = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _loss(model)
    loss.backward()
    ok, _ = guarded_step(opt, list(model.parameters()), loss, agree=lambda ok: ok & False)  # another rank failed
    assert not ok.item()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_guarded_step_and_stats_make_no_host_sync():
    model, opt = _setup()
    stats = StepStats("cpu")
    loss = _loss(model)
    loss.backward()
    rec = RecordOps()
    with rec:
        ok, norm = guarded_step(opt, list(model.parameters()), loss, max_norm=1.0)
        stats.update(ok, loss, norm)
    assert rec.ops and not any("_local_scalar_dense" in op for op in rec.ops), rec.ops


def test_stats_known_answers():
    stats = StepStats("cpu")
    seq = [(True, 1.0), (False, math.nan), (False, math.inf), (True, 3.0), (False, math.nan)]
    for ok, loss in seq:
        stats.update(torch.tensor(ok), torch.tensor(loss), torch.tensor(2.0 if ok else math.nan))
    s = stats.read()
    assert s == {"loss": 2.0, "grad_norm": 2.0, "good_steps": 2.0, "skipped": 3.0, "worst_streak": 2.0}
    stats.update(torch.tensor(False), torch.tensor(math.nan), torch.tensor(math.nan))
    s = stats.read()
    assert math.isnan(s["loss"]) and s["good_steps"] == 0 and s["skipped"] == 4 and s["worst_streak"] == 2
    stats.update(torch.tensor(False), torch.tensor(math.nan), torch.tensor(math.nan))
    assert stats.read()["worst_streak"] == 3  # the streak carried over the read: 3 in a row
    doubled = StepStats("cpu")
    doubled.update(torch.tensor(True), torch.tensor(1.0), torch.tensor(1.0))
    s = doubled.read(reduce=lambda t: t * 2)  # two processes with the same numbers: the mean is unchanged
    assert s["loss"] == 1.0 and s["good_steps"] == 2
