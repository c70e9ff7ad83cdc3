"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: bit-exact comparisons across processes need the same reduction
    order, and one thread is also the fastest for tiny models on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
