"""moelab.hf: point moelab at Hugging Face transformers MoE models (OLMoE, Qwen2-MoE, Mixtral).

Needs the optional extra: `pip install -e ".[hf]"` (transformers>=5). Importing `moelab.hf` never imports
transformers; each function does, and raises an ImportError naming the extra when it is missing.

- `from_transformers(block)` / `to_transformers(moe, family)` / `copy_weights(src, dst)`: weights both ways
  between a transformers MoE block and `moelab.SparseMoE` (same function, checked; see `moelab.hf.convert`).
- `transformers_experts(moe, backend)`: transformers' experts module running transformers' own `backend` on
  `moe`'s very expert weights, to compare moelab's backends with transformers'.
- `moelab_backends(model)`: while inside, the model's experts run moelab's same-named backends on their own
  weights (what `moelab.inspect(hf_model)` uses to show every step); everything is restored on exit.
- `tiny_model(family)`: a small OLMoE / Qwen2-MoE / Mixtral CausalLM with random weights (nothing downloaded);
  `compare_with_transformers(model)` / `parity_table()`: moelab's backends vs transformers' on identical weights;
  `inspect_each_backend(model, ids)` / `steps_side_by_side(traces)`: the backends side by side;
  `tokens_per_expert_by_layer(trace)`: a per-layer view of a trace.
"""

from ._require import INSTALL_HINT, require_transformers
from .convert import (FAMILIES, copy_weights, family_of, from_transformers, moe_config_from_block, to_transformers,
                      transformers_backends, transformers_config, transformers_experts)
from .inspect_adapter import HFMoELayer, find_moe_layers, is_transformers_model, moelab_backends, registered_name
from .models import tiny_model
from .compare import (compare_with_transformers, inspect_each_backend, parity_table, plot_tokens_per_expert_by_layer,
                      steps_side_by_side, tokens_per_expert_by_layer)

__all__ = [
    "INSTALL_HINT", "require_transformers", "FAMILIES", "copy_weights", "family_of", "from_transformers",
    "moe_config_from_block", "to_transformers", "transformers_backends", "transformers_config",
    "transformers_experts", "HFMoELayer", "find_moe_layers", "is_transformers_model", "moelab_backends",
    "registered_name", "tiny_model", "compare_with_transformers", "parity_table", "inspect_each_backend",
    "steps_side_by_side", "tokens_per_expert_by_layer", "plot_tokens_per_expert_by_layer",
]
