"""Sampling: integrate the flow ODE from noise to data (``Sampler``, returning ``Samples``); the fixed-grid
methods and time grids live in ``sampling.solvers``."""

from sampling.options import Samples, SamplingOptions, sampling_options, seeded_labels, seeded_noise
from sampling.sampler import Sampler
from sampling.solvers import FIXED_GRID_SOLVERS, SOLVERS, time_grid

__all__ = ["FIXED_GRID_SOLVERS", "SOLVERS", "Sampler", "Samples", "SamplingOptions", "sampling_options"]
__all__ += ["seeded_labels", "seeded_noise", "time_grid"]
