"""transformers' own experts backends on moelab's weights, for side-by-side timing (`--compare-transformers`).

The experts module comes from `moelab.hf`'s conversion (transformers' own class, sharing moelab's `[E, 2I, H]` /
`[E, H, I]` parameters); this file only names transformers' backend functions. transformers is imported lazily,
through `moelab.hf.require_transformers` (which names the extra to install when it is missing).
"""

from __future__ import annotations

import importlib

import torch

from ..hf import FAMILIES, require_transformers
from ..hf import transformers_experts as hf_transformers_experts
from ..hf.inspect_adapter import NAMESAKE_BACKENDS


def transformers_experts(experts) -> torch.nn.Module:
    """transformers' experts module on moelab `experts`' own weights: `moelab.hf.transformers_experts`, shared 1:1."""
    return hf_transformers_experts(experts, backend="eager")  # the backend itself is picked by `backend(name)`


def backend(name: str):
    """transformers' function for `name` (one of `NAMESAKE_BACKENDS`):
    fn(module, hidden_states, top_k_index, top_k_weights) -> [T, H].

    batched_mm / grouped_mm are the functions of its `ExpertsInterface`; eager is the model class's own forward
    (the one `use_experts_implementation` wraps).
    """
    require_transformers()
    if name not in NAMESAKE_BACKENDS:
        raise ValueError(f"transformers has no experts backend {name!r} to compare; choose from "
                         f"{list(NAMESAKE_BACKENDS)}")
    if name == "eager":
        experts_class = FAMILIES["olmoe"].classes()[1]  # OlmoeExperts; the three families' classes are identical
        return experts_class.forward.__wrapped__
    moe = importlib.import_module("transformers.integrations.moe")
    return {"batched_mm": moe.batched_mm_experts_forward, "grouped_mm": moe.grouped_mm_experts_forward}[name]
