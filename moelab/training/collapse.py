"""Router collapse by construction: tilt every router towards one expert, so that a run without balancing starts
collapsed (and stays so: the favoured expert is the one that learns), and a balancing method has to undo it.

A random init routes evenly; collapse in real runs comes from a small early advantage that training amplifies
(Shazeer et al. 2017, section 4). `tilt_router` plants that advantage deliberately, the same in every run, so that
"no balancing collapses, balancing recovers" is a property of the methods and not of a lucky seed.
"""

from __future__ import annotations

import torch

from ..core.config import check_float, check_int
from ..layer.moe import SparseMoE


@torch.no_grad()
def tilt_router(model: torch.nn.Module, input_ids: torch.Tensor, expert: int = 0,
                logit_offset: float = 0.6) -> dict[str, torch.Tensor]:
    """Raise `expert`'s router logit of every MoE layer by `logit_offset` for the mean token of `input_ids`.

    For each layer the mean input m [H] of the MoE block on `input_ids` is measured (one forward) and
    `logit_offset * m / |m|^2` added to `router.weight[expert]`: the logit of m goes up by exactly
    `logit_offset`, every token's by its projection on m. Returns {layer name: the mean input m}.
    """
    layers = model.moe_layers() if hasattr(model, "moe_layers") else {
        name: module for name, module in model.named_modules() if isinstance(module, SparseMoE)}
    if not layers:
        raise ValueError("model has no SparseMoE layer to tilt")
    num_experts = next(iter(layers.values())).config.num_experts
    check_int("expert", expert, 0, num_experts - 1, "num_experts - 1")
    check_float("logit_offset", logit_offset)
    means: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            hidden_states = args[0]
            means[name] = hidden_states.reshape(-1, hidden_states.shape[-1]).float().mean(dim=0)  # [H]
        return record

    handles = [moe.register_forward_pre_hook(hook(name)) for name, moe in layers.items()]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    # NOTE: the layers are tilted after the one forward, so each mean is that of the untilted model
    for name, moe in layers.items():
        mean = means[name]
        direction = mean / mean.pow(2).sum().clamp_min(1e-12)  # [H]: <direction, mean> = 1
        moe.router.weight[expert] += (logit_offset * direction).to(moe.router.weight.dtype)
    return means
