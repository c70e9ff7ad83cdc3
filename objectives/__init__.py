"""Training objectives: each maps (network, data batch, labels) to LossTerms; ``OBJECTIVES`` names them.

Adding one is a file here with an ``Objective`` subclass and a line below (the README's "Extending" section).
"""

from objectives.base import LossTerms, Objective
from objectives.flow import FlowMatching
from objectives.meanflow import MeanFlow

OBJECTIVES: dict[str, type[Objective]] = {
    "flow": FlowMatching,  # flow matching, the time convention's owner
    "meanflow": MeanFlow,  # MeanFlow: average velocities, for one-step sampling
}

__all__ = ["OBJECTIVES", "FlowMatching", "LossTerms", "MeanFlow", "Objective"]
