"""`EPScaleExplorer`, the widget of notebook 15: one published MoE layer under expert parallelism, on paper.

Pick a preset (`moelab.parallel.scale.PRESETS`), then vary the EP degree, the link bandwidth, the FLOP rate, the
routing imbalance and the tokens per rank: the bars show the busiest rank's communication (dispatch + combine)
against its expert compute, from `moelab.parallel.scale.preset_cost`. Nothing runs but arithmetic, so every change
redraws at once. As in `_shared`, outputs are written without `with out:`, so a test drives it without a kernel:
set `.bandwidth.value`, read `.last_results` (the cost dict), `.figure` and `.message`.
"""

from __future__ import annotations

import ipywidgets as W
from IPython.display import display
from matplotlib.figure import Figure

from ..parallel.scale import DEFAULT_TFLOPS, DEFAULT_TOKENS_PER_RANK, PRESETS, preset_cost
from ._shared import figure_png, show_in

BANDWIDTH_BOUNDS_GBS = (1.0, 2000.0)  # a slow Ethernet link up to beyond NVLink
TFLOPS_BOUNDS = (1.0, 2000.0)
TOKENS_CHOICES = (256, 512, 1024, 2048, 4096, 8192, 16384)
MAX_IMBALANCE = 8.0  # the slider stops here (max / mean can reach ep, but beyond ~8 nothing new is learnt)


def ep_choices(num_experts: int) -> list[int]:
    """The EP degrees a layer of `num_experts` experts allows: the divisors of E (each rank holds E / ep)."""
    return [d for d in range(1, num_experts + 1) if num_experts % d == 0]


class EPScaleExplorer:
    """Dropdowns for the preset, ep and tokens per rank; log sliders for the bandwidth (GB/s) and the FLOP rate
    (TFLOP/s); a slider for the imbalance. Every change recomputes `last_results` and redraws `figure`.

    State for Python: `settings()`, `last_results` (dict of `preset_cost`), `figure`, `message`, `updates` (how
    many times it recomputed).
    """

    def __init__(self, preset: str = "DeepSeek-V3", *, bandwidth_gbs: float = 50.0, tflops: float = DEFAULT_TFLOPS,
                 imbalance: float = 1.0, tokens_per_rank: int = DEFAULT_TOKENS_PER_RANK):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
        if tokens_per_rank not in TOKENS_CHOICES:
            raise ValueError(f"tokens_per_rank must be one of {list(TOKENS_CHOICES)}, got {tokens_per_rank!r}")
        style = {"description_width": "130px"}
        layout = W.Layout(width="440px")
        self.preset = W.Dropdown(options=list(PRESETS), value=preset, description="preset", style=style)
        self.ep = W.Dropdown(options=ep_choices(PRESETS[preset].num_experts), value=PRESETS[preset].ep,
                             description="ep (ranks)", style=style)
        self.tokens = W.Dropdown(options=list(TOKENS_CHOICES), value=tokens_per_rank, description="tokens per rank",
                                 style=style)
        self.bandwidth = W.FloatLogSlider(value=bandwidth_gbs, base=10, min=0, max=3.3, step=0.05,
                                          description="bandwidth GB/s", readout_format=".0f", style=style,
                                          layout=layout)
        self.tflops = W.FloatLogSlider(value=tflops, base=10, min=0, max=3.3, step=0.05, description="TFLOP/s",
                                       readout_format=".0f", style=style, layout=layout)
        self.imbalance = W.FloatSlider(value=imbalance, min=1.0, max=MAX_IMBALANCE, step=0.05,
                                       description="imbalance (max/mean)", readout_format=".2f", style=style,
                                       layout=layout)
        self.status = W.Label()
        self.plot_out = W.Output()
        self.last_results: dict | None = None
        self.figure: Figure | None = None
        self.message = ""
        self.updates = 0
        self._switching = False
        self.preset.observe(self._on_preset, names="value")
        for control in (self.ep, self.tokens, self.bandwidth, self.tflops, self.imbalance):
            control.observe(lambda change: self.update(), names="value")
        self.widget = W.VBox([self.preset, self.ep, self.tokens, self.bandwidth, self.tflops, self.imbalance,
                              self.status, self.plot_out])
        self.update()

    def settings(self) -> dict:
        """The controls' values, as the keyword arguments of `preset_cost`."""
        return {"preset": self.preset.value, "ep": self.ep.value, "tokens_per_rank": self.tokens.value,
                "bandwidth_gbs": self.bandwidth.value, "tflops": self.tflops.value,
                "imbalance": min(self.imbalance.value, float(self.ep.value))}

    def _on_preset(self, change) -> None:
        preset = PRESETS[change["new"]]
        self._switching = True  # new options reset ep's value on the way: one update for the new preset, at the end
        try:
            self.ep.options = ep_choices(preset.num_experts)
            self.ep.value = preset.ep
        finally:
            self._switching = False
        self.update()

    def update(self) -> dict:
        """Recompute the model with the controls' settings and redraw; returns the cost dict."""
        if self._switching:
            return self.last_results
        s = self.settings()
        name = s.pop("preset")
        # NOTE: max / mean of ep ranks cannot exceed ep, so the imbalance is capped at ep (ep = 1: no imbalance)
        self.last_results = cost = preset_cost(name, **s)
        self.updates += 1
        self.figure = self.plot(cost)
        clamped = " (imbalance capped at ep)" if self.imbalance.value > cost["ep"] else ""
        self.message = (f"{name}, ep = {cost['ep']}, {cost['tokens_per_rank']} tokens per rank: communication "
                        f"{cost['comm_ms']:.3g} ms vs compute {cost['compute_ms']:.3g} ms on the busiest rank: "
                        f"{cost['dominates']} dominates{clamped}; {cost['bytes_per_token'] / 1024:.1f} KiB per "
                        f"token on the wire")
        self.status.value = self.message
        show_in(self.plot_out, figure_png(self.figure))
        return cost

    def plot(self, cost: dict) -> Figure:
        """Two horizontal bars: the busiest rank's communication and compute, in ms."""
        fig = Figure(figsize=(7.0, 2.2), layout="constrained")
        ax = fig.add_subplot()
        values = [cost["comm_ms"], cost["compute_ms"]]
        bars = ax.barh(["communication\n(dispatch + combine)", "expert compute"], values,
                       color=["#e6550d", "#3182bd"])
        for bar, value in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.3g} ms", va="center",
                    fontsize="small")
        ax.set_xlim(0, max(values + [1e-9]) * 1.25)
        ax.invert_yaxis()
        ax.set_xlabel("ms per layer on the busiest rank")
        ax.set_title(f"{cost['preset']}: ep = {cost['ep']}, {cost['bandwidth_gbs']:.0f} GB/s, "
                     f"{cost['tflops']:.0f} TFLOP/s, imbalance {cost['imbalance']:.2f}", fontsize="medium")
        return fig

    def _ipython_display_(self):
        display(self.widget)
