"""moelab: learn and experiment with how Mixture-of-Experts layers run their expert matmuls."""

from .backends import ExpertsInterface
from .config import MoEConfig
from .experts import Experts
from .moe import SparseMoE
from .router import RouterOutput, TopKRouter, load_balancing_loss
from .steps import record_step

__version__ = "0.1.0"

__all__ = [
    "ExpertsInterface", "MoEConfig", "Experts", "SparseMoE", "RouterOutput", "TopKRouter",
    "load_balancing_loss", "record_step",
]
from .generation import GenerateOutput
from .io import load_pretrained
from .model import KVCache, MoEForCausalLM, MoEModelConfig, RMSNorm
from .multibackbone import MoEVisionConfig, MultiBackboneConfig, MultiBackboneForCausalLM, synthetic_pixel_values
from .selection import decode_backends
from .stage import Stage, current_stage, generation_stage

__all__ += [
    "GenerateOutput", "KVCache", "MoEForCausalLM", "MoEModelConfig", "RMSNorm", "MoEVisionConfig",
    "MultiBackboneConfig", "MultiBackboneForCausalLM", "synthetic_pixel_values", "decode_backends",
    "Stage", "current_stage", "generation_stage",
]
