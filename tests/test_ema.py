"""EMA: known answers for the decay warm-up, masked (skipped) updates, a frozen copy, no host sync."""

import torch
import torch.nn as nn

from utils.ema import EMA


def _model(value: float) -> nn.Module:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def test_warmup_decay_known_answers():
    model = _model(0.0)
    ema = EMA(model, decay=0.5, warmup=True)
    # n=0: decay min(0.5, 1/10) = 0.1 -> ema = 0.1 * 0 + 0.9 * 1 = 0.9
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 0.9))
    # n=1: decay min(0.5, 2/11) = 2/11 -> ema = 2/11 * 0.9 + 9/11 * 3
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 2 / 11 * 0.9 + 9 / 11 * 3))
    # n large: decay capped at 0.5
    ema.updates.fill_(1000)
    before = ema.model.weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.5 * before + 0.5 * 3.0)
    assert ema.num_updates == 1001


def test_without_warmup_the_decay_is_constant():
    model = _model(0.0)
    ema = EMA(model, decay=0.75, warmup=False)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)
    ema.update(model)
    # 0 -> 1 -> 1.75
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 1.75))


def test_masked_update_is_skipped_exactly_and_not_counted():
    model = _model(1.0)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model, mask=torch.tensor(False))
    assert torch.equal(ema.model.weight, before)  # bit-identical: ema + 0 * (p - ema) = ema
    assert ema.num_updates == 0
    ema.update(model, mask=torch.tensor(True))
    # the skipped update did not advance the warm-up: decay is still min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 0.1 * 1.0 + 0.9 * 2.0))
    assert ema.num_updates == 1


def test_ema_is_a_frozen_copy():
    model = _model(1.0)
    ema = EMA(model, decay=0.99)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    with torch.no_grad():
        model.weight.fill_(5.0)
    assert torch.equal(ema.model.weight, torch.ones(1, 2))  # a copy, not a view of the model's weights
    ema.update(model)
    assert ema.num_updates == 1 and not torch.equal(ema.model.weight, torch.ones(1, 2))


def test_update_makes_no_host_sync():
    # A Python-scalar weight would be read back with .item() (aten._local_scalar_dense): a GPU sync per step.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    model = _model(1.0)
    ema = EMA(model, decay=0.9)
    with Record():
        ema.update(model, mask=torch.tensor(True))
        ema.update(model)
    assert seen and not any("_local_scalar_dense" in name for name in seen), seen
