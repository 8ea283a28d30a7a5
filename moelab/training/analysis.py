"""Routing analyses for the training lab: pure functions over tensors, arrays and a trainer's history DataFrame.

- history accessors: `load_array`, `bias_array`, `metric_by_layer` (the `load/{l}/{e}`-style columns as arrays);
- balance: `max_mean_load`, and `routing_stats` (the per-layer numbers of one `RouterOutput`);
- specialisation: `specialisation_matrix` (expert x topic counts), `mutual_information`,
  `normalized_mutual_information`;
- token-id and position routing (OpenMoE, arXiv 2402.01739: routing is decided mostly by the token id, and
  more pairs are dropped toward the end of a sequence): `expert_by_token`, `token_id_routing_consistency`,
  `expert_by_position`, `drop_rate_by_position`.

Counts are over *kept* (token, expert) pairs: a pair marked in `dropped` ([T, k] bool, True = dropped by the
capacity limit) is left out. Letters are `moelab.core`'s (T tokens, k, E, V vocabulary, N positions of one
sequence, so T = B * N), plus:

    U  optimizer steps (rows of a history)    M  MoE layers    K  topics
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import torch

from ..core.config import check_int

__all__ = [
    "load_array", "bias_array", "metric_by_layer", "max_mean_load", "routing_stats", "specialisation_matrix",
    "mutual_information", "normalized_mutual_information", "expert_by_token", "token_id_routing_consistency",
    "expert_by_position", "drop_rate_by_position",
]

LAYER_METRICS = ("max_mean_load", "drop_rate", "router_entropy")  # history columns `{metric}/{l}`


# ------------------------------------------------------------------------------------------- history accessors

def _check_history(history) -> None:
    if not isinstance(history, pd.DataFrame):
        raise ValueError(f"history must be a pandas DataFrame (one row per optimizer step), "
                         f"got {type(history).__name__}")


def _grid_array(history, prefix: str) -> np.ndarray:
    """The `{prefix}/{l}/{e}` columns as float64 [U, M, E]; ValueError unless they cover a full M x E grid."""
    _check_history(history)
    pattern = re.compile(rf"^{re.escape(prefix)}/(\d+)/(\d+)$")
    cells = {}
    for column in history.columns:
        match = pattern.match(str(column))
        if match:
            cells[int(match.group(1)), int(match.group(2))] = column
    if not cells:
        raise ValueError(f"history has no '{prefix}/{{layer}}/{{expert}}' columns")
    num_layers = max(layer for layer, _ in cells) + 1
    num_experts = max(expert for _, expert in cells) + 1
    missing = [f"{prefix}/{l}/{e}" for l in range(num_layers) for e in range(num_experts) if (l, e) not in cells]
    if missing:
        raise ValueError(f"history's '{prefix}/...' columns must cover every layer x expert "
                         f"({num_layers} x {num_experts}); missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    columns = [cells[l, e] for l in range(num_layers) for e in range(num_experts)]
    values = history[columns].to_numpy(dtype=np.float64)  # [U, M * E]
    return values.reshape(len(history), num_layers, num_experts)


def load_array(history) -> np.ndarray:
    """Kept pairs each expert received at each step, from the `load/{l}/{e}` columns: float64 [U, M, E]."""
    return _grid_array(history, "load")


def bias_array(history) -> np.ndarray:
    """Each expert's bias after each step, from the `bias/{l}/{e}` columns (absent when expert bias is off):
    float64 [U, M, E]."""
    return _grid_array(history, "bias")


def metric_by_layer(history, metric: str) -> np.ndarray:
    """A per-layer metric's `{metric}/{l}` columns (e.g. "max_mean_load", "drop_rate", "router_entropy") as
    float64 [U, M]."""
    _check_history(history)
    pattern = re.compile(rf"^{re.escape(str(metric))}/(\d+)$")
    layers = {int(m.group(1)): c for c in history.columns if (m := pattern.match(str(c)))}
    if not layers:
        raise ValueError(f"history has no '{metric}/{{layer}}' columns (per-layer metrics: {list(LAYER_METRICS)})")
    missing = [l for l in range(max(layers) + 1) if l not in layers]
    if missing:
        raise ValueError(f"history's '{metric}/...' columns skip layers {missing}")
    return history[[layers[l] for l in range(len(layers))]].to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------------------------------- balance

def to_numpy(values, name: str) -> np.ndarray:
    """A tensor, array or nested list as a float64 array; ValueError naming `name` if it holds no numbers."""
    if torch.is_tensor(values):
        values = values.detach().cpu().double().numpy()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers (a tensor, an array or a list), "
                         f"got {type(values).__name__}") from None


def max_mean_load(tokens_per_expert):
    """Max over experts / mean over experts of the pairs each expert received: 1.0 when perfectly balanced, E
    when one expert takes everything. [E] -> float; [..., E] -> float64 array [...], one value a row. NaN where
    no pair was routed."""
    load = to_numpy(tokens_per_expert, "tokens_per_expert")  # [..., E]
    if load.ndim == 0 or load.shape[-1] == 0:
        raise ValueError(f"tokens_per_expert must be [E] or [..., E] with E >= 1, got shape {load.shape}")
    if (load < 0).any():
        raise ValueError("tokens_per_expert must be non-negative counts")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = load.max(axis=-1) / load.mean(axis=-1)  # [...]
    ratio = np.where(load.sum(axis=-1) > 0, ratio, np.nan)
    return float(ratio) if ratio.ndim == 0 else ratio


def _int_tensor(values, name: str) -> torch.Tensor:
    tensor = values if torch.is_tensor(values) else torch.as_tensor(np.asarray(values))
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must hold integer ids, got dtype {tensor.dtype}")
    return tensor.detach().long()


def _kept_mask(dropped, shape: torch.Size, device) -> torch.Tensor:
    """[T, k] bool, True = kept; every pair when `dropped` is None."""
    if dropped is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    dropped = dropped if torch.is_tensor(dropped) else torch.as_tensor(np.asarray(dropped))
    if dropped.dtype != torch.bool:
        raise ValueError(f"dropped must be a bool tensor (True = pair dropped), got dtype {dropped.dtype}")
    if dropped.numel() != math.prod(shape) or (dropped.dim() == 2 and dropped.shape != shape):
        raise ValueError(f"dropped must have top_k_index's shape {tuple(shape)}, got {tuple(dropped.shape)}")
    return ~dropped.detach().to(device).reshape(shape)


def _check_ids(ids: torch.Tensor, name: str, count: int, count_name: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count):
        raise ValueError(f"{name} must hold ids in [0, {count_name} = {count}), "
                         f"got values in [{int(ids.min())}, {int(ids.max())}]")


def _index_2d(top_k_index) -> torch.Tensor:
    index = _int_tensor(top_k_index, "top_k_index")
    if index.dim() == 1:
        index = index[:, None]  # plain expert ids: k = 1
    if index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k] (or [T] expert ids), got shape {tuple(index.shape)}")
    return index  # [T, k]


def routing_stats(router_output, num_experts: int | None = None) -> dict:
    """The per-layer numbers of one router call, from a `RouterOutput` (or anything with its fields):

    - tokens_per_expert: LongTensor [E] on the CPU, kept pairs each expert received;
    - max_mean_load: `max_mean_load(tokens_per_expert)`;
    - drop_rate: the fraction of the T*k pairs dropped (0.0 when the output has no `dropped`, or it is None);
    - router_entropy: the mean over tokens of the entropy (nats) of the token's router scores normalised to sum
      to 1 (sigmoid scores do not), in float64: log(E) for a uniform router, 0 for a one-hot one.
    """
    router_probs = router_output.router_probs.detach()  # [T, E]
    if router_probs.dim() != 2:
        raise ValueError(f"router_probs must be [T, E], got shape {tuple(router_probs.shape)}")
    num_experts = router_probs.shape[-1] if num_experts is None else num_experts
    check_int("num_experts", num_experts, 1)
    if router_probs.shape[-1] != num_experts:
        raise ValueError(f"num_experts = {num_experts} but router_probs has {router_probs.shape[-1]} experts")
    index = _index_2d(router_output.top_k_index)  # [T, k]
    if index.shape[0] != router_probs.shape[0]:
        raise ValueError(f"top_k_index has {index.shape[0]} tokens but router_probs has {router_probs.shape[0]}")
    _check_ids(index, "top_k_index", num_experts, "num_experts")
    kept = _kept_mask(getattr(router_output, "dropped", None), index.shape, index.device)  # [T, k]
    tokens_per_expert = torch.bincount(index[kept], minlength=num_experts).cpu()  # [E]
    drop_rate = 1.0 - kept.double().mean().item() if kept.numel() else 0.0

    scores = router_probs.double()  # [T, E]
    if (scores < 0).any():
        raise ValueError("router_probs must be non-negative scores")
    total = scores.sum(dim=-1, keepdim=True)  # [T, 1]
    if (total <= 0).any():
        raise ValueError("router_probs must have a positive sum on every token")
    p = scores / total  # [T, E], rows sum to 1
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # [T], 0 log 0 = 0
    return {
        "tokens_per_expert": tokens_per_expert,
        "max_mean_load": max_mean_load(tokens_per_expert),
        "drop_rate": drop_rate,
        "router_entropy": entropy.mean().item() if len(entropy) else math.nan,
    }


# -------------------------------------------------------------------------------------- counts of kept pairs

def _pair_counts(top_k_index, labels, dropped, num_experts: int, num_labels: int, labels_name: str,
                 num_labels_name: str) -> torch.Tensor:
    """LongTensor [num_labels, E]: kept pairs of each (token label, expert)."""
    check_int("num_experts", num_experts, 1)
    check_int(num_labels_name, num_labels, 1)
    index = _index_2d(top_k_index)  # [T, k]
    num_tokens, top_k = index.shape
    labels = _int_tensor(labels, labels_name).to(index.device).reshape(-1)  # [T]
    if labels.numel() != num_tokens:
        raise ValueError(f"{labels_name} must have one entry per token (T = {num_tokens}), got {labels.numel()}")
    _check_ids(index, "top_k_index", num_experts, "num_experts")
    _check_ids(labels, labels_name, num_labels, num_labels_name)
    kept = _kept_mask(dropped, index.shape, index.device)  # [T, k]
    pair_labels = labels[:, None].expand(num_tokens, top_k)[kept]  # [kept pairs]
    flat = pair_labels * num_experts + index[kept]
    return torch.bincount(flat, minlength=num_labels * num_experts).view(num_labels, num_experts)


def specialisation_matrix(top_k_index, topics, num_experts: int, num_topics: int, dropped=None) -> torch.Tensor:
    """Kept pairs of each (expert, topic): LongTensor [E, K]. `top_k_index` [T, k] (or [T] expert ids),
    `topics` [T] (any shape with T entries) the topic id of each token."""
    return _pair_counts(top_k_index, topics, dropped, num_experts, num_topics, "topics", "num_topics").T.contiguous()


def _joint(counts) -> np.ndarray:
    c = to_numpy(counts, "counts")
    if c.ndim != 2:
        raise ValueError(f"counts must be a 2-D table [E, K], got shape {c.shape}")
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts must be finite and non-negative")
    if c.sum() <= 0:
        raise ValueError("counts must hold at least one pair")
    return c / c.sum()  # [E, K], sums to 1


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_information(counts) -> float:
    """I(expert; topic) in nats, from a contingency table counts [E, K] (e.g. `specialisation_matrix`)."""
    p = _joint(counts)  # [E, K]
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)  # [E, K], p(e) p(t)
    nonzero = p > 0
    return max(float((p[nonzero] * np.log(p[nonzero] / outer[nonzero])).sum()), 0.0)


def normalized_mutual_information(counts) -> float:
    """I(expert; topic) / sqrt(H(expert) H(topic)) from counts [E, K]: the geometric-mean normalisation of Strehl
    & Ghosh (2002, "Cluster ensembles", JMLR 3), sklearn's `average_method="geometric"`. 1 when experts and
    topics determine each other, 0 when independent; 0 when either entropy is 0."""
    p = _joint(counts)
    h_expert, h_topic = _entropy(p.sum(axis=1)), _entropy(p.sum(axis=0))
    if h_expert <= 0 or h_topic <= 0:
        return 0.0
    return min(max(mutual_information(p) / math.sqrt(h_expert * h_topic), 0.0), 1.0)


def expert_by_token(top_k_index, input_ids, vocab_size: int, num_experts: int, dropped=None) -> torch.Tensor:
    """Kept pairs of each (token id, expert): LongTensor [V, E]. `input_ids` [T] (or [B, N], flattened as the
    model flattens its tokens)."""
    return _pair_counts(top_k_index, input_ids, dropped, num_experts, vocab_size, "input_ids", "vocab_size")


def token_id_routing_consistency(counts, top_k: int = 1, min_pairs: int = 1) -> float:
    """How much the token id alone decides the route: over the token ids with at least `min_pairs` pairs in
    counts [V, E] (`expert_by_token`), the share of their pairs that go to each id's own `top_k` most used
    experts (= the pair-weighted mean over ids of that share). 1 when every occurrence of an id goes to the same
    experts; about k/E for ids seen often under routing independent of the id (ids seen once always score 1:
    raise `min_pairs` to leave them out)."""
    check_int("top_k", top_k, 1)
    check_int("min_pairs", min_pairs, 1)
    c = to_numpy(counts, "counts")
    if c.ndim != 2 or top_k > c.shape[1]:
        raise ValueError(f"counts must be [V, E] with E >= top_k = {top_k}, got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    c = c[c.sum(axis=1) >= min_pairs]  # [ids kept, E]
    if c.sum() <= 0:
        raise ValueError(f"no token id has at least min_pairs = {min_pairs} pairs")
    top = np.sort(c, axis=1)[:, -top_k:].sum()  # pairs sent to each id's own top_k experts
    return float(top / c.sum())


def expert_by_position(top_k_index, positions, seq_len: int, num_experts: int, dropped=None) -> torch.Tensor:
    """Kept pairs of each (position in the sequence, expert): LongTensor [N, E]. `positions` [T] in
    [0, seq_len); for a batch flattened from [B, N], `torch.arange(N).repeat(B)`."""
    return _pair_counts(top_k_index, positions, dropped, num_experts, seq_len, "positions", "seq_len")


def drop_rate_by_position(dropped, positions, seq_len: int) -> torch.Tensor:
    """Fraction of the pairs at each position in the sequence that were dropped: float64 [N], NaN at positions
    with no token. `dropped` [T, k] bool, `positions` [T] in [0, seq_len)."""
    check_int("seq_len", seq_len, 1)
    dropped = dropped if torch.is_tensor(dropped) else torch.as_tensor(np.asarray(dropped))
    if dropped.dtype != torch.bool or dropped.dim() not in (1, 2):
        raise ValueError(f"dropped must be a [T, k] bool tensor, got {dropped.dtype} of shape {tuple(dropped.shape)}")
    dropped = dropped.detach().reshape(dropped.shape[0], -1)  # [T, k]
    positions = _int_tensor(positions, "positions").to(dropped.device).reshape(-1)  # [T]
    if positions.numel() != dropped.shape[0]:
        raise ValueError(f"positions must have one entry per token (T = {dropped.shape[0]}), got {positions.numel()}")
    _check_ids(positions, "positions", seq_len, "seq_len")
    pairs = torch.bincount(positions, minlength=seq_len).double() * dropped.shape[1]  # [N]
    lost = torch.bincount(positions, weights=dropped.double().sum(dim=1), minlength=seq_len)  # [N]
    return torch.where(pairs > 0, lost / pairs.clamp_min(1), torch.full_like(pairs, math.nan))
