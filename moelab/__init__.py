"""moelab: learn and experiment with how Mixture-of-Experts layers run their expert matmuls."""

from .backends import ExpertsInterface
from .config import MoEConfig
from .experts import Experts
from .moe import SparseMoE
from .router import RouterOutput, TopKRouter, load_balancing_loss
from .steps import record_step
from . import memory
from .inspect import Trace, inspect  # the function `moelab.inspect`; classes: `from moelab.inspect import ...`

__version__ = "0.1.0"

__all__ = [
    "ExpertsInterface", "MoEConfig", "Experts", "SparseMoE", "RouterOutput", "TopKRouter",
    "load_balancing_loss", "record_step",
    "inspect", "memory", "Trace",
]
from .generation import GenerateOutput
from .io import load_pretrained
from .model import KVCache, MoEForCausalLM, MoEModelConfig, RMSNorm
from .multibackbone import MoEVisionConfig, MultiBackboneConfig, MultiBackboneForCausalLM, synthetic_pixel_values
from .selection import decode_backends
from .stage import Stage, current_stage, generation_stage

__all__ += [
    "GenerateOutput", "load_pretrained", "KVCache", "MoEForCausalLM", "MoEModelConfig", "RMSNorm", "MoEVisionConfig",
    "MultiBackboneConfig", "MultiBackboneForCausalLM", "synthetic_pixel_values", "decode_backends",
    "Stage", "current_stage", "generation_stage",
]
