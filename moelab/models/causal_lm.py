"""A tiny decoder-only MoE language model: embedding, N x (attention + SparseMoE), RMSNorm, LM head.

Small enough to generate with on a laptop CPU, shaped like OLMoE / Qwen2-MoE so that everything the reference
says about `experts_implementation` can be shown on it: the choice at construction and in `from_pretrained`,
switching at runtime, and the decode-time switch in `generate()` (see `moelab.models.generation`). The layers it is
built from (RMSNorm, rotary, KVCache, Attention, MoEBlock, MoEDecoder) are in `moelab.models.blocks`; its config in
`moelab.models.configs`.

Dimension letters as declared in `moelab.core`: B batch, N new positions in this forward, L positions seen so far
(past + N), H hidden size, nh heads, hd = H / nh, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from ..core.dtypes import parse_dtype
from ..layer.losses import GlobalLoad
from ..layer.moe import SparseMoE
from ..layer.router import RouterOutput
from .aux_losses import router_losses
from . import generation, io
from .blocks import KVCache, MoEDecoder, RMSNorm
from .configs import MoEModelConfig, check_input_ids
from .selection import apply_selection, resolve_selection


# ---------------------------------------------------------------------------------------------- models


@torch.no_grad()
def init_weights(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    """Normal(0, std) for every Linear / Embedding in `module`, ones for RMSNorm; each SparseMoE inits itself.

    Drawn in float32 from one generator in module order, so a seed gives the same model in every dtype.
    A MoE layer gets a seed drawn from the same generator and keeps its own init (its own std).
    """
    if isinstance(module, SparseMoE):
        # NOTE: the seed is drawn on the CPU also under `with torch.device("meta")` (from_pretrained's skeleton)
        module.reset_parameters(int(torch.randint(0, 2**62, (), generator=generator, device="cpu")))
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


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, N, V], one row per input token
    past_key_values: KVCache | None = None  # the cache, when use_cache
    loss: torch.Tensor | None = None  # lm_loss + the weighted router losses, when labels are given
    aux_loss: torch.Tensor | None = None  # load-balancing loss summed over layers (labels or output_router_logits)
    z_loss: torch.Tensor | None = None  # router z-loss summed over layers (labels or output_router_logits)
    router_outputs: tuple[RouterOutput, ...] | None = None  # each MoE layer's routing, with output_router_logits
    lm_loss: torch.Tensor | None = None  # the next-token cross-entropy alone

    @property
    def router_logits(self) -> tuple[torch.Tensor, ...] | None:
        """Each layer's router logits [T, E], as transformers' MoE outputs name them."""
        return None if self.router_outputs is None else tuple(r.router_logits for r in self.router_outputs)


def model_output(config: MoEModelConfig, logits, past_key_values, labels, router_outputs: list | None,
                 output_router_logits: bool, batch_size: int, global_load) -> CausalLMOutput:
    """The output of a forward: the LM loss and, where routing was kept, the router losses weighed into `loss`."""
    lm_loss = causal_lm_loss(logits, labels) if labels is not None else None
    aux_loss = z_loss = None
    loss = lm_loss
    if router_outputs:
        aux_loss, z_loss = router_losses(router_outputs, config.router_aux_loss_scope, batch_size, global_load)
    if lm_loss is not None:  # NOTE: a 0 coefficient adds nothing, so today's loss (and its graph) is unchanged
        if config.router_aux_loss_coef:
            loss = loss + config.router_aux_loss_coef * aux_loss
        if config.router_z_loss_coef:
            loss = loss + config.router_z_loss_coef * z_loss
    return CausalLMOutput(logits, past_key_values, loss, aux_loss, z_loss,
                          tuple(router_outputs) if output_router_logits else None, lm_loss)


IGNORE_INDEX = -100  # a label the loss skips (transformers' convention)


def check_labels(labels, logits: torch.Tensor) -> None:
    """ValueError unless `labels` is an integer tensor [B, N] of token ids in [0, V) or -100, with at least one
    target: the loss predicts labels[:, 1:], so labels[:, 0] is never one (and N = 1 has none)."""
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape {list(logits.shape[:2])}, got {got}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    # NOTE: reading the values syncs with the host; skipped while torch.compile traces, as for input_ids.
    if torch.compiler.is_compiling():
        return
    targets = labels[:, 1:]
    kept = targets[targets != IGNORE_INDEX]
    if not kept.numel():  # cross_entropy would return NaN (0 / 0), which trains nothing and says nothing
        raise ValueError(f"labels leave nothing to predict: every label after the first position is "
                         f"{IGNORE_INDEX} (ignored), or the sequence has one position; the loss predicts "
                         f"labels[:, 1:] from the logits before them")
    low, high = torch.aminmax(kept)
    vocab_size = logits.shape[-1]
    if low < 0 or high >= vocab_size:
        raise ValueError(f"labels values must be in [0, vocab_size = {vocab_size}) or {IGNORE_INDEX} (ignored), "
                         f"got values in [{int(low)}, {int(high)}]")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t + 1] from logits[:, t]; label -100 is ignored."""
    check_labels(labels, logits)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                           ignore_index=IGNORE_INDEX)


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
            io.MODEL_TYPES[cls.model_type] = cls

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
        dtype = parse_dtype(dtype, allow_auto=True)  # also takes "bfloat16"
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

    generate = generation.generate
    save_pretrained = io.save_pretrained
    from_pretrained = classmethod(io.from_pretrained)


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
                labels: torch.Tensor | None = None, output_router_logits: bool = False,
                global_load: GlobalLoad | None = None) -> CausalLMOutput:
        """input_ids [B, N] -> logits [B, N, V]. With `use_cache` (implied by `past_key_values`) this forward's
        keys and values are appended to `past_key_values` (a new KVCache if None) and positions continue after
        the cached ones.

        With `labels` the output has `loss`, `lm_loss`, `aux_loss` and `z_loss`; with `output_router_logits` also
        each layer's `RouterOutput` (and the two router losses without labels). `global_load`: see
        `moelab.GlobalLoad`, for `router_aux_loss_scope="global"` under gradient accumulation."""
        check_input_ids(input_ids, self.config.vocab_size)
        use_cache = use_cache or past_key_values is not None  # a given cache is always extended
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        router_outputs = [] if labels is not None or output_router_logits else None
        inputs_embeds = self.model.embed_tokens(input_ids)  # [B, N, H]
        hidden_states = self.model(inputs_embeds, past_key_values, router_outputs)  # [B, N, H]
        logits = self.lm_head(hidden_states)  # [B, N, V]
        return model_output(self.config, logits, past_key_values if use_cache else None, labels, router_outputs,
                            output_router_logits, input_ids.shape[0], global_load)
