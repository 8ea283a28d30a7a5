"""moelab: learn and experiment with how Mixture-of-Experts layers run their expert matmuls.

The packages, lowest first (each imports only those below it; `pyproject.toml`'s import-linter contract checks it):
`core` (config, registry, steps, stage), `backends` (eager, batched_mm, grouped_mm, auto), `layer` (router,
experts, SparseMoE), `memory`, `inspection`, `models`, then `hf`, `bench`, `widgets` and the CLI on top.
This module only gathers the public names.
"""

from .backends import ExpertsInterface
from .core.config import MoEConfig
from .core.memory_guard import MemoryGuardError, memory_guard, set_memory_guard
from .core.stage import Stage, current_stage, generation_stage, stage_label
from .core.steps import record_step
from .layer import Experts, GlobalLoad, RouterOutput, SparseMoE, TopKRouter, load_balancing_loss, router_z_loss
from . import memory
from .inspection import Trace, inspect  # the function `moelab.inspect`; its classes: `moelab.inspection`
from .models import (GenerateOutput, KVCache, MoEForCausalLM, MoEModelConfig, MoEVisionConfig, MultiBackboneConfig,
                     MultiBackboneForCausalLM, RMSNorm, decode_backends, load_pretrained, synthetic_pixel_values)
from .models.io import package_version
from . import data, training
from . import hf  # registers the transformers inspection adapter (imports no transformers until used)

__version__ = package_version()

__all__ = [
    "ExpertsInterface", "MoEConfig", "Experts", "SparseMoE", "RouterOutput", "TopKRouter",
    "load_balancing_loss", "router_z_loss", "GlobalLoad", "record_step",
    "inspect", "memory", "Trace", "data", "training",
    "GenerateOutput", "load_pretrained", "KVCache", "MoEForCausalLM", "MoEModelConfig", "RMSNorm", "MoEVisionConfig",
    "MultiBackboneConfig", "MultiBackboneForCausalLM", "synthetic_pixel_values", "decode_backends",
    "Stage", "current_stage", "generation_stage", "stage_label",
    "MemoryGuardError", "memory_guard", "set_memory_guard",
]
