"""`TraceStepper`, the widget of notebooks 3 to 5, and the pictures behind it (`step_table`, `step_figure`).

Pick a backend, and the stepper traces one call of it with `moelab.inspect`; slide through the trace's steps to
see each step's tensors as a table and, where one fits, a picture drawn with `moelab.inspection.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as W
import pandas as pd
import torch
from IPython.display import HTML, display
from matplotlib.figure import Figure

from ..inspection import inspect
from ..inspection import plots as trace_plots
from ..memory import format_bytes
from ._shared import BACKENDS, figure_png, show_in


class TraceStepper:
    """Pick a backend, slide through the steps of its trace, see each step's tensors and picture.

    State: `trace` (the current backend's `moelab.inspect` trace), `step` (the current `Step`), `table` (its
    tensors as a DataFrame), `figure` (its picture, or None). `moe` is switched to the chosen backend.
    """

    def __init__(self, moe, hidden_states: torch.Tensor, backends: Sequence[str] = BACKENDS):
        self.moe, self.hidden_states = moe, hidden_states
        self.backend = W.Dropdown(options=list(backends), value=moe.get_experts_implementation()
                                  if moe.get_experts_implementation() in backends else backends[0],
                                  description="backend")
        self.step_slider = W.IntSlider(1, 1, 1, description="step", continuous_update=False)  # 1-based, as the header
        self.header = W.HTML()
        self.table_out = W.Output()
        self.plot_out = W.Output()
        self.trace = None
        self.step = None
        self.table: pd.DataFrame | None = None
        self.figure: Figure | None = None
        self.backend.observe(lambda change: self._retrace(), names="value")
        self.step_slider.observe(lambda change: self._show_step(), names="value")
        self.widget = W.VBox([W.HBox([self.backend, self.step_slider]), self.header, self.table_out, self.plot_out])
        self._retrace()

    def _retrace(self) -> None:
        self.moe.set_experts_implementation(self.backend.value)
        with torch.no_grad(), inspect(self.moe) as trace:
            self.moe(self.hidden_states)
        self.trace = trace
        n = len(trace.steps)
        with self.step_slider.hold_trait_notifications():
            self.step_slider.value = 1
            self.step_slider.max = max(n, 1)
        self._show_step()

    def _show_step(self) -> None:
        steps = self.trace.steps
        number = min(self.step_slider.value, len(steps))  # 1 ... len(steps)
        self.step = step = steps[number - 1]
        self.header.value = (f"<b>step {number}/{len(steps)}: {step.name}</b> "
                             f"({self.backend.value}): {step.explanation}")
        self.table = step_table(step)
        show_in(self.table_out, HTML(self.table.to_html(index=False)))
        self.figure = step_figure(step, self.trace.calls[step.call])
        if self.figure is None:
            self.plot_out.outputs = ()
        else:
            show_in(self.plot_out, figure_png(self.figure))

    def _ipython_display_(self):
        display(self.widget)


def step_table(step) -> pd.DataFrame:
    """A step's tensors and context values: key, shape, dtype, bytes (formatted), derived."""
    frame = step.to_frame()
    frame["bytes"] = frame["bytes"].map(lambda v: "" if v is None or v != v else format_bytes(v))
    return frame


def _plot_gathered(step, num_tokens: int, ax) -> None:
    """eager's `expert` step: which of the T tokens this expert gathered, coloured by the choice slot."""
    slot = torch.full((num_tokens,), -1)
    slot[step.tensors["token_idx"]] = step.tensors["top_k_pos"]
    colors = ["#dddddd" if s < 0 else ("tab:blue", "tab:orange", "tab:green", "tab:red")[int(s) % 4]
              for s in slot.tolist()]
    ax.bar(range(num_tokens), [1 if s >= 0 else 0.15 for s in slot.tolist()], color=colors)
    ax.set_yticks([])
    ax.set_xlabel("token (blue: its 1st choice, orange: its 2nd, ...; grey: not routed here)")
    ax.set_title(f"expert {step.info.get('expert_id')} gathers {len(step.tensors['token_idx'])} of "
                 f"{num_tokens} tokens", fontsize=9)


def step_figure(step, call) -> Figure | None:
    """The picture of one step: the trace's own plots where one fits the step, else the step's first small tensor
    as an image (2D) or bars (1D)."""
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    try:
        if step.name == "route":
            trace_plots.plot_routing(call, ax=ax)
            return fig
        if step.name in ("sort", "unsort") and call.find("offsets"):
            trace_plots.plot_permutation(call, ax=ax)
            return fig
        if step.name == "offsets":
            trace_plots.plot_tokens_per_expert(call, ax=ax)
            return fig
        if step.name in ("expert_mask", "gather_weights"):
            trace_plots.backend_view(call, ax)
            return fig
        if step.name == "expert" and "token_idx" in step.tensors and call.num_tokens:
            _plot_gathered(step, call.num_tokens, ax)
            return fig
    except (ValueError, KeyError):
        ax.clear()
    for name, value in step.tensors.items():
        if isinstance(value, torch.Tensor) and value.numel() and value.dim() in (1, 2) and value.device.type != "meta":
            data = value.detach().float().numpy()
            if data.ndim == 1:
                ax.bar(range(len(data)), data)
                ax.set_xlabel("position")
            else:
                im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
                fig.colorbar(im, ax=ax)
                ax.set_xlabel("column")
                ax.set_ylabel("row")
            ax.set_title(f"{step.name}: {name} {list(value.shape)}", fontsize=9)
            return fig
    return None
