"""`SparseMoE`: router + experts (+ an optional shared expert), the MoE block of OLMoE / Qwen2-MoE / Mixtral."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..core.activations import get_activation
from ..core.config import MoEConfig
from ..core.dtypes import DTYPES, parse_dtype
from .experts import Experts
from .router import RouterOutput, TopKRouter
from ..core.steps import record_step


class SharedExpert(nn.Module):
    """The Qwen2-MoE shared expert: one gated MLP that every token goes through, `down(act(gate(x)) * up(x))`.

    Same parameter names as transformers' `Qwen2MoeMLP`, so weights map 1:1.
    """

    def __init__(self, config: MoEConfig, device=None):
        super().__init__()
        H, I = config.hidden_size, config.shared_expert_intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False, device=device)
        self.up_proj = nn.Linear(H, I, bias=False, device=device)
        self.down_proj = nn.Linear(I, H, bias=False, device=device)
        self.act_fn = get_activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H] -> [T, H]."""
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class SparseMoE(nn.Module):
    """One MoE layer: `moe(x)` routes each token of `x` ([T, H] or [B, S, H]) to `top_k` experts.

    `experts_implementation` names the backend (see `moelab.ExpertsInterface.names()`); switch it at runtime
    with `set_experts_implementation`. Weights are drawn from N(0, initializer_range) in float32 and then cast,
    so the same `seed` gives the same model (rounded) in every dtype.

    With `config.shared_expert_intermediate_size > 0` the layer also has a Qwen2-MoE shared expert:
    `output = routed + sigmoid(shared_expert_gate(x)) * shared_expert(x)`, `shared_expert_gate` a Linear(H, 1).
    Off by default (`shared_expert` and `shared_expert_gate` are then None).
    """

    def __init__(self, config: MoEConfig, experts_implementation: str = "grouped_mm", *,
                 dtype: torch.dtype | str | None = None, device=None, seed: int | None = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a moelab.MoEConfig, got {type(config).__name__}")
        if dtype is not None:
            dtype = parse_dtype(dtype)  # "bfloat16" too; a dtype the layer cannot run is refused here
        self.config = config
        self.router = TopKRouter(config, device=device)
        self.experts = Experts(config, experts_implementation, device=device)
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(config, device=device)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, device=device)
        self.reset_parameters(seed)
        if dtype is not None:
            self.to(dtype)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) init of every weight; reproducible under `seed` (else the global RNG)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        params = [self.router.weight, self.experts.gate_up_proj, self.experts.down_proj]
        if self.shared_expert is not None:  # drawn last, so the routed weights do not depend on it
            params += [*self.shared_expert.parameters(), self.shared_expert_gate.weight]
        for param in params:
            values = torch.empty(param.shape, dtype=torch.float32).normal_(
                0.0, self.config.initializer_range, generator=generator)
            param.copy_(values)

    def set_experts_implementation(self, name: str) -> None:
        """Switch backend; an unknown name raises ValueError listing the valid ones and changes nothing."""
        self.experts.set_experts_implementation(name)

    def get_experts_implementation(self) -> str:
        return self.experts.get_experts_implementation()

    def count_per_expert(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """top_k_index [T, k] (or any ids) -> pairs per expert [E]."""
        return torch.bincount(top_k_index.reshape(-1), minlength=self.config.num_experts)

    def forward(self, hidden_states: torch.Tensor, return_router_output: bool = False):
        """hidden_states [T, H] or [B, S, H] -> same shape; with `return_router_output`, (output, RouterOutput)."""
        self.check_hidden_states(hidden_states)
        flat = hidden_states.reshape(-1, self.config.hidden_size)  # [T, H]
        routing = self.route(flat)
        output = self.routed_experts(flat, routing)  # [T, H]
        if self.shared_expert is not None:
            shared_output = self.shared_expert(flat)  # [T, H]
            shared_gate = F.sigmoid(self.shared_expert_gate(flat))  # [T, 1]
            record_step("shared_expert", "Every token also goes through the shared expert, scaled by a sigmoid gate "
                        "and added to the routed output.", shared_output=shared_output, shared_gate=shared_gate)
            output = output + shared_gate * shared_output  # [T, H], as Qwen2-MoE adds it
        output = output.view(hidden_states.shape)
        return (output, routing) if return_router_output else output

    def check_hidden_states(self, hidden_states) -> None:
        """A clear ValueError for anything but a [T, H] or [B, S, H] tensor of the layer's dtype."""
        hidden_size = self.config.hidden_size
        if not isinstance(hidden_states, torch.Tensor):
            raise ValueError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != hidden_size:
            raise ValueError(f"hidden_states must have shape [T, {hidden_size}] or [B, S, {hidden_size}], "
                             f"got {list(hidden_states.shape)}")
        if self.router.weight.dtype not in DTYPES.values():  # .to(torch.float8_e4m3fn): refused, as dtype= is
            raise ValueError(f"the layer's weights are {self.router.weight.dtype}, a dtype moelab cannot run; use "
                             f"one of {list(DTYPES)} (module.to(torch.float32))")
        if hidden_states.dtype != self.router.weight.dtype:
            raise ValueError(f"hidden_states dtype {hidden_states.dtype} does not match the layer's weights "
                             f"({self.router.weight.dtype}); cast the input or the module with .to(dtype)")

    def route(self, flat: torch.Tensor) -> RouterOutput:
        """flat [T, H] -> the router's choice, recorded as the `route` step."""
        routing: RouterOutput = self.router(flat)
        derived = {"tokens_per_expert": lambda: self.count_per_expert(routing.top_k_index)}
        drops = {}
        if self.router.has_capacity():  # shown only where pairs can drop, so dropless traces keep their steps
            drops["kept"] = ~routing.dropped  # [T, k]
            derived["dropped_per_expert"] = lambda: self.count_per_expert(routing.top_k_index[routing.dropped])
        record_step("route", "The router scores every expert, keeps the top k per token and renormalises"
                    + ("; pairs over an expert's capacity drop (weight 0)." if drops else "."),
                    router_logits=routing.router_logits, router_probs=routing.router_probs,
                    top_k_index=routing.top_k_index, top_k_weights=routing.top_k_weights, **drops, derived=derived)
        return routing

    def routed_experts(self, flat: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """flat [T, H] -> the weighted sum of each token's k experts [T, H] (the experts backend's call)."""
        dropped = routing.dropped if self.router.has_capacity() else None  # [T, k] or None
        return self.experts(flat, routing.top_k_index, routing.top_k_weights, dropped)
