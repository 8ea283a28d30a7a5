"""The configs of moelab's models (`MoEModelConfig`, `MoEVisionConfig`, `MultiBackboneConfig`) and the check of
their token ids (`check_input_ids`).

Dimension letters as declared in `moelab.core`: B batch, N new positions in a forward, H hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core.config import DictConfig, MoEConfig, check_float, check_int
from ..layer.losses import SCOPES


def moe_config_of(moe, hidden_size: int, field: str, num_experts: int) -> MoEConfig:
    """`moe` as a MoEConfig whose hidden_size matches; None -> the tiny default (2*H wide, top-2)."""
    if moe is None:
        return MoEConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_experts=num_experts, top_k=2)
    if isinstance(moe, dict):
        moe = MoEConfig.from_dict(moe)
    if not isinstance(moe, MoEConfig):
        raise ValueError(f"{field} must be a moelab.MoEConfig, a dict of its fields or None, got {type(moe).__name__}")
    if moe.hidden_size != hidden_size:
        raise ValueError(f"{field}.hidden_size ({moe.hidden_size}) must equal hidden_size ({hidden_size})")
    return moe


def check_heads(hidden_size: int, num_attention_heads: int, rotary: bool) -> None:
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
    hidden_size: H, the width of the residual stream (and of every MoE layer).
    num_hidden_layers: decoder layers, each attention + SparseMoE.
    num_attention_heads: nh, must divide hidden_size, with an even head dim (rotary embeddings).
    max_position_embeddings: the longest sequence (prompt + generated) the model accepts.
    rms_norm_eps, rope_theta, initializer_range: as in transformers (std of the normal init of non-MoE weights).
    moe: the `MoEConfig` of every layer's MoE block (its hidden_size must equal hidden_size); None gives
        8 experts, top_k 2, intermediate_size 2 * hidden_size.
    router_aux_loss_coef: weight of the load-balancing loss (summed over layers) in `loss`; 0 leaves it out.
    router_z_loss_coef: weight of the router z-loss (summed over layers) in `loss`; 0 leaves it out.
    router_aux_loss_scope: "batch", "sequence" or "global", as `moelab.load_balancing_loss` takes it.
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
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    router_aux_loss_scope: str = "batch"

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, 1)
        check_float("router_aux_loss_coef", self.router_aux_loss_coef, inclusive=True)
        check_float("router_z_loss_coef", self.router_z_loss_coef, inclusive=True)
        if self.router_aux_loss_scope not in SCOPES:
            raise ValueError(f"router_aux_loss_scope must be one of {list(SCOPES)}, got "
                             f"{self.router_aux_loss_scope!r}")
        check_int("hidden_size", self.hidden_size, 1)
        check_int("num_hidden_layers", self.num_hidden_layers, 1)
        check_int("num_attention_heads", self.num_attention_heads, 1, self.hidden_size, "hidden_size")
        check_int("max_position_embeddings", self.max_position_embeddings, 1)
        check_heads(self.hidden_size, self.num_attention_heads, rotary=True)
        check_float("rms_norm_eps", self.rms_norm_eps)
        check_float("rope_theta", self.rope_theta)
        check_float("initializer_range", self.initializer_range)
        self.moe = moe_config_of(self.moe, self.hidden_size, "moe", num_experts=8)


@dataclass
class MoEVisionConfig(DictConfig):
    """The vision backbone: square images of `image_size` cut into `patch_size` patches.

    moe: the MoEConfig of each vision layer (hidden_size must equal hidden_size); None gives 4 experts, top_k 2.
    """

    image_size: int = 16
    patch_size: int = 4
    num_channels: int = 3
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, 1)
        check_int("patch_size", self.patch_size, 1, self.image_size, "image_size")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        check_int("num_channels", self.num_channels, 1)
        check_int("hidden_size", self.hidden_size, 1)
        check_int("num_hidden_layers", self.num_hidden_layers, 1)
        check_int("num_attention_heads", self.num_attention_heads, 1, self.hidden_size, "hidden_size")
        check_heads(self.hidden_size, self.num_attention_heads, rotary=False)
        check_float("rms_norm_eps", self.rms_norm_eps)
        check_float("initializer_range", self.initializer_range)
        self.moe = moe_config_of(self.moe, self.hidden_size, "moe", num_experts=4)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class MultiBackboneConfig:
    """A text backbone and a vision backbone; each is a sub-config with its own MoE layers (and backend)."""

    text_config: MoEModelConfig = field(default_factory=MoEModelConfig)
    vision_config: MoEVisionConfig = field(default_factory=MoEVisionConfig)
    sub_configs: ClassVar[tuple[str, ...]] = ("text_config", "vision_config")

    def __post_init__(self) -> None:
        for name, config_class in (("text_config", MoEModelConfig), ("vision_config", MoEVisionConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, config_class.from_dict(value))
            elif not isinstance(value, config_class):
                raise ValueError(f"{name} must be a moelab.{config_class.__name__} or a dict of its fields, "
                                 f"got {type(value).__name__}")

    def to_dict(self) -> dict:
        return {"text_config": self.text_config.to_dict(), "vision_config": self.vision_config.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "MultiBackboneConfig":
        unknown = set(d) - set(cls.sub_configs)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid fields are "
                             f"{list(cls.sub_configs)}")
        return cls(**d)


def check_input_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    """ValueError naming `name` unless it is an int64 / int32 tensor [B, N] with N >= 1 and ids in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes (not uint8, int16, ...)
        raise ValueError(f"{name} must be an integer tensor of int64 or int32, got {input_ids.dtype}; convert it "
                         f"with .long()")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"{name} must have shape [batch, seq_len] with both >= 1, got {list(input_ids.shape)}"
                         + (" (use input_ids[None] for a single sequence)" if input_ids.dim() == 1 else ""))
    # NOTE: reading the values syncs with the host; skipped while torch.compile traces.
    if not torch.compiler.is_compiling():
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} values must be in [0, vocab_size = {vocab_size}), "
                             f"got values in [{int(low)}, {int(high)}]")
