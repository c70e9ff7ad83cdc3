"""Training objectives: each maps (network, data, labels) to LossTerms. A new one is a file here and a line below."""

import dataclasses
from typing import Any

from objectives.base import LossTerms, Objective
from objectives.flow import FlowMatching
from objectives.imf import ImprovedMeanFlow
from objectives.meanflow import MeanFlow
from utils.config import Config, arg

OBJECTIVES: dict[str, type[Objective]] = {
    "flow": FlowMatching,  # flow matching, the time convention's owner
    "meanflow": MeanFlow,  # MeanFlow: average velocities, for one-step sampling
    "imf": ImprovedMeanFlow,  # improved MeanFlow: one step at any guidance scale chosen when sampling
}


@dataclasses.dataclass(kw_only=True)
class ObjectiveConfig(Config):
    """``--objective NAME`` and that objective's own flags, held in ``objective_args`` (``Config.nested``)."""

    objective: str = arg(
        "flow",
        "what the network learns: one of objectives.OBJECTIVES (flow: flow matching); each "
        "has its own flags, listed by --objective NAME --help",
        choices=OBJECTIVES,
        group="objective",
    )
    objective_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # the objective's own flags

    nested = {"objective_args": ("objective", OBJECTIVES)}

    def build_objective(self) -> Objective:
        return OBJECTIVES[self.objective](**self.objective_args)


__all__ = ["OBJECTIVES", "FlowMatching", "ImprovedMeanFlow", "LossTerms", "MeanFlow", "Objective", "ObjectiveConfig"]
