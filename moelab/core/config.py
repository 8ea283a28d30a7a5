"""`MoEConfig`: the sizes and choices of one MoE layer, validated when it is made; the checks all configs use."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .activations import ACTIVATIONS


def check_int(name: str, value, low: int, high: int | None = None, high_name: str | None = None) -> None:
    # bool is an int subclass: True would silently mean 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        upper = f"{high_name} = {high}" if high_name else (str(high) if high is not None else "inf")
        raise ValueError(f"{name} must be in [{low}, {upper}], got {value}")


def check_float(name: str, value, low: float = 0.0) -> None:
    """ValueError naming `name` unless `value` is a finite int or float > `low` (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
        raise ValueError(f"{name} must be a finite float > {low}, got {value!r}")


class DictConfig:
    """`to_dict` / `from_dict` for the config dataclasses (JSON in `save_pretrained`); unknown keys are refused."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid fields are {sorted(known)}")
        return cls(**d)


@dataclass
class MoEConfig(DictConfig):
    """The config of one MoE layer.

    hidden_size: H, the width of a token.
    intermediate_size: I, the width inside one expert (its gated MLP).
    num_experts: E, experts in the layer.
    top_k: k, experts each token is routed to, in [1, num_experts].
    norm_topk_prob: renormalise the k router probabilities to sum to 1 (OLMoE, Qwen2-MoE).
    top_k_weights_float32: keep the k routing weights in float32 (Mixtral: the experts then weigh and sum in
        float32) instead of casting them to the input dtype (OLMoE, Qwen2-MoE). Only matters below float32.
    hidden_act: the gate activation, one of `moelab.activations.ACTIVATIONS`.
    initializer_range: std of the normal init of every weight.
    shared_expert_intermediate_size: 0 (off), or the width of a Qwen2-MoE style shared expert: a gated MLP every
        token goes through, scaled by a sigmoid gate and added to the routed output.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    shared_expert_intermediate_size: int = 0
    top_k_weights_float32: bool = False

    def __post_init__(self) -> None:
        check_int("hidden_size", self.hidden_size, 1)
        check_int("intermediate_size", self.intermediate_size, 1)
        check_int("num_experts", self.num_experts, 1)
        check_int("top_k", self.top_k, 1, self.num_experts, "num_experts")
        check_int("shared_expert_intermediate_size", self.shared_expert_intermediate_size, 0)
        for name in ("norm_topk_prob", "top_k_weights_float32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        check_float("initializer_range", self.initializer_range)
