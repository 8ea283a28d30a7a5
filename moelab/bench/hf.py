"""transformers' own experts backends on moelab's weights, for side-by-side timing (`--compare-transformers`).

The adapter is deliberately small: an `OlmoeExperts` (transformers' model class with the `[E, 2I, H]` /
`[E, H, I]` layout moelab uses) whose two parameters are copied 1:1 from a moelab `Experts`. The full model
conversion lives elsewhere; this is only what a benchmark needs. transformers is imported lazily.
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
    """An `OlmoeExperts` with moelab `experts`' weights copied 1:1 (same dtype and device)."""
    require_transformers()
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    act = {v: k for k, v in _activation_names().items()}.get(experts.act_fn)
    if act is None:
        raise ValueError(f"no transformers activation name for {experts.act_fn}")
    config = OlmoeConfig(hidden_size=experts.hidden_size, intermediate_size=experts.intermediate_size,
                         num_experts=experts.num_experts, num_experts_per_tok=1, hidden_act=act)
    config._experts_implementation = "eager"
    with torch.device("meta"):
        module = OlmoeExperts(config)
    module = module.to_empty(device=experts.gate_up_proj.device).to(experts.gate_up_proj.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(experts.gate_up_proj)  # [E, 2I, H], gate rows first in both
        module.down_proj.copy_(experts.down_proj)  # [E, H, I]
    return module


def _activation_names() -> dict:
    from ..activations import ACTIVATIONS

    return {"silu": ACTIVATIONS["silu"], "gelu": ACTIVATIONS["gelu"], "relu": ACTIVATIONS["relu"]}


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
