"""A tiny decoder-only MoE language model: embedding, N x (attention + SparseMoE), RMSNorm, LM head.

Small enough to generate with on a laptop CPU, shaped like OLMoE / Qwen2-MoE so that everything the reference
says about `experts_implementation` can be shown on it: the choice at construction and in `from_pretrained`,
switching at runtime, and the decode-time switch in `generate()` (see `moelab.generation`). The layers it is
built from (RMSNorm, rotary, KVCache, Attention, MoEBlock, MoEDecoder) are in `moelab.blocks`, re-exported here.

Dimension letters used in the shape comments:
    B  batch                  S  new tokens in this forward     L  tokens seen so far (past + S)
    D  hidden size            nh attention heads                hd head dim = D / nh
    V  vocab size
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from . import generation as _generation
from . import io as _io
from .blocks import Attention, KVCache, MoEBlock, MoEDecoder, RMSNorm, apply_rotary, rotary_cos_sin  # noqa: F401
from .config import DictConfig, MoEConfig, _check_int
from .moe import SparseMoE
from .selection import apply_selection, resolve_selection

MODEL_TYPES: dict[str, type] = {}  # model_type (as written in config.json) -> model class


# ---------------------------------------------------------------------------------------------- config


def _check_float(name: str, value, low: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
        raise ValueError(f"{name} must be a finite float > {low}, got {value!r}")


def _moe_config(moe, hidden_size: int, field: str, num_experts: int) -> MoEConfig:
    """`moe` as a MoEConfig whose hidden_size matches; None -> the tiny default (2*D wide, top-2)."""
    if moe is None:
        return MoEConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_experts=num_experts, top_k=2)
    if isinstance(moe, dict):
        moe = MoEConfig.from_dict(moe)
    if not isinstance(moe, MoEConfig):
        raise ValueError(f"{field} must be a moelab.MoEConfig, a dict of its fields or None, got {type(moe).__name__}")
    if moe.hidden_size != hidden_size:
        raise ValueError(f"{field}.hidden_size ({moe.hidden_size}) must equal hidden_size ({hidden_size})")
    return moe


def _check_heads(hidden_size: int, num_attention_heads: int, rotary: bool) -> None:
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                         f"({num_attention_heads})")
    if rotary and (hidden_size // num_attention_heads) % 2:
        raise ValueError(f"the head dim hidden_size / num_attention_heads = {hidden_size // num_attention_heads} "
                         f"must be even (rotary embeddings rotate pairs of channels)")


@dataclass
class MoEModelConfig(DictConfig):
    """The config of `MoEForCausalLM`; the defaults make a ~0.5M-parameter model that is fast on CPU.

    vocab_size: V, token ids are in [0, vocab_size).
    hidden_size: D, the width of the residual stream.
    num_hidden_layers: decoder layers, each attention + SparseMoE.
    num_attention_heads: nh, must divide hidden_size, with an even head dim (rotary embeddings).
    max_position_embeddings: the longest sequence (prompt + generated) the model accepts.
    rms_norm_eps, rope_theta, initializer_range: as in transformers (std of the normal init of non-MoE weights).
    moe: the `MoEConfig` of every layer's MoE block (its hidden_size must equal hidden_size); None gives
        8 experts, top_k 2, intermediate_size 2 * hidden_size.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("num_hidden_layers", self.num_hidden_layers, 1)
        _check_int("num_attention_heads", self.num_attention_heads, 1, self.hidden_size, "hidden_size")
        _check_int("max_position_embeddings", self.max_position_embeddings, 1)
        _check_heads(self.hidden_size, self.num_attention_heads, rotary=True)
        _check_float("rms_norm_eps", self.rms_norm_eps)
        _check_float("rope_theta", self.rope_theta)
        _check_float("initializer_range", self.initializer_range)
        self.moe = _moe_config(self.moe, self.hidden_size, "moe", num_experts=8)


# ---------------------------------------------------------------------------------------------- models


@torch.no_grad()
def init_weights(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    """Normal(0, std) for every Linear / Embedding in `module`, ones for RMSNorm; each SparseMoE inits itself.

    Drawn in float32 from one generator in module order, so a seed gives the same model in every dtype.
    A MoE layer gets a seed drawn from the same generator and keeps its own init (its own std).
    """
    if isinstance(module, SparseMoE):
        module.reset_parameters(int(torch.randint(0, 2**62, (), generator=generator)))
        return  # its inner modules are its business
    if isinstance(module, (nn.Linear, nn.Embedding)):
        values = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        module.weight.copy_(values)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, RMSNorm):
        module.weight.fill_(1.0)
    for child in module.children():
        init_weights(child, std, generator)


def check_input_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    """ValueError naming `name` unless it is an integer tensor [B, S] with S >= 1 and ids in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"{name} must have shape [batch, seq_len] with both >= 1, got {list(input_ids.shape)}"
                         + (" (use input_ids[None] for a single sequence)" if input_ids.dim() == 1 else ""))
    # NOTE: reading the values syncs with the host; skipped while torch.compile traces.
    if not torch.compiler.is_compiling():
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} values must be in [0, vocab_size = {vocab_size}), "
                             f"got values in [{int(low)}, {int(high)}]")


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V], one row per input token
    past_key_values: KVCache | None = None  # the cache, when use_cache
    loss: torch.Tensor | None = None  # next-token cross-entropy, when labels are given


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t + 1] from logits[:, t]; label -100 is ignored."""
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape {list(logits.shape[:2])}, got {got}")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(), ignore_index=-100)


class MoEPreTrainedModel(nn.Module):
    """What every moelab model shares: the `experts_implementation` selection, save/load and `generate()`.

    A subclass sets `config_class`, `model_type` (written into config.json), `sub_configs` (names of the
    backbones that may get their own backend; empty for a single backbone) and implements `_experts_groups()`.
    """

    config_class: type
    model_type: str
    sub_configs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "model_type" in cls.__dict__:
            MODEL_TYPES[cls.model_type] = cls

    # -- experts_implementation ---------------------------------------------------------------------------

    def _experts_groups(self) -> dict[str, list[SparseMoE]]:
        """Selection key ('' for a single backbone, else a sub-config name) -> the MoE layers it controls."""
        raise NotImplementedError

    def _init_experts_implementation(self, experts_implementation) -> None:
        self._experts_selection = resolve_selection(experts_implementation, self.sub_configs)
        apply_selection(self._experts_selection, self._experts_groups())

    def set_experts_implementation(self, experts_implementation: str | dict) -> None:
        """Switch backends at runtime, without reloading. A str applies to every backbone; a dict is keyed by
        `""` (all backbones) and/or sub-config names (that backbone, overriding `""`); missing keys keep their
        current backend. Every key and name is checked first: a bad call raises ValueError and changes nothing.
        """
        selection = resolve_selection(experts_implementation, self.sub_configs, self._experts_selection)
        apply_selection(selection, self._experts_groups())
        self._experts_selection = selection

    def get_experts_implementation(self) -> dict[str, str]:
        """The selection as a dict `{"": ..., sub_config: ...}`, accepted back by `set_experts_implementation`."""
        return dict(self._experts_selection)

    def moe_layers(self) -> dict[str, SparseMoE]:
        """Every MoE layer by its module name, e.g. {"model.layers.0.moe": SparseMoE, ...}."""
        return {name: module for name, module in self.named_modules() if isinstance(module, SparseMoE)}

    # -- the text side, as generate() sees it --------------------------------------------------------------

    @property
    def text_config(self) -> MoEModelConfig:
        return self.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _prefill_length(self, input_ids: torch.Tensor, **model_kwargs) -> int:
        """Positions the prefill forward fills in the decoder (the prompt, plus any image tokens)."""
        return input_ids.shape[1]

    def _finish_init(self, experts_implementation, dtype, device, seed) -> None:
        dtype = _io.resolve_dtype(dtype)  # also takes "bfloat16"
        self.reset_parameters(seed)
        self._init_experts_implementation(experts_implementation)
        if dtype is not None or device is not None:
            self.to(device=device, dtype=dtype)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-draw every weight; reproducible under `seed` (else from the global RNG)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        init_weights(self, self.text_config.initializer_range, generator)

    def extra_repr(self) -> str:
        return f"experts_implementation={self._experts_selection}"

    generate = _generation.generate
    save_pretrained = _io.save_pretrained
    from_pretrained = classmethod(_io.from_pretrained)


class MoEForCausalLM(MoEPreTrainedModel):
    """A tiny decoder-only MoE language model.

    >>> model = MoEForCausalLM(MoEModelConfig(), experts_implementation="grouped_mm", seed=0)
    >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)
    >>> out.sequences.shape, out.backends_used["prefill"]["model.layers.0.moe"]
    (torch.Size([1, 11]), 'grouped_mm')

    A single backbone: `get_experts_implementation()` returns `{"": name}` and the only dict key is `""`.
    Weights are drawn in float32 from `seed` (else the global RNG) and then cast to `dtype`.
    """

    config_class = MoEModelConfig
    model_type = "moelab_causal_lm"

    def __init__(self, config: MoEModelConfig | None = None, experts_implementation: str | dict | None = None, *,
                 dtype: torch.dtype | str | None = None, device=None, seed: int | None = None):
        super().__init__()
        config = MoEModelConfig() if config is None else config
        if not isinstance(config, MoEModelConfig):
            raise ValueError(f"config must be a moelab.MoEModelConfig, got {type(config).__name__}")
        self.config = config
        self.model = MoEDecoder(config, "eager")  # the backend is set from the selection in _finish_init
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._finish_init(experts_implementation, dtype, device, seed)

    def _experts_groups(self) -> dict[str, list[SparseMoE]]:
        return {"": [layer.moe for layer in self.model.layers]}

    def forward(self, input_ids: torch.Tensor, *, past_key_values: KVCache | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, S] -> logits [B, S, V]. With `use_cache` (implied by `past_key_values`) this forward's
        keys and values are appended to `past_key_values` (a new KVCache if None) and positions continue after
        the cached ones."""
        check_input_ids(input_ids, self.config.vocab_size)
        use_cache = use_cache or past_key_values is not None  # a given cache is always extended
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        inputs_embeds = self.model.embed_tokens(input_ids)  # [B, S, D]
        hidden_states = self.model(inputs_embeds, past_key_values)  # [B, S, D]
        logits = self.lm_head(hidden_states)  # [B, S, V]
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, past_key_values if use_cache else None, loss)
