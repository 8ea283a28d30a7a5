"""Pictures of a trace: routing, tokens per expert, grouped_mm's permutation, and all of it in one `plot_trace`
(memory per step is `moelab.memory.plot_memory`, which takes a trace too); the rows each layout computes
(`layout_rows`, `plot_layout`, `plot_layouts`) live in `layouts` and are exported here too.

Every function draws with matplotlib (headless-safe: nothing here picks a backend or calls `show`), labels its
axes with units, and returns its Figure, which a notebook shows as the cell's value (`fig.savefig(...)` elsewhere). Functions take a `Trace` or a `Call`; `call=` picks the MoE call of a trace (default: the first).
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.collections import LineCollection

from ..core.colors import expert_colormap
from ..core.stage import stage_label
from ..memory.plots import MIB, new_axes, new_figure, plot_memory
from .layouts import LayoutRows, layout_rows, plot_layout, plot_layouts, source_call
from .records import Call

__all__ = ["plot_routing", "plot_tokens_per_expert", "plot_permutation", "backend_view", "plot_trace",
           "LayoutRows", "layout_rows", "plot_layout", "plot_layouts"]


_call = source_call  # a Call, or call number `call` of a Trace (`layouts.source_call`)


def _step(call, name: str, why: str):
    found = call.find(name)
    if not found:
        raise ValueError(f"call {call.index} ({call.layer}, backend {call.backend}) has no {name!r} step: {why}")
    step = found[0]
    if any(t.device.type == "meta" for t in step.tensors.values()):
        raise ValueError("this trace kept only shapes (keep_tensors=False); inspect with keep_tensors=True to plot")
    return step


def _title(call) -> str:
    return f"{call.layer} · {stage_label(call.stage, call.decode_step)} · {call.backend}"


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).numpy()


def _routing(call):
    step = _step(call, "route", "the router runs in SparseMoE; inspect the SparseMoE or the model, not Experts alone")
    return step.tensors["top_k_index"], step.tensors["top_k_weights"], step


def plot_routing(source, call: int = 0, *, what: str = "weights", ax=None):
    """Heatmap tokens x experts: the router weight each token gives each expert (0 where not in its top k);
    `what="probs"`: the full softmax over experts."""
    c = _call(source, call)
    index, weights, step = _routing(c)
    num_experts = step.tensors["router_probs"].shape[-1]
    if what == "weights":
        dense = torch.zeros(index.shape[0], num_experts, dtype=torch.float32)
        dense.scatter_(1, index.detach().cpu(), weights.detach().cpu().float())
        label = "router weight (top-k, as used)"
    elif what == "probs":
        dense = step.tensors["router_probs"].detach().cpu().float()
        label = "router probability (softmax)"
    else:
        raise ValueError(f"what must be 'weights' or 'probs', got {what!r}")
    fig, ax = new_axes(ax, figsize=(5.0, 5.5))
    image = ax.imshow(dense.numpy(), aspect="auto", cmap="Blues", vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel("expert (id)")
    ax.set_ylabel("token (position in the flattened batch)")
    ax.set_xticks(range(num_experts) if num_experts <= 32 else np.linspace(0, num_experts - 1, 9).astype(int))
    ax.set_title(f"Routing: {_title(c)}")
    return fig


def _tokens_per_expert(call) -> np.ndarray:
    for name in ("route", "offsets"):
        for step in call.find(name):
            if "tokens_per_expert" in step.tensors and step.tensors["tokens_per_expert"].device.type != "meta":
                return _numpy(step.tensors["tokens_per_expert"]).astype(int)
    experts = call.find("expert")
    if experts and call.sizes:
        counts = np.zeros(call.sizes["num_experts"], dtype=int)
        for step in experts:
            counts[step.info["expert_id"]] = step.tensors["token_idx"].shape[0]
        return counts
    raise ValueError(f"call {call.index} ({call.layer}, backend {call.backend}) recorded no tokens per expert")


def plot_tokens_per_expert(source, call: int = 0, *, ax=None):
    """One bar per expert: how many (token, expert) pairs it got; the dashed line is perfect balance T*k/E."""
    c = _call(source, call)
    counts = _tokens_per_expert(c)
    fig, ax = new_axes(ax)
    ax.bar(np.arange(len(counts)), counts, color="tab:blue", label="pairs routed")
    ax.axhline(counts.sum() / len(counts), color="tab:red", linestyle="--", label=f"balanced: T*k/E = "
               f"{counts.sum() / len(counts):.3g}")
    ax.set_xlabel("expert (id)")
    ax.set_ylabel("tokens per expert (pairs)")
    if len(counts) <= 32:
        ax.set_xticks(range(len(counts)))
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(f"Tokens per expert: {_title(c)}")
    return fig


def plot_permutation(source, call: int = 0, *, ax=None, max_lines: int = 256):
    """grouped_mm's sort: the expert id of every pair before (token order) and after (expert order), a line from
    each pair's old position to its new one, and the offsets (group ends) marked on the sorted row."""
    c = _call(source, call)
    sort = _step(c, "sort", "the permutation is grouped_mm's; this call ran another backend")
    offsets = _numpy(_step(c, "offsets", "grouped_mm records it after the sort").tensors["offsets"]).astype(int)
    perm = _numpy(sort.tensors["perm"]).astype(int)
    after = _numpy(sort.tensors["sorted_expert_ids"]).astype(int)
    before = np.empty_like(after)
    before[perm] = after  # pair perm[j] (token order) went to position j
    num_pairs, num_experts = len(perm), len(offsets)
    cmap, norm = expert_colormap(num_experts)  # E colours, not the palette's 10 or 20 bands
    fig, ax = new_axes(ax, figsize=(max(6.4, min(16.0, num_pairs / 8)), 3.6))
    extent = dict(aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    image = ax.imshow(before[None, :], extent=(-0.5, num_pairs - 0.5, 1.6, 2.4), **extent)
    ax.imshow(after[None, :], extent=(-0.5, num_pairs - 0.5, -0.4, 0.4), **extent)
    if num_pairs <= max_lines:
        segments = [((p, 1.6), (j, 0.4)) for j, p in enumerate(perm)]
        ax.add_collection(LineCollection(segments, colors="0.4", linewidths=0.6, alpha=0.7))
    ax.vlines(offsets - 0.5, -0.55, 0.55, colors="red", linewidth=1.5)
    ax.set_xlim(-0.5, num_pairs - 0.5)
    ax.set_ylim(-0.7, 2.6)
    ax.set_yticks([0, 2], ["after: sorted_expert_ids", "before: top_k_index.flatten()"])
    ax.set_xlabel("pair position (before: token*k + slot; after: sorted position)")
    fig.colorbar(image, ax=ax, label="expert id", ticks=range(num_experts) if num_experts <= 20 else None)
    ax.set_ylabel("order of the (token, expert) pairs")
    ax.set_title(f"Sort by expert: {_title(c)}\nred lines: offsets, where each expert's group of rows ends",
                 fontsize="medium")
    return fig


def backend_view(c, ax) -> None:
    """Draw on `ax` the picture of call `c`'s own backend: grouped_mm's permutation, batched_mm's duplicated
    weights, eager's expert mask, capacity's and block_aligned's rows (`plot_layout`); a note for any other."""
    if c.find("positions") or c.find("align"):  # capacity, block_aligned: their padding is the point
        plot_layout(c, ax=ax)
    elif c.find("sort") and c.find("offsets"):  # grouped_mm (block_aligned sorts too, into its own layout)
        plot_permutation(c, ax=ax)
    elif c.find("gather_weights"):
        step = _step(c, "gather_weights", "")
        copies = step.tensors["gate_up_weights"].nbytes + step.tensors["down_weights"].nbytes
        own = step.tensors["gate_up_proj"].nbytes + step.tensors["down_proj"].nbytes
        ax.bar([0, 1], [own / MIB, copies / MIB], color=["tab:gray", "tab:red"])
        ax.set_xticks([0, 1], ["expert weights\n(gate_up_proj + down_proj)", "per-pair copies\n(gathered)"])
        ax.set_ylabel("bytes (MiB)")
        ax.set_title(f"batched_mm duplicates {copies / own:.3g}x the expert weights", fontsize="medium")
    elif c.find("expert_mask"):
        mask = _numpy(_step(c, "expert_mask", "").tensors["expert_mask"]).sum(axis=1)  # [E, T]
        image = ax.imshow(mask, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0)
        ax.figure.colorbar(image, ax=ax, label="slots routed (count)")
        ax.set_xlabel("token (position)")
        ax.set_ylabel("expert (id)")
        ax.set_title("eager: the expert mask (summed over the k slots)", fontsize="medium")
    else:
        ax.text(0.5, 0.5, f"no picture for backend {c.backend!r}", ha="center", va="center")
        ax.set_axis_off()


def plot_trace(trace, call: int = 0):
    """Four panels for one call: routing heatmap, tokens per expert, the backend's own view (grouped_mm: the
    permutation; batched_mm: the duplicated weights; eager: the expert mask; capacity, block_aligned: the rows
    computed), memory per step."""
    c = _call(trace, call)
    fig = new_figure(figsize=(13, 9))
    axes = fig.subplots(2, 2)
    if c.find("route"):
        plot_routing(c, ax=axes[0, 0])
        plot_tokens_per_expert(c, ax=axes[0, 1])
    else:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no route step: inspect the SparseMoE\nor the model, not Experts alone",
                    ha="center", va="center")
            ax.set_axis_off()
    backend_view(c, axes[1, 0])
    estimate = c.memory_estimate()
    if estimate is not None:
        plot_memory(estimate, axes=[axes[1, 1]])
    else:
        axes[1, 1].text(0.5, 0.5, f"no memory model for backend {c.backend!r}", ha="center", va="center")
        axes[1, 1].set_axis_off()
    fig.suptitle(f"call {c.index}: {_title(c)}")
    return fig
