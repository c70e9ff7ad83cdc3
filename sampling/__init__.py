"""Sampling: integrate the flow ODE from noise to data (``Sampler``)."""

from sampling.sampler import Sampler, SamplingOptions, seeded_labels, seeded_noise, time_grid

__all__ = ["Sampler", "SamplingOptions", "seeded_labels", "seeded_noise", "time_grid"]
