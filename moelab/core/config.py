"""`MoEConfig`: the sizes and choices of one MoE layer, validated when it is made; the checks all configs use."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .activations import ACTIVATIONS

ROUTER_SCORINGS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probs")


def check_int(name: str, value, low: int, high: int | None = None, high_name: str | None = None) -> None:
    # bool is an int subclass: True would silently mean 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        upper = f"{high_name} = {high}" if high_name else (str(high) if high is not None else "inf")
        raise ValueError(f"{name} must be in [{low}, {upper}], got {value}")


def check_float(name: str, value, low: float = 0.0, inclusive: bool = False) -> None:
    """ValueError naming `name` unless `value` is a finite int or float > `low` (>= with `inclusive`; bool refused)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < low or (value == low and not inclusive)):
        raise ValueError(f"{name} must be a finite float {'>=' if inclusive else '>'} {low}, got {value!r}")


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

    The training mechanics, all off by default (the defaults give today's outputs; `moelab.layer.router` says how
    each works and where it comes from):
    router_scoring: "softmax" (OLMoE, Qwen2-MoE, Mixtral) or "sigmoid" (DeepSeek-V3: each expert scored on its own,
        the scores do not sum to 1).
    router_jitter: epsilon of the Switch Transformer's multiplicative jitter `x * U(1 - eps, 1 + eps)` on the router
        input, in training mode only; 0 is off.
    expert_bias: aux-loss-free balancing (DeepSeek-V3): a float32 bias per expert added to the scores for the top-k
        choice only, moved by `expert_bias_update_rate` after each optimizer step (`TopKRouter.update_expert_bias`).
    capacity_factor: None (dropless) or the GShard/Switch capacity factor in training mode: each expert keeps at most
        C = ceil(capacity_factor * T * k / E) of the layer's pairs, the rest are dropped (weight 0).
    eval_capacity_factor: the same in eval mode; None is dropless.
    drop_policy: which pairs an over-full expert keeps: "position" (GShard's order: every token's first choice
        before any second choice, earlier tokens first) or "probs" (the highest router scores; Megatron, DeepSpeed).
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
    router_scoring: str = "softmax"
    router_jitter: float = 0.0
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    drop_policy: str = "position"

    def __post_init__(self) -> None:
        check_int("hidden_size", self.hidden_size, 1)
        check_int("intermediate_size", self.intermediate_size, 1)
        check_int("num_experts", self.num_experts, 1)
        check_int("top_k", self.top_k, 1, self.num_experts, "num_experts")
        check_int("shared_expert_intermediate_size", self.shared_expert_intermediate_size, 0)
        for name in ("norm_topk_prob", "top_k_weights_float32", "expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        check_float("initializer_range", self.initializer_range)
        if self.router_scoring not in ROUTER_SCORINGS:
            raise ValueError(f"router_scoring must be one of {list(ROUTER_SCORINGS)}, got {self.router_scoring!r}")
        check_float("router_jitter", self.router_jitter, low=0.0, inclusive=True)
        if self.router_jitter >= 1:
            raise ValueError(f"router_jitter must be in [0, 1) (it scales the router input by U(1 - eps, 1 + eps)), "
                             f"got {self.router_jitter!r}")
        check_float("expert_bias_update_rate", self.expert_bias_update_rate)
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name))
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {list(DROP_POLICIES)}, got {self.drop_policy!r}")

    def capacity_factor_for(self, training: bool) -> float | None:
        """The capacity factor of a forward in training (`capacity_factor`) or eval mode (`eval_capacity_factor`)."""
        return self.capacity_factor if training else self.eval_capacity_factor
