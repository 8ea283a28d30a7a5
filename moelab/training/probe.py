"""Route held-out batches through a model and keep what every layer chose: the measurements behind the claims of
the training notebooks (balance on held-out pairs, specialisation on planted topics, routing vs token id and
position), made in eval mode without gradients.

Dimension letters: B sequences, S positions, T = B * S tokens, k top-k, E experts, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batches import Batch


@dataclass
class RoutingSample:
    """What every MoE layer chose on some held-out tokens, with the tokens' ids, positions and topics."""

    top_k_index: list[torch.Tensor]  # per layer [T, k]
    dropped: list[torch.Tensor]  # per layer [T, k], bool
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T], the position of each token in its sequence
    topics: torch.Tensor | None  # [T], where the data knows them
    num_experts: int
    seq_len: int

    @property
    def num_pairs(self) -> int:
        return self.top_k_index[0].numel()

    def tokens_per_expert(self, layer: int) -> torch.Tensor:
        """Kept pairs per expert [E] of one layer."""
        kept = self.top_k_index[layer][~self.dropped[layer]]
        return torch.bincount(kept, minlength=self.num_experts)

    def max_mean_load(self) -> list[float]:
        """Per layer: the busiest expert's kept pairs over the mean (1.0 is perfect balance)."""
        result = []
        for layer in range(len(self.top_k_index)):
            load = self.tokens_per_expert(layer).double()
            result.append(float(load.max() / load.mean()))
        return result


@torch.no_grad()
def route_batches(model: torch.nn.Module, batches: list[Batch]) -> RoutingSample:
    """Run `batches` through `model` in eval mode (its mode restored after) and collect each layer's routing."""
    if not batches:
        raise ValueError("batches must hold at least one Batch")
    was_training = model.training
    model.eval()
    per_layer_index, per_layer_dropped = [], []
    ids, positions, topics = [], [], []
    try:
        for batch in batches:
            input_ids = batch.input_ids.to(model.device)  # [B, S]
            out = model(input_ids, output_router_logits=True)
            per_layer_index.append([r.top_k_index.cpu() for r in out.router_outputs])
            per_layer_dropped.append([r.dropped.cpu() for r in out.router_outputs])
            ids.append(batch.input_ids.reshape(-1))
            positions.append(torch.arange(batch.input_ids.shape[1]).repeat(batch.input_ids.shape[0]))
            if batch.topics is not None:
                topics.append(batch.topics.reshape(-1))
    finally:
        model.train(was_training)
    num_layers = len(per_layer_index[0])
    first_moe = next(iter(model.moe_layers().values()))
    return RoutingSample(
        top_k_index=[torch.cat([b[layer] for b in per_layer_index]) for layer in range(num_layers)],
        dropped=[torch.cat([b[layer] for b in per_layer_dropped]) for layer in range(num_layers)],
        input_ids=torch.cat(ids), positions=torch.cat(positions),
        topics=torch.cat(topics) if len(topics) == len(batches) else None,
        num_experts=first_moe.config.num_experts, seq_len=max(b.input_ids.shape[1] for b in batches))
