"""utils/rng.py: generator states survive a weights_only checkpoint round trip and restore the same draws."""

import random

import numpy as np
import torch

from utils.rng import rng_state, seed_everything, set_rng_state


def draws() -> tuple:
    # np.random.normal and random.gauss keep a cached second value: the states must carry it too.
    return (torch.rand(3), np.random.rand(3), np.random.normal(size=3), random.random(), random.gauss(0, 1))


def test_state_is_plain_and_restores_the_same_draws_after_a_weights_only_load(tmp_path):
    seed_everything(7)
    np.random.normal(size=1)  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    state = rng_state("cpu")
    expected = draws()
    torch.save({"rng": [state]}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0]  # refuses anything but plain values
    assert isinstance(loaded["numpy"]["key"], torch.Tensor) and isinstance(loaded["python"], list)
    seed_everything(123)
    draws()  # move every generator away
    set_rng_state(loaded, "cpu")
    got = draws()
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1:], expected[1:], strict=True):
        np.testing.assert_array_equal(a, b)
