"""`BackendExplorer`, the widget of notebook 7: sliders and a Run button over `moelab.widgets.sweeps`.

The widget only collects settings, asks the guard, calls the timing function and draws what it returns: the
measuring itself (guard, sweeps, crossovers) lives in `sweeps`, which it reaches as `sweeps.<name>` at call time,
so patching a name there (e.g. `sweeps.bench_sweep`, `sweeps.guard`) changes what the explorer does too.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Callable, Sequence

import ipywidgets as W
import pandas as pd
from IPython.display import HTML, display
from matplotlib.figure import Figure

from ..backends import ExpertsInterface
from ..core.colors import BACKEND_COLORS, backend_color
from ..core.config import MoEConfig
from ..core.machine import bf16_note
from ..memory import format_bytes
from . import sweeps
from ._shared import BACKENDS, figure_png, show_in
from .sweeps import DEFAULT_BUDGET_BYTES

COLORS = BACKEND_COLORS  # the package's one colour per backend (kept under this name for old imports)

# Slider bounds: with H=64, I=128 the largest allowed call is T = 16 * 256 = 4096 tokens, k = 8, E = 64, where
# eager and grouped_mm need tens of MiB and batched_mm about 3 GiB in float32: the guard refuses that one, and
# dropless capacity too, sized for the worst routing (C = T: an E x T buffer). Any backend can exceed a smaller
# budget: block_aligned's padding (E * (M - 1) rows) dominates at few tokens, eager's [E, k, T] mask at many.
BOUNDS = {"top_k": (1, 8), "num_experts": (2, 64), "batch_size": (1, 16), "seq_len": (1, 256)}


class BackendExplorer:
    """Sliders for top_k, num_experts, batch size and sequence length, dtype and compile; a Run button.

    Run sweeps the sequence length over powers of two up to the slider's value (so crossovers show; 3 points with
    compile) with `moelab.bench.sweep` (`sweeps.bench_sweep`), which times every selected backend at each point
    and measures its peak memory; the widget draws both against the token count
    and marks the crossovers. Before that, `guard` checks the largest call of every selected backend (each one
    registered can be selected; eager, batched_mm and grouped_mm are by default): over `budget_bytes` for any of
    them, the configuration is refused with the reason and nothing runs. The guard is the bench's
    (`moelab.bench.guard`): analytic, and for a backend whose memory depends on the routing (eager, dropless
    capacity) sized for the worst routing, since nothing has been routed yet. The sliders are bounded (`BOUNDS`);
    at their largest call batched_mm and capacity exceed the default budget.

    While bfloat16 is selected on a CPU without bfloat16 instructions, a line under the status says it is emulated
    and what that does to the times (`moelab.core.machine.bf16_note`).

    State for Python: `settings()`, `last_results` (tidy DataFrame: one row per backend and sequence length,
    carrying the slider settings), `last_guard` (the guard's table), `figure`, `message`, `note` (the bfloat16
    note shown, or None), `refused`, `runs`.
    `runner(config, batch_size, seq_lens, backends, dtype, compile, seed)` may replace the timing function.
    """

    def __init__(self, *, hidden_size: int = 64, intermediate_size: int = 128, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 backends: Sequence[str] = BACKENDS, seed: int = 0, runner: Callable | None = None,
                 min_run_time: float = 0.02, top_k: int = 2, num_experts: int = 8, batch_size: int = 4,
                 seq_len: int = 16, dtype: str = "float32", compile: bool = False):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.budget_bytes, self.seed, self.min_run_time = int(budget_bytes), seed, min_run_time
        self.runner = runner
        style = {"description_width": "110px"}
        layout = W.Layout(width="420px")
        self.num_experts = W.IntSlider(num_experts, *BOUNDS["num_experts"], description="num_experts",
                                       style=style, layout=layout, continuous_update=False)
        self.top_k = W.IntSlider(top_k, BOUNDS["top_k"][0], min(BOUNDS["top_k"][1], num_experts),
                                 description="top_k", style=style, layout=layout, continuous_update=False)
        self.batch_size = W.IntSlider(batch_size, *BOUNDS["batch_size"], description="batch_size",
                                      style=style, layout=layout, continuous_update=False)
        self.seq_len = W.IntSlider(seq_len, *BOUNDS["seq_len"], description="seq_len",
                                   style=style, layout=layout, continuous_update=False)
        self.dtype = W.Dropdown(options=["float32", "bfloat16"], value=dtype, description="dtype", style=style)
        self.compile = W.Checkbox(value=compile, description="torch.compile", style=style, layout=layout,
                                  tooltip="compiles once per backend and shape: slow (seconds each)")
        options = list(dict.fromkeys([*BACKENDS, *backends, *ExpertsInterface.names()]))
        self.backends = W.SelectMultiple(options=options, value=tuple(backends),
                                         description="backends", style=style, rows=min(len(options), 6))
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.HTML()
        self.note_html = W.HTML()
        self.table_out = W.Output(layout=W.Layout(border="1px solid #ddd"))
        self.plot_out = W.Output()

        self.last_results: pd.DataFrame | None = None
        self.last_guard: pd.DataFrame | None = None
        self.figure: Figure | None = None
        self.message = ""
        self.note: str | None = None
        self.refused = False
        self.runs = 0  # how many times the runner really ran

        self.num_experts.observe(self._on_num_experts, names="value")
        for w in (self.top_k, self.batch_size, self.seq_len, self.dtype, self.backends, self.compile):
            w.observe(lambda change: self._preview(), names="value")
        self.run_button.on_click(lambda button: self.run())
        controls = W.VBox([self.num_experts, self.top_k, self.batch_size, self.seq_len,
                           W.HBox([self.dtype, self.backends]), self.compile, self.run_button, self.status,
                           self.note_html])
        self.widget = W.VBox([controls, self.plot_out, self.table_out])
        self._preview()

    # ------------------------------------------------------------------ state

    def settings(self) -> dict:
        """The sliders' values, as the keyword arguments of a run."""
        return {"top_k": self.top_k.value, "num_experts": self.num_experts.value,
                "batch_size": self.batch_size.value, "seq_len": self.seq_len.value, "dtype": self.dtype.value,
                "compile": self.compile.value, "backends": tuple(self.backends.value)}

    def set(self, **values) -> "BackendExplorer":
        """Set several controls at once, e.g. `explorer.set(top_k=4, seq_len=64)`; num_experts first."""
        if "num_experts" in values:
            self.num_experts.value = values.pop("num_experts")
        for name, value in values.items():
            if name not in ("top_k", "batch_size", "seq_len", "dtype", "compile", "backends"):
                raise ValueError(f"unknown control {name!r}")
            getattr(self, name).value = tuple(value) if name == "backends" else value
        return self

    def config(self) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         num_experts=self.num_experts.value, top_k=self.top_k.value)

    def seq_lens(self) -> list[int]:
        """The sequence lengths a Run visits: `seq_len_points`, thinned to 3 (first, middle, last) with compile."""
        points = sweeps.seq_len_points(self.seq_len.value)
        if self.compile.value and len(points) > 3:
            points = [points[0], points[len(points) // 2], points[-1]]
        return points

    def _runner(self) -> Callable:
        """The timing function: `runner` if given, else `moelab.bench.sweep` (`sweeps.bench_sweep`), under the
        same budget as the guard (each measurement is guarded again there)."""
        if self.runner is not None:
            return self.runner
        return functools.partial(sweeps.bench_sweep, min_run_time=self.min_run_time, budget_bytes=self.budget_bytes)

    def check(self) -> pd.DataFrame:
        """The guard's table for the current settings, at the largest call (batch_size * seq_len tokens)."""
        s = self.settings()
        return sweeps.guard(self.config(), s["batch_size"] * s["seq_len"], s["backends"], s["dtype"],
                            self.budget_bytes, compiled=s["compile"])

    # ---------------------------------------------------------------- actions

    def run(self) -> pd.DataFrame | None:
        """What the Run button does. Returns the results, or None when the guard refused the configuration."""
        s = self.settings()
        self.last_guard = table = self.check()
        if not s["backends"]:
            return self._refuse("select at least one backend")
        over = table[~table["fits"]]
        if len(over):
            reasons = "; ".join(over["reason"])
            return self._refuse(f"refused, nothing was run: {reasons}. Lower seq_len, batch_size or top_k, "
                                f"or deselect {', '.join(over['backend'])}.")
        seq_lens = self.seq_lens()
        self._set_status(f"running {len(s['backends'])} backend(s) at {len(seq_lens)} sequence lengths"
                         + (" (compiling each backend per shape: slow)" if s["compile"] else "") + "...", "#555")
        results = self._runner()(config=self.config(), batch_size=s["batch_size"], seq_lens=seq_lens,
                                 backends=s["backends"], dtype=s["dtype"], compile=s["compile"], seed=self.seed)
        self.runs += 1
        self.refused = False
        self.last_results = results.reset_index(drop=True)
        self.figure = self.plot(self.last_results)
        self.message = (f"ran {', '.join(s['backends'])} at T = {s['batch_size']} x seq_len up to "
                        f"{s['batch_size'] * s['seq_len']} tokens, top_k={s['top_k']}, "
                        f"num_experts={s['num_experts']}, {s['dtype']}, compile={'on' if s['compile'] else 'off'}")
        self._set_status(self.message, "green")
        show_in(self.table_out, HTML(self._table_html(self.last_results)))
        show_in(self.plot_out, figure_png(self.figure))
        return self.last_results

    def _refuse(self, message: str) -> None:
        self.refused = True
        self.message = message
        self.last_results = None
        self.figure = None
        self._set_status(message, "#b00020")
        show_in(self.table_out, HTML(f"<p style='color:#b00020'>{message}</p>"))
        self.plot_out.outputs = ()
        return None

    def _set_status(self, text: str, color: str) -> None:
        self.status.value = f"<span style='color:{color}'>{text}</span>"

    def _on_num_experts(self, change) -> None:
        self.top_k.max = min(BOUNDS["top_k"][1], change["new"])  # clamps top_k's value too
        self._preview()

    def _show_note(self) -> None:
        self.note = bf16_note(self.dtype.value)
        shown = "" if self.note is None else f"<span style='color:#8a5a00'>{html.escape(self.note)}</span>"
        self.note_html.value = shown

    def _preview(self) -> None:
        """Live guard: the analytic peak of the largest call per backend, before anything runs; the dtype's note."""
        self._show_note()
        if not self.backends.value:
            self._set_status("select at least one backend", "#b00020")
            return
        table = self.check()
        parts = []
        for row in table.itertuples():
            peak = format_bytes(row.peak_bytes) + (f" ({row.estimate})" if row.estimate not in ("analytic",) else "")
            parts.append(f"{row.backend} {peak}" + ("" if row.fits else " (over budget)"))
        color = "#555" if table["fits"].all() else "#b00020"
        self._set_status(f"largest call T={table['num_tokens'].iloc[0]}: " + ", ".join(parts)
                         + f"; budget {format_bytes(self.budget_bytes)}", color)

    # ---------------------------------------------------------------- views

    @staticmethod
    def _table_html(results: pd.DataFrame) -> str:
        columns = ["backend", "batch_size", "seq_len", "num_tokens", "top_k", "num_experts", "dtype", "compile",
                   "median_ms", "peak_bytes"]
        if "status" in results and (results["status"] != "ok").any():
            columns += ["status", "reason"]
        shown = results[columns].copy()
        shown["median_ms"] = shown["median_ms"].map(lambda v: f"{v:.3g}")
        shown["peak_bytes"] = shown["peak_bytes"].map(lambda v: "-" if v != v else format_bytes(v))
        return shown.to_html(index=False, classes="moelab-results")

    def plot(self, results: pd.DataFrame) -> Figure:
        """Time and peak memory against tokens, one line per backend (measured rows only), crossovers marked."""
        title_row = results.iloc[0] if len(results) else None
        results = sweeps.measured(results)
        fig = Figure(figsize=(10, 3.6))
        ax_time, ax_mem = fig.subplots(1, 2)
        for name, group in results.groupby("backend", sort=False):
            group = group.sort_values("num_tokens")
            color = backend_color(name)
            ax_time.plot(group["num_tokens"], group["median_ms"], "o-", label=name, color=color)
            ax_mem.plot(group["num_tokens"], group["peak_bytes"] / 2**20, "o-", label=name, color=color)
        if results.empty:
            ax_time.text(0.5, 0.5, "nothing measured (see the table's reasons)", ha="center",
                         transform=ax_time.transAxes)
        for row in sweeps.crossovers(results).itertuples():
            x = math.sqrt(row.x_before * row.x_after)
            ax_time.axvline(x, color="gray", ls=":", lw=1)
            ax_time.annotate(f"{row.faster_after} overtakes", (x, 0.97), xycoords=("data", "axes fraction"),
                             rotation=90, va="top", ha="right", fontsize=7, color="gray")
        ax_mem.axhline(self.budget_bytes / 2**20, color="#b00020", ls="--", lw=1, label="budget")
        for ax, ylabel in ((ax_time, "median time (ms)"), (ax_mem, "peak memory of one call (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens T = batch_size x seq_len")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        if title_row is not None:
            fig.suptitle(f"top_k={title_row['top_k']}, num_experts={title_row['num_experts']}, "
                         f"{title_row['dtype']}, compile={'on' if title_row['compile'] else 'off'}", fontsize=10)
        fig.tight_layout()
        return fig

    def _ipython_display_(self):
        display(self.widget)
