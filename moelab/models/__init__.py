"""moelab.models: tiny MoE language models that generate, built from `moelab.layer`.

- `configs`: `MoEModelConfig`, `MoEVisionConfig`, `MultiBackboneConfig`, and `check_input_ids`;
- `blocks`: RMSNorm, rotary positions, the KV cache, attention, the attention + MoE block, the decoder;
- `causal_lm`: `MoEForCausalLM` and `MoEPreTrainedModel`, what every model shares;
- `multibackbone`: `MultiBackboneForCausalLM`, a vision encoder and a text decoder with a backend each;
- `selection`: the per-backbone `experts_implementation` and the decode-time policy (`decode_backends`);
- `generation`: `generate()`, prefill then decode, with the stage published in `moelab.core.stage`;
- `io`: `save_pretrained` / `from_pretrained` / `load_pretrained` (local folders, safetensors + JSON).

Imports `moelab.core`, `moelab.backends` and `moelab.layer`; never inspection, memory, bench, hf or widgets.
"""

from .blocks import KVCache, RMSNorm
from .causal_lm import CausalLMOutput, MoEForCausalLM, MoEPreTrainedModel
from .configs import MoEModelConfig, MoEVisionConfig, MultiBackboneConfig, check_input_ids
from .generation import GenerateOutput
from .io import load_pretrained
from .multibackbone import MultiBackboneForCausalLM, patchify, synthetic_pixel_values
from .selection import decode_backends

__all__ = [
    "KVCache", "RMSNorm", "CausalLMOutput", "MoEForCausalLM", "MoEPreTrainedModel", "MoEModelConfig",
    "MoEVisionConfig", "MultiBackboneConfig", "check_input_ids", "GenerateOutput", "load_pretrained",
    "MultiBackboneForCausalLM", "patchify", "synthetic_pixel_values", "decode_backends",
]
