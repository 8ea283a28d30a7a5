"""TrainingExplorer (notebook 12) driven from Python: one short seeded run, its curve, message and guard."""

import math

import pytest

from moelab.training import MAX_TOKENS, TrainingConfig
from moelab.training.recipes import DEFAULT_COEFFICIENTS, METHODS
from moelab.widgets import TrainingExplorer
from moelab.widgets.training import RUN_SHAPE, STEPS_BOUNDS, guard_max_steps


@pytest.fixture(scope="module")
def ran():
    explorer = TrainingExplorer(method="none")
    explorer.method.value = "switch"
    explorer.steps.value = 20
    run = explorer.run()
    return explorer, run


def test_run_draws_the_balance_curve_and_redraws_while_training(ran):
    explorer, run = ran
    assert explorer.last_run is run
    assert len(explorer.rows) == 20 and len(run.history) == 20
    lines = explorer.figure.axes[0].lines
    assert len(lines) >= 2  # one per layer (+ the line of perfect balance)
    assert len(lines[0].get_xdata()) == 20  # the final redraw holds every step
    assert explorer.redraws >= 1  # the callback redrew mid-run (every 10 steps)
    assert len(explorer.plot_out.outputs) == 1


def test_message_reports_the_measured_held_out_balance(ran):
    explorer, run = ran
    after = run.after.max_mean_load()
    assert all(f"{value:.2f}" in explorer.message for value in after)
    assert "switch" in explorer.message and explorer.status.value == explorer.message
    assert not explorer.refused


def test_method_sets_its_default_coefficient():
    explorer = TrainingExplorer()
    assert list(explorer.method.options) == list(METHODS)
    for method in ("switch", "bias", "z_loss"):
        explorer.method.value = method
        assert math.isclose(explorer.coefficient.value, DEFAULT_COEFFICIENTS[method], rel_tol=1e-6)
        assert not explorer.coefficient.disabled
    explorer.method.value = "none"
    assert explorer.coefficient.disabled


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_a_bad_coefficient_is_refused_with_a_clear_message(bad):
    calls = []
    explorer = TrainingExplorer(method="switch", runner=lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="coefficient must be a finite number > 0"):
        explorer.run(coefficient=bad)
    assert explorer.refused and "nothing was run" in explorer.message and "switch" in explorer.message
    assert calls == [] and explorer.last_run is None


def test_steps_slider_respects_the_guard():
    explorer = TrainingExplorer()
    assert explorer.steps.min == STEPS_BOUNDS[0]
    assert explorer.steps.max <= min(STEPS_BOUNDS[1], guard_max_steps())
    assert TrainingConfig(steps=explorer.steps.max, progress=False, **RUN_SHAPE).total_tokens <= MAX_TOKENS
    with pytest.raises(ValueError, match="max_tokens"):  # one step past the guard is refused by TrainingConfig
        TrainingConfig(steps=guard_max_steps() + 1, progress=False, **RUN_SHAPE)
    explorer.steps.value = 10_000
    assert explorer.steps.value == explorer.steps.max  # the slider clamps
    assert str(explorer.steps.max) in explorer.guard_label.value and "guard" in explorer.guard_label.value
