"""Widgets for the notebooks: the backend explorer (notebook 7) and the trace stepper (notebooks 3 to 5).

Both keep their state on plain Python attributes, so a test (or a curious learner) can drive them without a
browser or even a kernel: set a slider's `.value`, call `.run()` (what the Run button does), then read
`.last_results` (a pandas DataFrame), `.figure` (a matplotlib Figure) and `.message`.

The explorer measures with `moelab.bench.sweep` and refuses over-budget configurations with the bench's own
memory guard (`guard` below), so a learner's Run and a headless benchmark agree on what they measure and refuse.

Outputs are written with `Output.outputs = ()` + `append_display_data(...)` rather than `with out:`, because
the latter only captures output inside a running kernel; this way the widget shows the same thing in
JupyterLab, under nbval and in plain pytest.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from typing import Callable, Sequence

import ipywidgets as W
import pandas as pd
import torch
from IPython.display import HTML, Image
from matplotlib.figure import Figure

from .compare import parse_dtype
from .config import MoEConfig
from .memory import BACKENDS as MODELLED, analytic, format_bytes, quiet_stderr  # noqa: F401 (re-exported)

__all__ = ["BackendExplorer", "TraceStepper", "crossovers", "seq_len_points", "guard", "estimate_peak_bytes",
           "probed_peak_bytes", "local_sweep", "quiet_stderr", "DEFAULT_BUDGET_BYTES"]

BACKENDS = ("eager", "batched_mm", "grouped_mm")
COLORS = {"eager": "tab:blue", "batched_mm": "tab:red", "grouped_mm": "tab:green"}
DEFAULT_BUDGET_BYTES = 256 * 2**20  # per measurement; small on purpose: the machines are shared

# Slider bounds: with H=64, I=128 the largest allowed call is T = 16 * 256 = 4096 tokens, k = 8, E = 64, where
# eager and grouped_mm need tens of MiB and batched_mm about 3 GiB in float32: the guard refuses that one.
BOUNDS = {"top_k": (1, 8), "num_experts": (2, 64), "batch_size": (1, 16), "seq_len": (1, 256)}


def seq_len_points(seq_len: int) -> list[int]:
    """The sequence lengths a sweep visits: powers of two below `seq_len`, then `seq_len` itself."""
    points, p = [], 1
    while p < seq_len:
        points.append(p)
        p *= 2
    return points + [seq_len]


PROBE_TOKENS = 16
_probe_cache: dict = {}


def probed_peak_bytes(config: MoEConfig, num_tokens: int, backend: str, dtype, probe_tokens: int = PROBE_TOKENS) -> int:
    """For a backend without a memory model (your own): measure one call at `probe_tokens` tokens and scale it
    linearly to `num_tokens`. A linear guess: a backend whose memory grows faster than T is underestimated."""
    from .memory import measure
    from .moe import SparseMoE

    torch_dtype = parse_dtype(dtype)
    t0 = max(1, min(num_tokens, probe_tokens))
    key = (backend, config.num_experts, config.hidden_size, config.intermediate_size, config.top_k, torch_dtype, t0)
    if key not in _probe_cache:
        moe = SparseMoE(config, backend, dtype=torch_dtype, seed=0)
        x = torch.randn(t0, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch_dtype)
        with torch.no_grad():
            moe(x)  # warm-up: one-time allocations are not the call's
            with quiet_stderr():
                _probe_cache[key] = measure(lambda: moe(x)).peak_bytes
    return math.ceil(_probe_cache[key] * num_tokens / t0)


def _bench():
    """`moelab.bench` when it imports (it is optional for the widgets), else None."""
    try:
        from . import bench
    except ImportError:
        return None
    return bench


def estimate_peak_bytes(config: MoEConfig, num_tokens: int, backend: str, dtype) -> tuple[int, str]:
    """(peak bytes of one call, 'analytic' or 'probed'): the memory model where there is one, else a probe."""
    try:
        return analytic(config, num_tokens, backend, parse_dtype(dtype)).peak_bytes, "analytic"
    except ValueError:  # no memory model for this backend
        return probed_peak_bytes(config, num_tokens, backend, dtype), "probed"


def guard(config: MoEConfig, num_tokens: int, backends: Sequence[str], dtype, budget_bytes: int,
          compiled: bool = False) -> pd.DataFrame:
    """The memory guard: the bytes one measurement at `num_tokens` tokens needs, per backend, against the budget.

    For the backends with a memory model (and `auto`) this is `moelab.bench`'s own guard estimate (resident
    weights and inputs + the analytic peak of the call), so the explorer refuses exactly what a sweep would skip.
    A backend without a model (your own) is measured at a few tokens and scaled linearly (`probed_peak_bytes`).
    Nothing big ever runs to find out. Columns: backend, num_tokens, peak_bytes, estimate ('analytic' or
    'probed'), budget_bytes, fits, reason ('' when it fits).
    """
    bench = _bench()
    torch_dtype = parse_dtype(dtype)
    rows = []
    for name in backends:
        modelled = name in MODELLED or name == "auto"
        if modelled and bench is not None:
            est = bench.guard.estimate(config, num_tokens, name, torch_dtype, compiled=compiled)
            peak, how = est.total_bytes, "analytic"
            what = (f"{name}{' compiled' if compiled else ''} at T={num_tokens} tokens (E={config.num_experts}, "
                    f"k={config.top_k}, {str(torch_dtype).removeprefix('torch.')})")
            reason = bench.guard.check(est, budget_bytes, what) or ""
        else:
            peak, how = estimate_peak_bytes(config, num_tokens, "grouped_mm" if name == "auto" else name, torch_dtype)
            source = ("analytic peak" if how == "analytic"
                      else f"measured at T={min(num_tokens, PROBE_TOKENS)} and scaled linearly")
            reason = "" if peak <= budget_bytes else (
                f"{name} needs {format_bytes(peak)} at T={num_tokens} tokens ({source}), over the budget of "
                f"{format_bytes(budget_bytes)}")
        rows.append({"backend": name, "num_tokens": num_tokens, "peak_bytes": peak, "estimate": how,
                     "budget_bytes": budget_bytes, "fits": not reason, "reason": reason})
    return pd.DataFrame(rows)


def measured(results: pd.DataFrame) -> pd.DataFrame:
    """The rows that were measured: `status == "ok"` in a bench table (all rows of a table without status)."""
    return results[results["status"] == "ok"] if "status" in results else results


def crossovers(results: pd.DataFrame, metric: str = "median_ms", x: str = "num_tokens") -> pd.DataFrame:
    """Where two backends swap places on `metric` between two neighbouring `x` points.

    Returns one row per crossover: a, b (the pair), x_before, x_after, faster_before, faster_after.
    """
    wide = measured(results).pivot_table(index=x, columns="backend", values=metric).sort_index()
    names = list(wide.columns)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = (wide[a] - wide[b]).dropna()
            for (x0, d0), (x1, d1) in zip(diff.items(), list(diff.items())[1:]):
                if d0 != 0 and d1 != 0 and (d0 > 0) != (d1 > 0):
                    rows.append({"a": a, "b": b, "x_before": x0, "x_after": x1,
                                 "faster_before": a if d0 < 0 else b, "faster_after": a if d1 < 0 else b})
    return pd.DataFrame(rows, columns=["a", "b", "x_before", "x_after", "faster_before", "faster_after"])


def _time_call(fn: Callable[[], object], min_run_time: float) -> tuple[float, float]:
    import torch.utils.benchmark as benchmark

    m = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=1).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def bench_sweep(config: MoEConfig, batch_size: int, seq_lens: Sequence[int], backends: Sequence[str],
                dtype="float32", compile: bool = False, seed: int = 0, min_run_time: float = 0.02,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> pd.DataFrame:
    """`moelab.bench.sweep` over the explorer's settings: one row per (backend, sequence length), every column of
    the sweep (status, reason, median_ms, peak_extra_bytes measured, estimate_bytes, ...) plus the explorer's
    `compile` (= compiled) and `peak_bytes` (= peak_extra_bytes, the measured peak of the experts call)."""
    from . import bench

    with quiet_stderr():  # the memory measurement's profiler logs to fd 2
        table = bench.sweep(backends=tuple(backends), tokens=[(batch_size, s) for s in seq_lens],
                            num_experts=[config.num_experts], top_k=[config.top_k], hidden_size=[config.hidden_size],
                            intermediate_size=[config.intermediate_size], dtypes=[dtype], compiled=[bool(compile)],
                            min_run_time=min_run_time, memory_budget=int(budget_bytes), measure_memory=True,
                            dense_limit=False, hidden_act=config.hidden_act, seed=seed, progress=False)
    table["compile"] = table["compiled"].astype(bool)
    table["peak_bytes"] = table["peak_extra_bytes"]
    return table


@contextlib.contextmanager
def _one_thread():
    """Time on one thread (steadier on a shared machine), and keep it one thread for the whole sweep: a compiled
    module guards on the thread count, so switching it between warm-up and timing would recompile every call."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def local_sweep(config: MoEConfig, batch_size: int, seq_lens: Sequence[int], backends: Sequence[str],
                dtype="float32", compile: bool = False, seed: int = 0, min_run_time: float = 0.02) -> pd.DataFrame:
    """Time one `SparseMoE` call per backend at each sequence length; a tidy table, one row per (backend, point).

    Every backend runs the same weights (`seed`) on the same inputs; with `compile`, each backend gets one
    `torch.compile(..., dynamic=True)` module, compiled on its first call and reused across sequence lengths.
    Columns: backend, batch_size, seq_len, num_tokens, top_k, num_experts, dtype, compile, median_ms, iqr_ms,
    peak_bytes (analytic, or probed for a backend without a memory model: see `peak_estimate`),
    max_abs_diff_to_eager.
    """
    from .moe import SparseMoE

    torch_dtype = parse_dtype(dtype)
    inputs, references = {}, {}
    reference_moe = SparseMoE(config, "eager", dtype=torch_dtype, seed=seed)
    rows = []
    with torch.no_grad(), _one_thread():
        for seq_len in seq_lens:
            # not the weights' seed: x would copy the router's rows
            generator = torch.Generator().manual_seed(seed + 1 + seq_len)
            x = torch.randn(batch_size * seq_len, config.hidden_size, generator=generator).to(torch_dtype)
            inputs[seq_len], references[seq_len] = x, reference_moe(x).float()
        for name in backends:
            moe = SparseMoE(config, name, dtype=torch_dtype, seed=seed)
            fn = torch.compile(moe, dynamic=True) if compile else moe
            for seq_len in seq_lens:
                x, num_tokens = inputs[seq_len], batch_size * seq_len
                out = fn(x).float()  # also the warm-up (and the compile, on the first point)
                median_ms, iqr_ms = _time_call(lambda: fn(x), min_run_time)
                peak, how = estimate_peak_bytes(config, num_tokens, name, torch_dtype)
                rows.append({"backend": name, "batch_size": batch_size, "seq_len": seq_len,
                             "num_tokens": num_tokens, "top_k": config.top_k, "num_experts": config.num_experts,
                             "dtype": str(torch_dtype).removeprefix("torch."), "compile": bool(compile),
                             "median_ms": median_ms, "iqr_ms": iqr_ms, "peak_bytes": peak, "peak_estimate": how,
                             "max_abs_diff_to_eager": (out - references[seq_len]).abs().max().item()})
    return pd.DataFrame(rows)


def _png(fig: Figure) -> Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return Image(data=buf.getvalue(), format="png")


def _show(out: W.Output, *objects) -> None:
    out.outputs = ()
    for obj in objects:
        out.append_display_data(obj)


class BackendExplorer:
    """Sliders for top_k, num_experts, batch size and sequence length, dtype and compile; a Run button.

    Run sweeps the sequence length over powers of two up to the slider's value (so crossovers show; 3 points with
    compile) with `moelab.bench.sweep` (`local_sweep` where `moelab.bench` is missing), which times every
    selected backend at each point and measures its peak memory; the widget draws both against the token count
    and marks the crossovers. Before that, `guard` checks the largest call of every selected backend: over
    `budget_bytes` for any of them, the configuration is refused with the reason and nothing runs. The sliders
    are bounded (`BOUNDS`) so that, of the built-in backends, only batched_mm can exceed the default budget.

    State for Python: `settings()`, `last_results` (tidy DataFrame: one row per backend and sequence length,
    carrying the slider settings), `last_guard` (the guard's table), `figure`, `message`, `refused`, `runs`.
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
        from .backends import ExpertsInterface

        options = list(dict.fromkeys([*BACKENDS, *backends, *ExpertsInterface.names()]))
        self.backends = W.SelectMultiple(options=options, value=tuple(backends),
                                         description="backends", style=style, rows=min(len(options), 5))
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.HTML()
        self.table_out = W.Output(layout=W.Layout(border="1px solid #ddd"))
        self.plot_out = W.Output()

        self.last_results: pd.DataFrame | None = None
        self.last_guard: pd.DataFrame | None = None
        self.figure: Figure | None = None
        self.message = ""
        self.refused = False
        self.runs = 0  # how many times the runner really ran

        self.num_experts.observe(self._on_num_experts, names="value")
        for w in (self.top_k, self.batch_size, self.seq_len, self.dtype, self.backends, self.compile):
            w.observe(lambda change: self._preview(), names="value")
        self.run_button.on_click(lambda button: self.run())
        controls = W.VBox([self.num_experts, self.top_k, self.batch_size, self.seq_len,
                           W.HBox([self.dtype, self.backends]), self.compile, self.run_button, self.status])
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
        points = seq_len_points(self.seq_len.value)
        if self.compile.value and len(points) > 3:
            points = [points[0], points[len(points) // 2], points[-1]]
        return points

    def _runner(self) -> Callable:
        """The timing function: `runner` if given, else `moelab.bench.sweep` (or `local_sweep` without it)."""
        if self.runner is not None:
            return self.runner
        if _bench() is not None:
            return functools.partial(bench_sweep, min_run_time=self.min_run_time, budget_bytes=self.budget_bytes)
        return functools.partial(local_sweep, min_run_time=self.min_run_time)

    def check(self) -> pd.DataFrame:
        """The guard's table for the current settings, at the largest call (batch_size * seq_len tokens)."""
        s = self.settings()
        return guard(self.config(), s["batch_size"] * s["seq_len"], s["backends"], s["dtype"], self.budget_bytes,
                     compiled=s["compile"])

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
        _show(self.table_out, HTML(self._table_html(self.last_results)))
        _show(self.plot_out, _png(self.figure))
        return self.last_results

    def _refuse(self, message: str) -> None:
        self.refused = True
        self.message = message
        self.last_results = None
        self.figure = None
        self._set_status(message, "#b00020")
        _show(self.table_out, HTML(f"<p style='color:#b00020'>{message}</p>"))
        self.plot_out.outputs = ()
        return None

    def _set_status(self, text: str, color: str) -> None:
        self.status.value = f"<span style='color:{color}'>{text}</span>"

    def _on_num_experts(self, change) -> None:
        self.top_k.max = min(BOUNDS["top_k"][1], change["new"])  # clamps top_k's value too
        self._preview()

    def _preview(self) -> None:
        """Live guard: the analytic peak of the largest call per backend, before anything runs."""
        if not self.backends.value:
            self._set_status("select at least one backend", "#b00020")
            return
        table = self.check()
        parts = []
        for row in table.itertuples():
            peak = format_bytes(row.peak_bytes) + (" (probed)" if row.estimate == "probed" else "")
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
        results = measured(results)
        fig = Figure(figsize=(10, 3.6))
        ax_time, ax_mem = fig.subplots(1, 2)
        for name, group in results.groupby("backend", sort=False):
            group = group.sort_values("num_tokens")
            color = COLORS.get(name)
            ax_time.plot(group["num_tokens"], group["median_ms"], "o-", label=name, color=color)
            ax_mem.plot(group["num_tokens"], group["peak_bytes"] / 2**20, "o-", label=name, color=color)
        if results.empty:
            ax_time.text(0.5, 0.5, "nothing measured (see the table's reasons)", ha="center",
                         transform=ax_time.transAxes)
        for row in crossovers(results).itertuples():
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
        from IPython.display import display

        display(self.widget)


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
        self.step_slider = W.IntSlider(0, 0, 0, description="step", continuous_update=False)
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
        from .inspect import inspect

        self.moe.set_experts_implementation(self.backend.value)
        with torch.no_grad(), inspect(self.moe) as trace:
            self.moe(self.hidden_states)
        self.trace = trace
        n = len(trace.steps)
        with self.step_slider.hold_trait_notifications():
            self.step_slider.value = 0
            self.step_slider.max = max(n - 1, 0)
        self._show_step()

    def _show_step(self) -> None:
        steps = self.trace.steps
        self.step = step = steps[min(self.step_slider.value, len(steps) - 1)]
        self.header.value = (f"<b>step {self.step_slider.value + 1}/{len(steps)}: {step.name}</b> "
                             f"({self.backend.value}): {step.explanation}")
        self.table = step_table(step)
        _show(self.table_out, HTML(self.table.to_html(index=False)))
        self.figure = step_figure(step, self.trace.calls[step.call])
        if self.figure is None:
            self.plot_out.outputs = ()
        else:
            _show(self.plot_out, _png(self.figure))

    def _ipython_display_(self):
        from IPython.display import display

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
    from . import inspect_plots as P

    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    try:
        if step.name == "route":
            P.plot_routing(call, ax=ax)
            return fig
        if step.name in ("sort", "unsort") and call.find("offsets"):
            P.plot_permutation(call, ax=ax)
            return fig
        if step.name == "offsets":
            P.plot_tokens_per_expert(call, ax=ax)
            return fig
        if step.name in ("expert_mask", "gather_weights"):
            P._backend_view(call, ax)
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
