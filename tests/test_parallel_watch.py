"""Watching expert parallelism (moelab.parallel.watch, plots), the model at scale (scale, the widget) and the
benchmark (`python -m moelab ep`).

One spawn of 2 gloo ranks on 127.0.0.1 (`trace_ranks`, forward and backward on uneven tokens) feeds every
multi-process test; the references are computed here, in this process, from the single-process SparseMoE: its
router's choices give the send matrix and, priced by hand, the bytes. The CLI runs once more as a subprocess on a
tiny config. No timing thresholds: times are only checked to exist and be ordered.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from moelab import MoEConfig, SparseMoE
from moelab.parallel import (PRESETS, EPWatch, bytes_per_token, exchange_bytes, flops_per_pair,
                             imbalance_from_counts, layer_cost, plot_send_matrix, plot_timeline, preset_cost,
                             scale_table, send_matrix_from_routing, time_ep, trace_ranks)
from moelab.parallel.layer import PhaseClock
from moelab.parallel.watch import PHASES, rank_inputs

SPAWN_TIMEOUT_S = 240  # far above a run here (about 12 s on 2 shared cores): only a hang hits it
CONFIG = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
TOKENS = [37, 91]  # uneven on purpose: the two ranks send different amounts
SEED = 3


@pytest.fixture(scope="module")
def watch() -> EPWatch:
    return trace_ranks(CONFIG, 2, TOKENS, seed=SEED, backward=True, timeout=SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def routing() -> list[torch.Tensor]:
    """Each rank's top_k_index [T_r, k] from the single-process layer on the same tokens (the reference)."""
    moe = SparseMoE(CONFIG, seed=SEED)
    xs, _ = rank_inputs(CONFIG, TOKENS, SEED)
    with torch.no_grad():
        return [moe.router(x).top_k_index for x in xs]


# ------------------------------------------------------------------------------------- 2 gloo ranks, one spawn

def test_the_frame_has_every_phase_of_every_rank_in_order(watch):
    frame = watch.frame
    assert list(frame["rank"].unique()) == [0, 1]
    for rank in (0, 1):
        mine = frame[frame["rank"] == rank]
        assert list(mine["phase"]) == [*PHASES, "backward"]
        assert (mine["seconds"] > 0).all() and (mine["start_s"] >= 0).all()
        starts = mine["start_s"].tolist()
        assert starts == sorted(starts)  # the phases follow one another on the shared clock
    assert frame["start_s"].min() == 0.0  # from the earliest start of any rank
    assert watch.phase_seconds().columns.tolist() == [*PHASES, "backward"]
    steps = watch.steps
    for rank in (0, 1):  # every rank's own trace, with its EP steps around the backend's
        names = steps[steps["rank"] == rank]["step"].tolist()
        assert [n for n in names if n.startswith("ep_")] == list(PHASES.values())


def test_the_send_matrix_is_the_routing_of_the_single_process_layer(watch, routing):
    L = CONFIG.num_experts // 2
    expected = np.zeros((2, 2), dtype=int)
    for i, index in enumerate(routing):  # by hand: each pair goes to the rank holding its expert
        for expert in index.reshape(-1).tolist():
            expected[i, expert // L] += 1
    assert watch.send_matrix.tolist() == expected.tolist()
    assert watch.send_matrix.sum(axis=1).tolist() == [t * CONFIG.top_k for t in TOKENS]
    everyone = torch.cat([index.reshape(-1) for index in routing])
    assert watch.tokens_per_expert.tolist() == torch.bincount(everyone, minlength=4).tolist()
    for j, raw in enumerate(watch.raw):  # each rank's received counts [ep, L] are its experts' columns
        assert raw["received_column"] == expected[:, j].tolist()
        assert np.sum(raw["received_counts"]) == expected[:, j].sum()


def test_measured_bytes_equal_the_model_for_the_actual_routing(watch, routing):
    row = CONFIG.hidden_size * 4  # float32
    m = watch.send_matrix
    measured = watch.bytes_frame()
    model = exchange_bytes(send_matrix_from_routing(routing, CONFIG.num_experts), CONFIG.hidden_size, 4)
    assert measured.astype(int).to_dict("list") == model.astype(int).to_dict("list")
    # and by hand: rank 0 sends its row's off-diagonal, receives its column's, and the combine swaps them
    assert measured.loc[0, "dispatch_bytes_sent"] == m[0, 1] * row == measured.loc[0, "combine_bytes_received"]
    assert measured.loc[0, "dispatch_bytes_received"] == m[1, 0] * row == measured.loc[1, "dispatch_bytes_sent"]
    frame = watch.frame
    backward = frame[frame["phase"] == "backward"].set_index("rank")
    assert backward.loc[0, "bytes_sent"] == (m[0, 1] + m[1, 0]) * row  # the reverse exchanges, the same rows


def test_every_rank_matches_the_single_process_layer(watch):
    exact = watch.exactness
    assert exact["tokens"].tolist() == TOKENS
    assert (exact["max_abs_diff"] <= 1e-6).all() and (exact["grad_max_abs_diff"] <= 1e-6).all(), exact


def test_the_plots(watch, tmp_path):
    fig = watch.plot_send_matrix()
    assert isinstance(fig, Figure)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[0].startswith(f"{watch.send_matrix[0, 0]}\n")  # count, then bytes
    assert f"{int(watch.send_matrix.sum())} pair rows" in fig.axes[0].get_title()
    timeline = watch.plot_timeline()
    bars = timeline.axes[0].patches
    assert len(bars) == len(watch.frame)
    widths = sorted(round(b.get_width(), 9) for b in bars)
    assert widths == sorted(round(s * 1e3, 9) for s in watch.frame["seconds"])  # ms
    fig.savefig(tmp_path / "m.png")
    timeline.savefig(tmp_path / "t.png")
    with pytest.raises(ValueError, match="square"):
        plot_send_matrix(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="start_s"):
        plot_timeline(watch.frame.drop(columns="start_s"))


def test_trace_ranks_refuses_bad_arguments_before_spawning():
    with pytest.raises(ValueError, match="num_tokens must be"):
        trace_ranks(CONFIG, 2, [1, 2, 3])
    with pytest.raises(ValueError, match="not divisible by world_size"):
        trace_ranks(CONFIG, 3, 4)
    with pytest.raises(ValueError, match="config must be"):
        trace_ranks("tiny", 2, 4)


def test_the_phase_clock_reads_no_clock_when_off(monkeypatch):
    import moelab.parallel.layer as layer
    calls = []
    monkeypatch.setattr(layer.time, "perf_counter", lambda: calls.append(1) or 1.0)
    clock = PhaseClock(False, torch.device("cpu"))
    clock.start()
    assert clock.stop() == (None, None) and not calls
    phases = {}
    clock.keep(phases, "permute", seconds=1.0)
    assert phases == {}
    on = PhaseClock(True, torch.device("cpu"))
    assert on.stop() == (0.0, 1.0) and len(calls) == 2


# ------------------------------------------------------------------------------------------ the model, on paper

def test_layer_cost_against_a_hand_computation():
    H, I, E, k, ep, T, b, B, F = 64, 32, 8, 2, 4, 100, 2, 10.0, 5.0
    cost = layer_cost(H, I, E, k, ep, tokens_per_rank=T, bytes_per_element=b, imbalance=1.5, bandwidth_gbs=B,
                      tflops=F)
    off = (ep - 1) / ep
    assert cost["bytes_per_token"] == pytest.approx(2 * k * off * H * b)
    assert bytes_per_token(H, k, ep, b) == pytest.approx(2 * 2 * 0.75 * 64 * 2)
    busiest = 1.5 * T * k
    assert cost["comm_bytes"] == pytest.approx(2 * busiest * off * H * b)
    assert cost["flops"] == pytest.approx(busiest * 6 * H * I)
    assert cost["comm_ms"] == pytest.approx(2 * busiest * off * H * b / (B * 1e9) * 1e3)
    assert cost["compute_ms"] == pytest.approx(busiest * 6 * H * I / (F * 1e12) * 1e3)
    assert cost["dominates"] == ("communication" if cost["comm_ms"] > cost["compute_ms"] else "compute")
    assert cost["total_ms"] == pytest.approx(cost["comm_ms"] + cost["compute_ms"])
    assert flops_per_pair(H, I) == 2 * 3 * 64 * 32
    assert layer_cost(H, I, E, k, 1, tokens_per_rank=T)["comm_bytes"] == 0  # one rank: nothing leaves
    shared = layer_cost(H, I, E, k, ep, tokens_per_rank=T, shared_intermediate_size=16)
    assert shared["flops"] - layer_cost(H, I, E, k, ep, tokens_per_rank=T)["flops"] == T * 6 * H * 16


def test_imbalance_from_counts_and_the_send_matrix_of_a_routing():
    assert imbalance_from_counts([4, 0, 1, 3], 2) == pytest.approx(4 / 4)  # ranks get 4 and 4
    assert imbalance_from_counts([6, 2, 0, 0], 2) == pytest.approx(8 / 4)  # all on rank 0: ep
    assert imbalance_from_counts(torch.tensor([3, 0, 1, 0]), 4) == pytest.approx(3 / 1)
    cost = layer_cost(8, 4, 4, 1, 2, tokens_per_rank=4, tokens_per_expert=[6, 2, 0, 0])
    assert cost["imbalance"] == 2.0
    index = [torch.tensor([[0, 3], [2, 1]]), torch.tensor([[3, 2]])]
    assert send_matrix_from_routing(index, 4).tolist() == [[2, 2], [0, 2]]
    dropped = [torch.tensor([[False, True], [False, False]]), torch.tensor([[True, True]])]
    assert send_matrix_from_routing(index, 4, dropped).tolist() == [[2, 1], [0, 0]]
    table = exchange_bytes([[2, 2], [0, 2]], hidden_size=8, bytes_per_element=2)
    assert table["dispatch_bytes_sent"].tolist() == [2 * 16, 0]
    assert table["dispatch_bytes_received"].tolist() == [0, 2 * 16]


def test_presets_and_the_table():
    v3 = PRESETS["DeepSeek-V3"]
    assert (v3.hidden_size, v3.intermediate_size, v3.num_experts, v3.top_k, v3.ep) == (7168, 2048, 256, 8, 64)
    mixtral = PRESETS["Mixtral-8x7B"]
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_experts, mixtral.top_k) == (4096, 14336, 8, 2)
    table = scale_table(bandwidths_gbs=(50.0, 450.0), tflops=400.0, tokens_per_rank=4096)
    assert len(table) == 4 and set(table["preset"]) == set(PRESETS)
    row = table[(table["preset"] == "DeepSeek-V3") & (table["bandwidth_gbs"] == 50.0)].iloc[0]
    assert row["bytes_per_token"] == pytest.approx(2 * 8 * 63 / 64 * 7168 * 2)
    # balanced, the ratio does not depend on T: (ep-1)/ep * 2 b F / (6 I B), plus the shared expert's compute
    routed = 63 / 64 * 2 * 2 * 400e12 / (6 * 2048 * 50e9)
    assert row["comm_over_compute"] == pytest.approx(routed * 8 / (8 + 1))  # 8 routed + 1 shared of width 2048
    assert row["dominates"] == "communication"
    assert (table[table["preset"] == "Mixtral-8x7B"]["dominates"] == "compute").all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(ep=3), "not divisible by ep = 3"),
    (dict(imbalance=0.5), "imbalance must be a finite float >= 1.0"),
    (dict(imbalance=9.0, ep=8), r"imbalance must be in \[1, ep = 8\]"),
    (dict(bandwidth_gbs=0), "bandwidth_gbs must be"),
    (dict(tflops=float("nan")), "tflops must be"),
    (dict(tokens_per_rank=-1), "tokens_per_rank must be"),
])
def test_the_model_names_a_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preset_cost("Mixtral-8x7B", **kwargs)


def test_preset_cost_refuses_an_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_cost("GPT-5")


def test_the_widget_redraws_when_a_slider_moves():
    from moelab.widgets.parallel import EPScaleExplorer, ep_choices

    w = EPScaleExplorer("DeepSeek-V3", bandwidth_gbs=50.0)
    before = dict(w.last_results)
    assert w.figure is not None and "communication dominates" in w.message
    w.bandwidth.value = 500.0
    assert w.last_results["comm_ms"] == pytest.approx(before["comm_ms"] * 50.0 / w.bandwidth.value)
    assert w.last_results["compute_ms"] == before["compute_ms"] and w.message != ""
    w.imbalance.value = 2.0
    # the routed experts' work doubles, the shared expert's (1 of width 2048 beside k = 8 of 2048) does not
    assert w.last_results["compute_ms"] == pytest.approx(before["compute_ms"] * (2 * 8 + 1) / (8 + 1))
    w.preset.value = "Mixtral-8x7B"
    assert list(w.ep.options) == ep_choices(8) == [1, 2, 4, 8] and w.ep.value == 8
    assert w.last_results["preset"] == "Mixtral-8x7B"
    w.ep.value = 1  # one rank: nothing on the wire, the imbalance capped at 1
    assert w.last_results["comm_ms"] == 0 and w.last_results["imbalance"] == 1.0 and "capped" in w.message
    with pytest.raises(ValueError, match="preset must be one of"):
        EPScaleExplorer("GPT-5")


# ----------------------------------------------------------------------------------- python -m moelab ep

def test_the_ep_cli_prints_a_table_of_both_degrees():
    args = [sys.executable, "-m", "moelab", "ep", "--tokens", "24", "--experts", "4", "--top-k", "2", "--hidden",
            "16", "--intermediate", "8", "--ranks", "1,2", "--repeat", "1", "--warmup", "0", "--timeout", "120"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["ep", "rank"])
    columns = lines[header].split()
    rows = [dict(zip(columns, line.split())) for line in lines[header + 1:header + 4]]
    assert [(r["ep"], r["rank"], r["tokens"]) for r in rows] == [("1", "0", "24"), ("2", "0", "12"),
                                                                 ("2", "1", "12")]
    assert rows[0]["bytes_sent"] == "0" and rows[0]["comm_ms"] == "0"
    row_bytes = 16 * 4
    for r in rows[1:]:  # dispatch + combine: whole rows of H float32, and each rank receives what the other sent
        assert int(r["bytes_sent"]) % row_bytes == 0
    assert rows[1]["bytes_sent"] == rows[2]["bytes_received"] and math.isfinite(float(rows[1]["total_ms"]))


def test_the_ep_cli_names_bad_ranks_before_spawning(capsys):
    from moelab.cli import main

    assert main(["ep", "--experts", "4", "--ranks", "1,3"]) == 2
    assert "ranks [3] do not divide num_experts = 4" in capsys.readouterr().err
    assert main(["ep", "--ranks", "1,two"]) == 2
    assert "--ranks takes comma-separated ints" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeat must be an int >= 1"):
        time_ep(CONFIG, 8, [1], repeat=0)
