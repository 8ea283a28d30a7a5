"""The router's losses of a whole model: each MoE layer's balancing loss and z-loss, summed over the layers.

`MoEModelConfig.router_aux_loss_coef` and `router_z_loss_coef` weigh them into the training loss (0: not added,
the LM loss unchanged); `router_aux_loss_scope` says where the balancing loss counts (`moelab.load_balancing_loss`).
"""

from __future__ import annotations

import torch

from ..layer.losses import GlobalLoad, load_balancing_loss, router_z_loss
from ..layer.router import RouterOutput


def router_losses(router_outputs: list[RouterOutput], scope: str, batch_size: int,
                  global_load: GlobalLoad | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux_loss, z_loss), each summed over the layers' `RouterOutput`s (a balanced layer adds 1.0 to aux_loss).

    Every layer flattened [B, L] tokens to T = B * L, so `batch_size` B restores the sequences for the
    "sequence" scope. With scope "global", `global_load` accumulates each layer's counts over the micro-batches
    of one optimizer step; without one, the global batch is this call.
    """
    if not router_outputs:
        raise ValueError("router_losses needs the RouterOutput of at least one MoE layer")
    aux_terms, z_terms = [], []
    for layer, routing in enumerate(router_outputs):
        num_experts = routing.router_probs.shape[-1]
        if scope == "global":
            load = global_load if global_load is not None else GlobalLoad()
            counts = load.add(layer, routing.top_k_index, num_experts)  # [E], this step's micro-batches so far
            aux_terms.append(load_balancing_loss(routing, scope="global", tokens_per_expert=counts))
        else:
            aux_terms.append(load_balancing_loss(routing, scope=scope, batch_size=batch_size))
        z_terms.append(router_z_loss(routing.router_logits))
    return torch.stack(aux_terms).sum(), torch.stack(z_terms).sum()
