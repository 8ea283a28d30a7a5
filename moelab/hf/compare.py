"""moelab's backends against transformers' own, on identical weights; and per-layer views of a model's trace."""

from __future__ import annotations

import pandas as pd
import torch

from ..core.dtypes import parse_dtype
from ..inspection import inspect
from ..memory.plots import new_figure
from .convert import FAMILIES, from_transformers
from .inspect_adapter import NAMESAKE_BACKENDS, find_moe_layers
from .models import tiny_model

__all__ = ["compare_with_transformers", "parity_table", "inspect_each_backend", "steps_side_by_side",
           "tokens_per_expert_by_layer", "plot_tokens_per_expert_by_layer"]


@torch.no_grad()
def compare_with_transformers(model, hidden_states: torch.Tensor | None = None, *, backends=NAMESAKE_BACKENDS,
                              num_tokens: int = 16, seed: int = 0) -> pd.DataFrame:
    """Every MoE block of the transformers `model`, every backend: transformers' block running its own backend
    vs `moelab.SparseMoE` with the block's weights running moelab's, on the same input, outside any inspection.

    hidden_states: [T, H] or [B, S, H] in the model's dtype (default: `num_tokens` draws from N(0, 1) under
    `seed`). One row per (layer, backend): `max_abs_diff` = max |moelab - transformers|, `max_abs_output` =
    max |transformers|. The model's experts implementation is restored afterwards.
    """
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers MoE block")
    weight = layers[0].experts.gate_up_proj
    if hidden_states is None:
        hidden_states = torch.randn(1, num_tokens, weight.shape[-1], generator=torch.Generator().manual_seed(seed))
        hidden_states = hidden_states.to(weight.dtype)
    if hidden_states.dim() == 2:
        hidden_states = hidden_states[None]  # the blocks take [B, S, H]
    before = model.get_experts_implementation()
    rows = []
    try:
        for backend in backends:
            model.set_experts_implementation(backend)
            for layer in layers:
                theirs = layer.block(hidden_states)
                ours = from_transformers(layer.block, experts_implementation=backend)(hidden_states)
                rows.append({"layer": layer.name, "backend": backend, "dtype": str(weight.dtype).removeprefix("torch."),
                             "max_abs_diff": (ours.float() - theirs.float()).abs().max().item(),
                             "max_abs_output": theirs.float().abs().max().item()})
    finally:
        model.set_experts_implementation(before)
    return pd.DataFrame(rows)


def parity_table(families=tuple(FAMILIES), dtypes=("float32", "bfloat16"), backends=NAMESAKE_BACKENDS, *,
                 num_tokens: int = 64, seed: int = 0, **model_kwargs) -> pd.DataFrame:
    """`compare_with_transformers` on a `tiny_model(family, dtype=dtype, seed=seed, **model_kwargs)` of each family
    and dtype: one row per (family, backend, dtype) with the largest difference over the model's layers."""
    frames = []
    for family in families:
        for dtype in dtypes:
            model = tiny_model(family, dtype=parse_dtype(dtype), seed=seed, **model_kwargs)
            frame = compare_with_transformers(model, backends=backends, num_tokens=num_tokens, seed=seed)
            frames.append(frame.assign(family=family))
    table = pd.concat(frames).groupby(["family", "backend", "dtype"], sort=False, as_index=False)
    return table.agg(max_abs_diff=("max_abs_diff", "max"), max_abs_output=("max_abs_output", "max"),
                     layers=("layer", "nunique"))


@torch.no_grad()
def inspect_each_backend(model, *args, backends=NAMESAKE_BACKENDS, **kwargs) -> dict:
    """{backend: Trace} of `model(*args, **kwargs)` run once per backend under `moelab.inspect`, the model switched
    to that backend first (`model.set_experts_implementation`); its experts implementation is restored after."""
    before = model.get_experts_implementation()
    traces = {}
    try:
        for backend in backends:
            model.set_experts_implementation(backend)
            with inspect(model) as trace:
                model(*args, **kwargs)
            traces[backend] = trace
    finally:
        model.set_experts_implementation(before)
    return traces


def steps_side_by_side(traces: dict, call: int = 0) -> pd.DataFrame:
    """One column per backend: the steps of call `call` of its trace, in order (eager's run of `expert` steps shown
    once, as `expert x n`)."""
    columns = {}
    for backend, trace in traces.items():
        names = []
        for step in trace.calls[call].steps:
            if names and step.name == "expert" and names[-1][0] == "expert":
                names[-1][1] += 1
            else:
                names.append([step.name, 1])
        columns[backend] = [name if count == 1 else f"{name} x {count}" for name, count in names]
    length = max(len(c) for c in columns.values())
    frame = pd.DataFrame({b: c + [""] * (length - len(c)) for b, c in columns.items()})
    frame.index.name = "step"
    return frame


def tokens_per_expert_by_layer(trace, stage: str | None = "any") -> pd.DataFrame:
    """Pairs routed to each expert, summed over the calls of each layer: rows = layers (in order), columns =
    expert ids. `stage`: "any" (all calls), None (plain forwards), "prefill" or "decode"."""
    counts: dict[str, torch.Tensor] = {}
    for call in trace.calls:
        if stage != "any" and call.stage != stage:
            continue
        routes = call.find("route")
        if not routes or "tokens_per_expert" not in routes[0].tensors:
            continue
        per_expert = routes[0].tensors["tokens_per_expert"].detach().cpu().long()
        counts[call.layer] = counts[call.layer] + per_expert if call.layer in counts else per_expert
    if not counts:
        raise ValueError(f"no call with a route step{'' if stage == 'any' else f' in stage {stage!r}'} in this trace")
    frame = pd.DataFrame({layer: c.numpy() for layer, c in counts.items()}).T
    frame.index.name, frame.columns.name = "layer", "expert"
    return frame


def plot_tokens_per_expert_by_layer(trace, stage: str | None = "any", *, ax=None):
    """Heatmap layers x experts of `tokens_per_expert_by_layer`, each cell annotated with its count."""
    frame = tokens_per_expert_by_layer(trace, stage)
    if ax is None:
        fig = new_figure(figsize=(1.0 + 0.55 * frame.shape[1], 1.2 + 0.45 * frame.shape[0]))
        ax = fig.add_subplot()
    image = ax.imshow(frame.to_numpy(), aspect="auto", cmap="Blues", vmin=0, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="pairs routed (count)")
    for (i, j), value in pd.DataFrame(frame.to_numpy()).stack().items():
        ax.text(j, i, str(value), ha="center", va="center", fontsize="small",
                color="white" if value > frame.to_numpy().max() * 0.6 else "black")
    ax.set_xticks(range(frame.shape[1]))
    ax.set_yticks(range(frame.shape[0]), frame.index)
    ax.set_xlabel("expert (id)")
    ax.set_ylabel("MoE layer")
    ax.set_title("Tokens per expert, layer by layer")
    return ax.figure
