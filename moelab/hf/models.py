"""Tiny transformers MoE language models built from a config with random weights (nothing is downloaded)."""

from __future__ import annotations

import torch

from ..core.dtypes import parse_dtype
from ..core.config import MoEConfig
from .convert import family_spec, transformers_config

__all__ = ["tiny_model"]


def tiny_model(family: str = "olmoe", *, hidden_size: int = 32, intermediate_size: int = 64, num_experts: int = 8,
               top_k: int = 2, num_layers: int = 2, vocab_size: int = 64, norm_topk_prob: bool = False,
               shared_expert_intermediate_size: int = 48, num_attention_heads: int = 4, dtype="float32",
               seed: int = 0, experts_implementation: str = "grouped_mm"):
    """A `family` CausalLM (`"olmoe"`, `"qwen2_moe"`, `"mixtral"`) with `num_layers` MoE layers, in eval mode.

    Every weight except the norms is drawn from N(0, 1/hidden_size) under `seed` (outputs O(1), routing far from
    ties; the global RNG is left as it was). `shared_expert_intermediate_size` is used by `qwen2_moe` only;
    `norm_topk_prob` by `olmoe` and `qwen2_moe` (Mixtral always renormalises). Token ids 0, 1, 2 are pad, bos, eos.
    """
    spec = family_spec(family)
    config = MoEConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_experts=num_experts,
                       top_k=top_k, norm_topk_prob=True if spec.renormalises else norm_topk_prob,
                       initializer_range=hidden_size ** -0.5,
                       shared_expert_intermediate_size=shared_expert_intermediate_size if spec.shared_expert
                       else 0, top_k_weights_float32=spec.top_k_weights_float32)
    extra = {"intermediate_size": intermediate_size} if family == "qwen2_moe" else {}  # its dense MLP layers
    hf_config = transformers_config(
        config, family, vocab_size=vocab_size, num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, experts_implementation=experts_implementation, **extra)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG: keep it unchanged
        model = spec.causal_lm_class()(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * hidden_size ** -0.5)
    return model.to(parse_dtype(dtype))

