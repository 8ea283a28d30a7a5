"""`Experts`: the E gated MLPs of one MoE layer as 3D parameters, dispatching to a registered backend."""

from __future__ import annotations

import torch
from torch import nn

from ..core.activations import get_activation
from ..core.registry import ExpertsInterface
from ..core.config import MoEConfig
from ..core.dtypes import DTYPES
from ..core.memory_guard import check_experts_call
from ..backends.autograd import needs_autograd


class Experts(nn.Module):
    """gate_up_proj [E, 2I, H] (gate rows first, then up) and down_proj [E, H, I]: the transformers layout.

    `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], dropped=None) -> [T, H]` runs the
    backend named by `experts_implementation` (see `ExpertsInterface.names()`). `dropped` (bool [T, k], from the
    router's capacity) goes to the backends registered with `accepts_dropped=True`, which skip those pairs; any
    other backend computes them with weight 0 (the dropped pairs' weights are zeroed here), the same output.
    """

    def __init__(self, config: MoEConfig, experts_implementation: str = "grouped_mm", dtype=None, device=None):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(E, H, I, dtype=dtype, device=device))
        self.act_fn = get_activation(config.hidden_act)
        # the layer's capacity factors: the router drops by them, the `capacity` backend sizes its buffer by them
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.experts_implementation = ExpertsInterface.validate(experts_implementation)

    def capacity_factor_for(self, training: bool) -> float | None:
        """The capacity factor of a forward in training or eval mode (None: dropless), as the router's config."""
        return self.capacity_factor if training else self.eval_capacity_factor

    def set_experts_implementation(self, name: str) -> None:
        self.experts_implementation = ExpertsInterface.validate(name)  # raises before anything changes

    def get_experts_implementation(self) -> str:
        return self.experts_implementation

    def check_inputs(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """Raise a ValueError naming the bad argument; returns top_k_index as int64."""
        for name, t in (("hidden_states", hidden_states), ("top_k_index", top_k_index),
                        ("top_k_weights", top_k_weights)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape [T, {self.hidden_size}] (T tokens, hidden_size), "
                             f"got {list(hidden_states.shape)}")
        if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden_states.shape[0] or top_k_index.shape[1] < 1:
            raise ValueError(f"top_k_index must have shape [T, k] with T = {hidden_states.shape[0]} and k >= 1, "
                             f"got {list(top_k_index.shape)}")
        if top_k_weights.shape != top_k_index.shape:
            raise ValueError(f"top_k_weights must have the shape of top_k_index {list(top_k_index.shape)}, "
                             f"got {list(top_k_weights.shape)}")
        if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
            raise ValueError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
        param_dtype = self.gate_up_proj.dtype
        if param_dtype not in DTYPES.values():  # e.g. .to(torch.float8_e4m3fn): the kernels would raise deep inside
            raise ValueError(f"the experts' weights are {param_dtype}, a dtype moelab cannot run; use one of "
                             f"{list(DTYPES)} (module.to(torch.float32))")
        if hidden_states.dtype != param_dtype:
            raise ValueError(f"hidden_states dtype {hidden_states.dtype} does not match the experts' weights "
                             f"({param_dtype}); cast the input or the module with .to(dtype)")
        if top_k_weights.dtype not in (param_dtype, torch.float32):  # float32: MoEConfig.top_k_weights_float32
            raise ValueError(f"top_k_weights dtype {top_k_weights.dtype} does not match hidden_states "
                             f"({param_dtype}); the router casts its weights to the input dtype")
        for name, t in (("hidden_states", hidden_states), ("top_k_index", top_k_index),
                        ("top_k_weights", top_k_weights)):
            if t.device != self.gate_up_proj.device:
                raise ValueError(f"{name} is on {t.device} but the experts' weights are on {self.gate_up_proj.device}")
        if torch.compiler.is_compiling():
            # NOTE: reading the values is a host sync, which torch.compile cannot trace; an async assert compiles
            # into the graph (a RuntimeError at run time, on CPU at once), so a bad index never runs unchecked
            # (compiled grouped_mm would read out of its groups: garbage or NaN in bfloat16, a lost pair in float32)
            in_range = ((top_k_index >= 0) & (top_k_index < self.num_experts)).all()
            torch._assert_async(in_range, f"top_k_index values must be in [0, num_experts = {self.num_experts}) "
                                          "(checked inside the compiled graph, which cannot show the values)")
        elif top_k_index.numel():
            low, high = torch.aminmax(top_k_index)
            if low < 0 or high >= self.num_experts:
                raise ValueError(f"top_k_index values must be in [0, num_experts = {self.num_experts}), "
                                 f"got values in [{int(low)}, {int(high)}]")
        return top_k_index.long()

    def check_dropped(self, dropped, top_k_index) -> None:
        if not isinstance(dropped, torch.Tensor) or dropped.dtype != torch.bool or dropped.shape != top_k_index.shape:
            got = f"{dropped.dtype} {list(dropped.shape)}" if isinstance(dropped, torch.Tensor) else \
                type(dropped).__name__
            raise ValueError(f"dropped must be None or a bool tensor of the shape of top_k_index "
                             f"{list(top_k_index.shape)}, got {got}")
        if dropped.device != top_k_index.device:
            raise ValueError(f"dropped is on {dropped.device} but top_k_index is on {top_k_index.device}")

    def forward(self, hidden_states, top_k_index, top_k_weights, dropped=None):
        if torch.jit.is_tracing():
            # NOTE: a trace records one call's Python control flow and sizes: eager's loop over the experts hit,
            # the group sizes of the others. Replayed on another input it is silently wrong (eager traced at T=1,
            # run at T=32) or fails in the interpreter.
            raise RuntimeError("torch.jit.trace cannot record an MoE layer: which experts run, and on how many rows, "
                               "depends on the values of top_k_index, and a trace replays the example's routing "
                               "for every input; use torch.compile or torch.export, which keep it data-dependent")
        top_k_index = self.check_inputs(hidden_states, top_k_index, top_k_weights)
        backend = ExpertsInterface.get(self.experts_implementation)
        if dropped is not None:
            self.check_dropped(dropped, top_k_index)
        # before the backend allocates: its registered estimate against the memory this process may take
        check_experts_call(self.experts_implementation, self, hidden_states, top_k_index, dropped,
                           needs_autograd(self, hidden_states, top_k_weights))
        if dropped is None:
            output = backend(self, hidden_states, top_k_index, top_k_weights)  # [T, H]
        else:
            # NOTE: zeroed for every backend, so a dropped pair never counts even if a caller left its weight
            top_k_weights = top_k_weights.masked_fill(dropped, 0.0)
            if ExpertsInterface.accepts_dropped(self.experts_implementation):
                output = backend(self, hidden_states, top_k_index, top_k_weights, dropped=dropped)
            else:  # written to the transformers signature: valid ids, weight 0
                output = backend(self, hidden_states, top_k_index, top_k_weights)
        if not torch.compiler.is_compiling() and (not isinstance(output, torch.Tensor)
                                                  or output.shape != hidden_states.shape):
            got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise RuntimeError(f"experts backend {self.experts_implementation!r} returned {got}, "
                               f"expected a tensor of shape {list(hidden_states.shape)}")
        if output.device != hidden_states.device:  # a meta tensor has the shape and dtype but no values
            raise RuntimeError(f"experts backend {self.experts_implementation!r} returned a tensor on "
                               f"{output.device}, expected one on {hidden_states.device}")
        # NOTE: float32 top_k_weights (Mixtral) make the backends weigh and sum in float32: cast back, as transformers
        # does. A no-op (the same tensor) otherwise.
        return output.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, experts_implementation={self.experts_implementation!r}")
