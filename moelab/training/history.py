"""The history of a run: one row per optimizer step, its columns named here, and the rows as a DataFrame.

Columns, in order: `step` (1-based), `loss` (what was minimised: lm_loss + the weighted router losses), `lm_loss`,
`aux_loss`, `z_loss` (each the mean over the step's micro-batches), `lr` (the step's learning rate), `grad_norm`
(before clipping), `tokens_per_s`, `val_loss` (NaN where not evaluated); then for each MoE layer l (0-based, in
`model.moe_layers()` order) `max_mean_load/{l}`, `drop_rate/{l}`, `router_entropy/{l}` (of the step's tokens, all
micro-batches together), `load/{l}/{e}` (kept pairs expert e received in the step) and, with expert bias on,
`bias/{l}/{e}` (after the step's update). `moelab.training.analysis` reads them back (`load_array`, ...).
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from ..layer import RouterOutput
from .analysis import LAYER_METRICS, routing_stats

BASE_COLUMNS = ("step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "val_loss")


def merge_router_outputs(outputs: list[RouterOutput]) -> RouterOutput:
    """One layer's RouterOutputs of a step's micro-batches as one, tokens concatenated: [sum of T, ...].

    A hand-built RouterOutput may leave `dropped` None (dropless): it counts as all kept.
    """
    if not outputs:
        raise ValueError("merge_router_outputs needs at least one RouterOutput")
    merged = RouterOutput(*(torch.cat([f.detach() for f in fields]) for fields in zip(*(o[:4] for o in outputs))))
    if all(o.dropped is None for o in outputs):
        return merged
    dropped = [torch.zeros_like(o.top_k_index, dtype=torch.bool) if o.dropped is None else o.dropped
               for o in outputs]  # [T_i, k] each
    return merged._replace(dropped=torch.cat(dropped))


def layer_stats(outputs_by_layer: list[list[RouterOutput]]) -> list[dict]:
    """`routing_stats` of each layer over the whole step (tokens_per_expert: kept pairs, LongTensor [E])."""
    return [routing_stats(merge_router_outputs(outputs)) for outputs in outputs_by_layer]


def _float(value) -> float:
    """A loss that may be absent (None: the model did not compute it) as a float; NaN when absent."""
    return math.nan if value is None else float(value)


def history_row(step: int, *, loss, lm_loss, aux_loss, z_loss, lr: float, grad_norm, tokens_per_s: float,
                val_loss: float | None, stats: list[dict], biases: list[torch.Tensor | None]) -> dict:
    """The row of one optimizer step. stats: `layer_stats` of the step; biases: each layer's expert_bias [E]
    after the step, or None (no bias columns for that layer)."""
    row = {"step": step, "loss": _float(loss), "lm_loss": _float(lm_loss), "aux_loss": _float(aux_loss),
           "z_loss": _float(z_loss), "lr": float(lr), "grad_norm": _float(grad_norm),
           "tokens_per_s": float(tokens_per_s), "val_loss": _float(val_loss)}
    for layer, (stat, bias) in enumerate(zip(stats, biases, strict=True)):
        for metric in LAYER_METRICS:
            row[f"{metric}/{layer}"] = float(stat[metric])
        for expert, count in enumerate(stat["tokens_per_expert"].tolist()):
            row[f"load/{layer}/{expert}"] = count
        if bias is not None:
            for expert, value in enumerate(bias.tolist()):
                row[f"bias/{layer}/{expert}"] = value
    return row


def history_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a DataFrame, one row per step (the base columns only while there are none)."""
    if not rows:
        return pd.DataFrame(columns=list(BASE_COLUMNS))
    return pd.DataFrame.from_records(rows)
