import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import reference.py

import moelab  # noqa: E402

BACKENDS = ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned")  # the five layouts, not auto

# ------------------------------------------------------------------------------------------------ test tiers
# Every test is put in its tier here, so the test files stay free of bookkeeping; `make test-fast` deselects the
# five tiers (`-m "not slow and not browser and not compile and not hf and not notebooks"`), `make test` and CI
# run everything. The markers are declared in pyproject.toml.
TIER_FILES = {"test_browser.py": "browser", "test_hf.py": "hf", "test_compile.py": "compile"}
COMPILE_WORDS = ("compile", "fullgraph", "inductor")  # a test whose name says so runs torch.compile
HF_WORDS = ("transformers",)  # ... or needs transformers
SLOW = {  # test functions that take more than about a second on 2 cores (subprocesses, servers, sweeps)
    "test_collapse_happens_by_construction_without_balancing", "test_balancing_recovers_from_the_collapse",
    "test_the_bias_run_balances_without_a_loss_term", "test_experts_specialise_on_planted_topics",
    "test_make_lab_serves_jupyterlab_on_notebooks", "test_cli_prints_a_table_and_writes_its_files",
    "test_cli_rejects_bad_lists", "test_default_job_prints_every_backend", "test_bad_arguments_are_named",
    "test_batched_mm_memory_grows_with_tokens_grouped_mm_stays_with_activations",
    "test_analytic_and_measured_peaks_agree_within_25_percent", "test_report_is_computed_from_the_sweep",
    "test_one_row_per_grid_point_skipped_ones_included", "test_real_run_rows_carry_the_slider_settings_and_the_figure_matches_the_table",
    "test_over_budget_configuration_is_refused_with_the_reason_and_runs_nothing",
    "test_moving_a_slider_and_clicking_run_changes_table_and_figure", "test_lint_imports_keeps_the_layer_contract",
    "test_compare_cli_prints_the_note_where_bf16_is_emulated", "test_expert_parallel_matches_the_single_process_layer",
    "test_the_forward_backward_section_is_computed_from_its_sweep",
    "test_the_frame_has_every_phase_of_every_rank_in_order", "test_the_send_matrix_is_the_routing_of_the_single_process_layer",
    "test_measured_bytes_equal_the_model_for_the_actual_routing", "test_every_rank_matches_the_single_process_layer",
    "test_the_plots", "test_the_ep_cli_prints_a_table_of_both_degrees",
    "test_a_failing_rank_is_named_and_its_waiting_peer_is_killed", "test_a_hang_past_the_timeout_is_killed_not_waited_for",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebooks)
            continue
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        if path.name in TIER_FILES:
            item.add_marker(getattr(pytest.mark, TIER_FILES[path.name]))
        if any(word in name for word in COMPILE_WORDS):
            item.add_marker(pytest.mark.compile)
        if any(word in name for word in HF_WORDS):
            item.add_marker(pytest.mark.hf)
        if name in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """The module runs torch on one intra-op thread and gives the setting back (`pytest.mark.usefixtures`)."""
    # NOTE: training steps of tiny models are short; on 2 shared cores a second intra-op thread mostly waits
    # for the first (it made a step ~50x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_moe(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2, dtype=torch.float32,
             backend="grouped_mm", seed=0, **kw):
    """A layer whose weights are O(1/sqrt(fan_in)), so outputs are O(1) and tolerances mean something."""
    cfg = moelab.MoEConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_experts=num_experts,
                           top_k=top_k, initializer_range=hidden_size ** -0.5, **kw)
    moe = moelab.SparseMoE(cfg, experts_implementation=backend, seed=seed)
    with torch.no_grad():
        moe.experts.down_proj.mul_(hidden_size ** 0.5 * intermediate_size ** -0.5)
    return moe.to(dtype)
