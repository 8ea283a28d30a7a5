"""transformers' own experts backends on moelab's weights, for side-by-side timing (`--compare-transformers`).

The experts module comes from `moelab.hf`'s conversion (transformers' own class, sharing moelab's `[E, 2I, H]` /
`[E, H, I]` parameters); this file only names transformers' backend functions. transformers is imported lazily.
"""

from __future__ import annotations

import torch

INSTALL_HINT = "pip install -e .[hf]  (or: pip install 'transformers>=5')"
BACKENDS = ("eager", "batched_mm", "grouped_mm")


def require_transformers():
    """The transformers module, or an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"--compare-transformers needs transformers >= 5, which is not installed: "
                          f"{INSTALL_HINT}") from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"--compare-transformers needs transformers >= 5, found {transformers.__version__}: "
                          f"{INSTALL_HINT}")
    return transformers


def transformers_experts(experts) -> torch.nn.Module:
    """transformers' experts module on moelab `experts`' own weights: `moelab.hf.transformers_experts`, shared 1:1."""
    require_transformers()
    from ..hf import transformers_experts as to_transformers_experts

    return to_transformers_experts(experts, backend="eager")  # the backend itself is picked by `backend(name)`


def backend(name: str):
    """transformers' function for `name`: fn(module, hidden_states, top_k_index, top_k_weights) -> [T, H].

    batched_mm / grouped_mm are the functions of its `ExpertsInterface`; eager is the model class's own forward
    (the one `use_experts_implementation` wraps).
    """
    require_transformers()
    if name not in BACKENDS:
        raise ValueError(f"transformers has no experts backend {name!r} to compare; choose from {list(BACKENDS)}")
    if name == "eager":
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

        return OlmoeExperts.forward.__wrapped__
    from transformers.integrations import moe

    return {"batched_mm": moe.batched_mm_experts_forward, "grouped_mm": moe.grouped_mm_experts_forward}[name]
