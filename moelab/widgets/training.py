"""`TrainingExplorer`, the widget of notebook 12: pick a balancing method and its coefficient, train, watch the
balance curve (max / mean load per step) redraw while the run goes on.

The widget trains with `moelab.training.balancing_run` (the seeded recipe of the notebook and its tests) and
draws with `moelab.training.plot_balance_curves`; it only collects settings, checks them and redraws from the
rows the trainer's callback hands it. Outputs are written as in `_shared` (no `with out:`), so a test drives it
without a kernel: set `.method.value`, `.steps.value`, call `.run()`, read `.last_run`, `.figure`, `.message`.
"""

from __future__ import annotations

import math

import ipywidgets as W
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

from ..training import MAX_TOKENS, TrainingConfig, balancing_run, plot_balance_curves
from ..training.recipes import DEFAULT_COEFFICIENTS, METHODS, Run
from ._shared import figure_png, show_in

# The steps slider's bounds. A step of balancing_run is 16 x 64 = 1024 tokens, ~40 ms on 2 CPU cores: 300 steps
# are ~12 s, so no setting runs for minutes. TrainingConfig's guard (MAX_TOKENS) would refuse a run above
# `guard_max_steps()` (~1000 steps) anyway; the slider stops well below it.
STEPS_BOUNDS = (10, 300)
RUN_SHAPE = {"batch_size": 16, "seq_len": 64}  # balancing_run's micro-batch
COEFFICIENT_BOUNDS = (-5, 0)  # the coefficient slider's exponents: 1e-5 .. 1
REDRAW_EVERY = 10  # steps between two redraws of the curve while training


def guard_max_steps() -> int:
    """The most steps of a balancing_run that TrainingConfig's guard lets through (MAX_TOKENS, with its one
    validation pass)."""
    config = TrainingConfig(steps=STEPS_BOUNDS[0], progress=False, **RUN_SHAPE)
    validation = config.eval_batches * config.batch_size * config.seq_len
    return (MAX_TOKENS - validation) // config.tokens_per_step


def check_coefficient(method: str, coefficient) -> float:
    """The coefficient as a float: > 0 and finite for "switch", "bias" and "z_loss"; ignored (0) for "none"."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "none":
        return 0.0
    try:
        value = float(coefficient)
    except (TypeError, ValueError):
        raise ValueError(f"the {method} coefficient must be a number > 0, got {coefficient!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the {method} coefficient must be a finite number > 0, got {coefficient!r} "
                         f"(the default is {DEFAULT_COEFFICIENTS[method]:g})")
    return value


class TrainingExplorer:
    """A Dropdown for the balancing method, a log slider for its coefficient, a slider for the steps, a Run button.

    Run trains `balancing_run(method, coefficient, steps=...)` (8 experts, top-1, routers tilted towards expert
    0), redraws the balance curve every `redraw_every` steps from the trainer's callback rows, then reports the
    held-out max / mean load before and after.

    State for Python: `settings()`, `last_run` (the `Run`), `rows` (the callback's rows of the last run),
    `figure`, `message`, `redraws` (how many times the callback redrew during the last run), `refused`.
    `runner(method, coefficient, steps=..., seed=..., callback=...)` may replace balancing_run.
    """

    def __init__(self, *, method: str = "switch", coefficient: float | None = None, steps: int = 100,
                 seed: int = 0, redraw_every: int = REDRAW_EVERY, runner=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.seed, self.redraw_every, self.runner = seed, int(redraw_every), runner
        style = {"description_width": "110px"}
        layout = W.Layout(width="420px")
        self.method = W.Dropdown(options=list(METHODS), value=method, description="method", style=style)
        self.coefficient = W.FloatLogSlider(value=DEFAULT_COEFFICIENTS["switch"], base=10, min=COEFFICIENT_BOUNDS[0],
                                            max=COEFFICIENT_BOUNDS[1], step=0.25, description="coefficient",
                                            readout_format=".1e", style=style, layout=layout,
                                            continuous_update=False)
        self.steps = W.IntSlider(steps, STEPS_BOUNDS[0], min(STEPS_BOUNDS[1], guard_max_steps()),
                                 description="steps", style=style, layout=layout, continuous_update=False)
        self.guard_label = W.Label(
            f"steps stop at {self.steps.max}: a step is {RUN_SHAPE['batch_size']} x {RUN_SHAPE['seq_len']} tokens, "
            f"~40 ms on 2 CPU cores, so no setting trains for minutes (TrainingConfig's guard, MAX_TOKENS = "
            f"{MAX_TOKENS}, would refuse more than {guard_max_steps()} steps anyway)")
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.Label()
        self.plot_out = W.Output()

        self.last_run: Run | None = None
        self.rows: list[dict] = []
        self.figure: Figure | None = None
        self.message = ""
        self.redraws = 0
        self.refused = False

        self.method.observe(self._on_method, names="value")
        self._on_method({"new": method})
        if coefficient is not None:
            self.coefficient.value = coefficient
        self.run_button.on_click(lambda button: self._clicked())
        self.widget = W.VBox([self.method, self.coefficient, self.steps, self.guard_label, self.run_button,
                              self.status, self.plot_out])

    # ------------------------------------------------------------------ state

    def settings(self) -> dict:
        """The controls' values, as the arguments of a run."""
        return {"method": self.method.value, "coefficient": self.coefficient.value, "steps": self.steps.value}

    def _on_method(self, change) -> None:
        method = change["new"]
        self.coefficient.disabled = method == "none"  # no balancing: nothing to weigh
        if method != "none":
            self.coefficient.value = DEFAULT_COEFFICIENTS[method]

    # ---------------------------------------------------------------- actions

    def run(self, *, coefficient=None) -> Run:
        """What the Run button does, with the controls' settings (`coefficient` overrides the slider's, e.g. to
        try a value the slider does not reach). A coefficient <= 0 or NaN is refused: `message` says why, and a
        ValueError is raised; nothing runs."""
        s = self.settings()
        raw = s["coefficient"] if coefficient is None else coefficient
        try:
            value = check_coefficient(s["method"], raw)
        except ValueError as error:
            self._refuse(f"refused, nothing was run: {error}")
            raise
        steps = s["steps"]
        if not STEPS_BOUNDS[0] <= steps <= self.steps.max:
            self._refuse(f"refused, nothing was run: steps must be in [{STEPS_BOUNDS[0]}, {self.steps.max}], "
                         f"got {steps}")
            raise ValueError(self.message)
        self.refused = False
        self.rows, self.redraws = [], 0
        label = s["method"] if s["method"] == "none" else f"{s['method']} {value:.1e}"
        self._set_status(f"training {label} for {steps} steps...")

        def callback(trainer, row):
            self.rows.append(dict(row))
            if len(self.rows) % self.redraw_every == 0 and len(self.rows) < steps:
                self._draw(label, steps)
                self.redraws += 1
                self._set_status(f"training {label}: step {len(self.rows)} / {steps}")
            return False

        runner = balancing_run if self.runner is None else self.runner
        self.last_run = runner(s["method"], value, steps=steps, seed=self.seed, callback=callback)
        self._draw(label, steps)
        before, after = self.last_run.before.max_mean_load(), self.last_run.after.max_mean_load()
        self.message = (f"{label}, {steps} steps: held-out max/mean load per layer: before {_layers(before)}, "
                        f"after {_layers(after)} (1.00 = balanced, 8.00 = all on one expert)")
        self._set_status(self.message)
        return self.last_run

    def _clicked(self) -> None:
        try:
            self.run()
        except ValueError:
            pass  # the refusal is in the status line

    def _refuse(self, message: str) -> None:
        self.refused = True
        self.message = message
        self._set_status(message)

    def _set_status(self, text: str) -> None:
        self.status.value = text

    # ---------------------------------------------------------------- views

    def plot(self, rows: list[dict], label: str, steps: int) -> Figure:
        """max / mean load per step of `rows`, one line per layer, the x axis spanning the whole run."""
        fig = plot_balance_curves({label: pd.DataFrame.from_records(rows)}, "max_mean_load", layer="each")
        ax = fig.axes[0]
        ax.set_xlim(0, steps + 1)
        ax.set_title(f"max / mean load over training, step {len(rows)} / {steps}", fontsize="medium")
        return fig

    def _draw(self, label: str, steps: int) -> None:
        self.figure = self.plot(self.rows, label, steps)
        show_in(self.plot_out, figure_png(self.figure))

    def _ipython_display_(self):
        display(self.widget)


def _layers(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
