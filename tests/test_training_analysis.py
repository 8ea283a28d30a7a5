"""The training lab's analyses and plots (moelab.training.analysis, moelab.training.plots) against references
written from the definitions: float64 loops, hand-built histories, and sklearn's NMI where it is installed."""

import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from moelab.layer.router import RouterOutput
from moelab.training.analysis import (bias_array, drop_rate_by_position, expert_by_position, expert_by_token,
                                      load_array, max_mean_load, metric_by_layer, mutual_information,
                                      normalized_mutual_information, routing_stats, specialisation_matrix,
                                      token_id_routing_consistency)
from moelab.training.plots import (plot_balance_curves, plot_drop_rate_vs_capacity, plot_expert_by_position,
                                   plot_expert_by_token, plot_load_over_training, plot_specialisation)

matplotlib.use("Agg")


# ------------------------------------------------------------------------------------------ references

def reference_nmi(counts) -> tuple[float, float]:
    """(I, I / sqrt(H_e H_t)) in float64 from the definitions, one cell at a time."""
    c = [[float(x) for x in row] for row in counts]
    total = sum(map(sum, c))
    pe = [sum(row) / total for row in c]
    pt = [sum(c[i][j] for i in range(len(c))) / total for j in range(len(c[0]))]
    mi = 0.0
    for i, row in enumerate(c):
        for j, x in enumerate(row):
            if x > 0:
                p = x / total
                mi += p * math.log(p / (pe[i] * pt[j]))
    he = -sum(p * math.log(p) for p in pe if p > 0)
    ht = -sum(p * math.log(p) for p in pt if p > 0)
    return mi, (mi / math.sqrt(he * ht) if he > 0 and ht > 0 else 0.0)


def reference_pair_counts(top_k_index, labels, num_labels, num_experts, dropped=None):
    """[labels, E] counts of kept pairs, one pair at a time."""
    out = [[0] * num_experts for _ in range(num_labels)]
    for t in range(top_k_index.shape[0]):
        for j in range(top_k_index.shape[1]):
            if dropped is None or not dropped[t, j]:
                out[int(labels[t])][int(top_k_index[t, j])] += 1
    return torch.tensor(out)


def random_routing(num_tokens=200, num_experts=6, top_k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])  # [T, k]
    dropped = torch.rand(num_tokens, top_k, generator=g) < 0.2
    return index, dropped, g


def history_frame(num_steps=5, num_layers=2, num_experts=3, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    load = rng.integers(0, 50, size=(num_steps, num_layers, num_experts)).astype(float)
    biases = rng.standard_normal((num_steps, num_layers, num_experts))
    rows = []
    for u in range(num_steps):
        row = {"step": u + 1, "loss": 3.0 - 0.1 * u, "aux_loss": 1.1, "z_loss": 0.01, "lr": 1e-3,
               "val_loss": 2.9 - 0.1 * u if u % 2 else math.nan}
        for l in range(num_layers):
            row[f"max_mean_load/{l}"] = 1.0 + 0.1 * (u + l)
            row[f"drop_rate/{l}"] = 0.01 * u
            row[f"router_entropy/{l}"] = math.log(num_experts) - 0.05 * u
            for e in range(num_experts):
                row[f"load/{l}/{e}"] = load[u, l, e]
                if bias:
                    row[f"bias/{l}/{e}"] = biases[u, l, e]
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, axis=1, random_state=seed), load, biases  # column order must not matter


# ------------------------------------------------------------------------------- mutual information / NMI

@pytest.mark.parametrize("shape", [(2, 2), (4, 3), (8, 5), (3, 7)])
def test_nmi_and_mi_match_a_float64_loop(shape):
    counts = torch.randint(0, 20, shape)
    counts[0, 0] += 1  # never empty
    mi, nmi = reference_nmi(counts.tolist())
    assert mutual_information(counts) == pytest.approx(mi, rel=1e-12, abs=1e-14)
    assert normalized_mutual_information(counts) == pytest.approx(nmi, rel=1e-12, abs=1e-14)
    assert normalized_mutual_information(counts.numpy()) == normalized_mutual_information(counts.tolist())


def test_nmi_matches_sklearn_geometric():
    metrics = pytest.importorskip("sklearn.metrics")
    counts = np.random.default_rng(1).integers(0, 9, size=(5, 4))
    experts, topics = np.nonzero(counts)
    experts, topics = np.repeat(experts, counts[experts, topics]), np.repeat(topics, counts[experts, topics])
    expected = metrics.normalized_mutual_info_score(topics, experts, average_method="geometric")
    assert normalized_mutual_information(counts) == pytest.approx(expected, rel=1e-9)


def test_nmi_is_one_for_a_one_to_one_assignment_and_zero_for_independent():
    assert normalized_mutual_information(torch.eye(5, dtype=torch.long)[torch.randperm(5)] * 7) == pytest.approx(1.0)
    outer = np.outer([1, 2, 3, 4], [5, 1, 2])  # p(e, t) = p(e) p(t) exactly
    assert normalized_mutual_information(outer) == pytest.approx(0.0, abs=1e-12)
    experts, topics = torch.randint(0, 8, (20000,)), torch.randint(0, 4, (20000,))
    assert normalized_mutual_information(specialisation_matrix(experts, topics, 8, 4)) < 0.01
    assert normalized_mutual_information([[3, 0], [5, 0]]) == 0.0  # one topic: H(topic) = 0
    assert mutual_information([[3, 0], [5, 0]]) == pytest.approx(0.0, abs=1e-15)


# ------------------------------------------------------------------------------------- pair counts

def test_specialisation_matrix_counts_kept_pairs_like_a_loop():
    index, dropped, g = random_routing()
    topics = torch.randint(0, 4, (index.shape[0],), generator=g)
    counts = specialisation_matrix(index, topics, 6, 4, dropped=dropped)
    assert counts.dtype == torch.long and counts.shape == (6, 4)
    assert torch.equal(counts, reference_pair_counts(index, topics, 4, 6, dropped).T)
    assert counts.sum() == (~dropped).sum()
    everything = specialisation_matrix(index, topics.view(4, 50), 6, 4)  # [B, N] topics are flattened
    assert torch.equal(everything, reference_pair_counts(index, topics, 4, 6).T)
    assert torch.equal(specialisation_matrix(index[:, 0], topics, 6, 4),  # [T] expert ids: k = 1
                       reference_pair_counts(index[:, :1], topics, 4, 6).T)


def test_expert_by_token_and_by_position_count_like_a_loop():
    index, dropped, g = random_routing(num_tokens=120)
    input_ids = torch.randint(0, 30, (120,), generator=g)
    positions = torch.arange(40).repeat(3)
    assert torch.equal(expert_by_token(index, input_ids, 30, 6, dropped=dropped),
                       reference_pair_counts(index, input_ids, 30, 6, dropped))
    assert torch.equal(expert_by_position(index, positions, 40, 6, dropped=dropped),
                       reference_pair_counts(index, positions, 40, 6, dropped))


def test_drop_rate_by_position_is_the_dropped_share_of_each_positions_pairs():
    dropped = torch.tensor([[True, False], [False, False], [True, True], [False, True]])
    positions = torch.tensor([0, 1, 0, 1])
    rates = drop_rate_by_position(dropped, positions, seq_len=3)
    assert rates.dtype == torch.float64
    assert rates[:2].tolist() == [3 / 4, 1 / 4] and math.isnan(rates[2])  # position 2: no token


def test_token_id_routing_consistency():
    deterministic = torch.zeros(4, 3, dtype=torch.long)
    deterministic[torch.arange(4), torch.tensor([0, 2, 1, 0])] = torch.tensor([5, 1, 7, 2])
    assert token_id_routing_consistency(deterministic) == 1.0
    counts = [[6, 2, 0], [1, 1, 2], [0, 0, 0]]  # (6 + 2) / 12 pairs to each id's most used expert
    assert token_id_routing_consistency(counts) == pytest.approx(8 / 12)
    assert token_id_routing_consistency(counts, top_k=2) == pytest.approx((8 + 3) / 12)
    assert token_id_routing_consistency(counts, min_pairs=5) == pytest.approx(6 / 8)
    ids = torch.randint(0, 5, (6000,))
    uniform = expert_by_token(torch.randint(0, 8, (6000, 1)), ids, 5, 8)
    assert token_id_routing_consistency(uniform) < 0.2  # about 1/E when the id does not matter


# ------------------------------------------------------------------------------- balance and routing_stats

def test_max_mean_load_on_one_row_and_batched():
    assert max_mean_load(torch.tensor([4, 4, 4, 4])) == 1.0
    assert max_mean_load([8, 0, 0, 0]) == 4.0
    batched = max_mean_load(np.array([[[1, 3], [2, 2]], [[0, 0], [5, 0]]]))  # [2, 2, E=2]
    assert batched.shape == (2, 2)
    assert batched[0].tolist() == [1.5, 1.0] and math.isnan(batched[1, 0]) and batched[1, 1] == 2.0


def test_routing_stats_against_float64_formulas():
    num_tokens, num_experts, top_k = 64, 5, 2
    logits = torch.randn(num_tokens, num_experts) * 2
    scores = torch.sigmoid(logits)  # rows do not sum to 1: routing_stats normalises them
    index = torch.topk(scores, top_k, dim=-1).indices
    dropped = torch.rand(num_tokens, top_k) < 0.25
    stats = routing_stats(RouterOutput(logits, scores, index, scores.gather(1, index), dropped), num_experts)
    p = scores.double() / scores.double().sum(-1, keepdim=True)
    entropy = sum(-sum(float(x) * math.log(float(x)) for x in row if x > 0) for row in p) / num_tokens
    assert stats["router_entropy"] == pytest.approx(entropy, rel=1e-12)
    expected = torch.tensor([int(((index == e) & ~dropped).sum()) for e in range(num_experts)])
    assert torch.equal(stats["tokens_per_expert"], expected)
    assert stats["drop_rate"] == pytest.approx(float(dropped.double().mean()))
    assert stats["max_mean_load"] == pytest.approx(float(expected.max() / expected.double().mean()))
    no_drops = SimpleNamespace(router_probs=scores, top_k_index=index)  # no `dropped` field at all
    assert routing_stats(no_drops)["drop_rate"] == 0.0
    assert routing_stats(RouterOutput(logits, scores, index, scores))["drop_rate"] == 0.0  # dropped = None
    uniform = torch.full((3, 4), 0.25)
    assert routing_stats(SimpleNamespace(router_probs=uniform, top_k_index=torch.zeros(3, 1, dtype=torch.long)))[
        "router_entropy"] == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------------------- history

def test_load_and_bias_arrays_round_trip_a_history():
    frame, load, biases = history_frame()
    assert load_array(frame).shape == (5, 2, 3)
    np.testing.assert_array_equal(load_array(frame), load)
    np.testing.assert_array_equal(bias_array(frame), biases)
    np.testing.assert_allclose(metric_by_layer(frame, "drop_rate"), np.outer(0.01 * np.arange(5), [1, 1]))
    with pytest.raises(ValueError, match="no 'bias/"):
        bias_array(history_frame(bias=False)[0])
    with pytest.raises(ValueError, match=r"missing \['load/1/2'\]"):
        load_array(frame.drop(columns=["load/1/2"]))
    with pytest.raises(ValueError, match="history must be a pandas DataFrame"):
        load_array(load)


# -------------------------------------------------------------------------------------------- plots

def _labelled(ax) -> bool:
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel())


def test_each_plot_returns_a_figure_with_labelled_axes():
    frame, load, _ = history_frame()
    other = history_frame(seed=1)[0]
    index, dropped, g = random_routing()
    topics = torch.randint(0, 4, (200,), generator=g)
    positions = torch.arange(50).repeat(4)

    fig = plot_load_over_training(frame)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 + 1  # a heatmap per layer + the colorbar
    assert all(ax.get_ylabel() for ax in fig.axes[:2]) and fig.axes[1].get_xlabel() == "optimizer step"
    assert len(plot_load_over_training(load, layer=1).axes) == 2

    for metric, layer, lines in [("max_mean_load", "max", 2 + 1), ("router_entropy", "each", 4), ("val_loss", 0, 2)]:
        fig = plot_balance_curves({"a": frame, "b": other}, metric, layer=layer)
        (ax,) = fig.axes
        assert _labelled(ax) and len(ax.get_lines()) == lines and ax.get_legend() is not None
    assert len(plot_balance_curves(frame, "val_loss").axes[0].get_lines()[0].get_xdata()) == 2  # NaN steps left out

    fig = plot_drop_rate_vs_capacity([1.0, 1.5, 2.0], [[0.2, 0.1, 0.0], [0.1, 0.05, 0.0]], labels=["a", "b"])
    assert len(fig.axes) == 1 and _labelled(fig.axes[0]) and len(fig.axes[0].get_lines()) == 2 + 1

    fig = plot_specialisation(specialisation_matrix(index, topics, 6, 4), topic_names=list("wxyz"))
    assert len(fig.axes) == 2 and _labelled(fig.axes[0]) and "NMI = " in fig.axes[0].get_title()

    fig = plot_expert_by_token(expert_by_token(index, topics, 4, 6), top=3, token_names=list("abcd"))
    assert len(fig.axes) == 2 and _labelled(fig.axes[0]) and len(fig.axes[0].get_yticklabels()) == 3

    counts = expert_by_position(index, positions, 50, 6, dropped=dropped)
    assert len(plot_expert_by_position(counts).axes) == 2
    fig = plot_expert_by_position(counts, drop_rate_by_position(dropped, positions, 50))
    heat, _, rate = fig.axes
    assert heat.get_ylabel() and _labelled(rate)
    fig.canvas.draw()  # lays out without error


# ------------------------------------------------------------------------------------------ bad input

ONE_EXPERT = torch.zeros(2, 1, dtype=torch.long)  # [T = 2, k = 1]


@pytest.mark.parametrize("call, message", [
    (lambda: normalized_mutual_information([[0, 0], [0, 0]]), "at least one pair"),
    (lambda: mutual_information([1, 2, 3]), r"counts must be a 2-D table"),
    (lambda: mutual_information([[1, -2]]), "non-negative"),
    (lambda: specialisation_matrix(torch.tensor([[0, 6]]), torch.tensor([0]), 6, 2),
     r"top_k_index must hold ids in \[0, num_experts = 6\)"),
    (lambda: specialisation_matrix(torch.tensor([[0, 1]]), torch.tensor([2]), 6, 2),
     r"topics must hold ids in \[0, num_topics = 2\)"),
    (lambda: specialisation_matrix(torch.tensor([[0, 1]]), torch.tensor([0, 1]), 6, 2), "one entry per token"),
    (lambda: specialisation_matrix(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 6, 2), "integer ids"),
    (lambda: specialisation_matrix(torch.zeros(1, 2, 3, dtype=torch.long), torch.tensor([0]), 6, 2), r"\[T, k\]"),
    (lambda: specialisation_matrix(torch.tensor([[0, 1]]), torch.tensor([0]), 0, 2), "num_experts must be in"),
    (lambda: expert_by_token(torch.tensor([[0, 1]]), torch.tensor([0]), 4, 6, dropped=torch.tensor([1, 0])),
     "dropped must be a bool"),
    (lambda: expert_by_position(torch.tensor([[0, 1]]), torch.tensor([0]), 4, 6,
                                dropped=torch.zeros(1, 3, dtype=torch.bool)), "dropped must have top_k_index's shape"),
    (lambda: drop_rate_by_position(torch.zeros(2, 2, dtype=torch.bool), torch.tensor([0, 5]), 4),
     r"positions must hold ids in \[0, seq_len = 4\)"),
    (lambda: token_id_routing_consistency([[1, 2]], top_k=3), "E >= top_k"),
    (lambda: max_mean_load([]), "E >= 1"),
    (lambda: max_mean_load([1, -1]), "non-negative"),
    (lambda: routing_stats(SimpleNamespace(router_probs=torch.ones(2, 3), top_k_index=ONE_EXPERT), 4),
     "num_experts = 4 but router_probs has 3"),
    (lambda: routing_stats(SimpleNamespace(router_probs=torch.zeros(2, 3), top_k_index=ONE_EXPERT)), "positive sum"),
    (lambda: metric_by_layer(history_frame()[0], "nope"), "no 'nope/"),
    (lambda: plot_load_over_training(history_frame()[0], layer=2), r"layer must be None, or ids in \[0, 2\)"),
    (lambda: plot_load_over_training(np.zeros((3, 1, 2, 2))), r"load array \[U, M, E\]"),
    (lambda: plot_balance_curves({}), "non-empty"),
    (lambda: plot_balance_curves(history_frame()[0], "nope"), "metric 'nope'"),
    (lambda: plot_balance_curves(history_frame()[0], layer="median"), "layer must be 'max'"),
    (lambda: plot_balance_curves(history_frame()[0], smooth=0), "smooth must be an int >= 1"),
    (lambda: plot_drop_rate_vs_capacity([1, 2], [0.1, 0.2, 0.3]), "capacity_factors"),
    (lambda: plot_drop_rate_vs_capacity([1, 2], [[0.1, 0.2]], labels=["a", "b"]), "labels must name each of the 1"),
    (lambda: plot_specialisation(np.ones((3, 2)), topic_names=["a"]), "topic_names must name each of the K = 2"),
    (lambda: plot_expert_by_token(np.ones((3, 2)), top=0), "top must be an int >= 1"),
    (lambda: plot_expert_by_position(np.ones((3, 2)), drop_rate=[0.1]), r"drop_rate must be \[N\]"),
])
def test_bad_input_raises_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()
