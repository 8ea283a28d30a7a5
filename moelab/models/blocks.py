"""The transformer pieces the models are built from: RMSNorm, rotary positions, the KV cache, attention, the
pre-norm attention + SparseMoE block and the decoder stack of those blocks. Dimension letters as declared in
`moelab.core` (B batch, N new positions, L positions seen so far, H hidden, nh heads, hd head dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MoEConfig
from ..layer.moe import SparseMoE
from .configs import MoEModelConfig



class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (bfloat16 sums of squares lose too much)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [N] -> cos, sin [N, hd]: the rotation angles of each position (RoPE, half-split layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [N, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [N, hd]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, nh, N, hd] rotated by the angles of its positions."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class KVCache:
    """The keys and values of every token seen so far, per layer: k, v [B, nh, L, hd].

    Decode feeds only the newest token; its query attends to the cached keys instead of recomputing them.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """Append this forward's key, value [B, nh, N, hd]; returns the layer's full k, v [B, nh, L, hd]."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


class Attention(nn.Module):
    """Multi-head self-attention; causal for the decoder, bidirectional for the vision encoder."""

    def __init__(self, hidden_size: int, num_heads: int, causal: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.causal = num_heads, hidden_size // num_heads, causal
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x, rotary=None, cache: KVCache | None = None, layer_idx: int = 0):
        B, N, H = x.shape  # batch, new positions, hidden
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, N, hd]
        k = self.k_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, N, hd]
        v = self.v_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, N, hd]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, nh, L, hd]
        L = k.shape[2]
        if not self.causal or N == 1:  # one new token may see every cached one
            out = F.scaled_dot_product_attention(q, k, v)
        elif L == N:  # no past: the plain causal triangle
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # N new positions after L - N cached ones: query i sits at position L - N + i
            mask = torch.ones(N, L, dtype=torch.bool, device=x.device).tril(diagonal=L - N)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, H))  # [B, N, H]


class MoEBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, hidden_size: int, num_heads: int, moe_config: MoEConfig, eps: float, causal: bool,
                 experts_implementation: str):
        super().__init__()
        self.input_norm = RMSNorm(hidden_size, eps)
        self.attn = Attention(hidden_size, num_heads, causal)
        self.post_attention_norm = RMSNorm(hidden_size, eps)
        self.moe = SparseMoE(moe_config, experts_implementation)

    def forward(self, x, rotary=None, cache: KVCache | None = None, layer_idx: int = 0,
                router_outputs: list | None = None):
        """x [B, N, H] -> [B, N, H]; appends this layer's RouterOutput to `router_outputs` when given."""
        x = x + self.attn(self.input_norm(x), rotary, cache, layer_idx)  # [B, N, H]
        if router_outputs is None:
            return x + self.moe(self.post_attention_norm(x))  # [B, N, H]
        moe_output, routing = self.moe(self.post_attention_norm(x), return_router_output=True)
        router_outputs.append(routing)
        return x + moe_output


class MoEDecoder(nn.Module):
    """The decoder stack: token embedding, causal MoE blocks with rotary positions, final norm."""

    def __init__(self, config: MoEModelConfig, experts_implementation: str):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoEBlock(config.hidden_size, config.num_attention_heads, config.moe, config.rms_norm_eps, causal=True,
                     experts_implementation=experts_implementation)
            for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, past_key_values: KVCache | None = None,
                router_outputs: list | None = None) -> torch.Tensor:
        """inputs_embeds [B, N, H] -> hidden states [B, N, H]; appends to `past_key_values` when given, and each
        layer's RouterOutput to `router_outputs`."""
        N = inputs_embeds.shape[1]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + N > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {past + N} (cached {past} + new {N}) exceeds "
                             f"max_position_embeddings = {self.config.max_position_embeddings}")
        positions = torch.arange(past, past + N, device=inputs_embeds.device)  # [N]
        rotary = rotary_cos_sin(positions, self.config.hidden_size // self.config.num_attention_heads,
                                self.config.rope_theta, inputs_embeds.dtype)  # cos, sin [N, hd]
        x = inputs_embeds
        for layer_idx, layer in enumerate(self.layers):
            x = layer(x, rotary, past_key_values, layer_idx, router_outputs)
        return self.norm(x)
