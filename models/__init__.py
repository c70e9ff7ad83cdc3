"""Networks only: they map (x, t, y) to a velocity and know nothing of the objective or the solver."""

from models.config import ModelConfig, build_model, model_from_checkpoint, model_from_config, upgraded_config
from models.cost import count_params, forward_flops, forward_macs
from models.dit import DiT, DiT_models

__all__ = ["DiT", "DiT_models", "ModelConfig", "build_model", "model_from_checkpoint", "model_from_config"]
__all__ += ["upgraded_config", "count_params", "forward_flops", "forward_macs"]
