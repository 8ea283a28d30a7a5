"""What both widgets share: the built-in backends they offer, and how they write to their Output widgets.

Outputs are written with `Output.outputs = ()` + `append_display_data(...)` rather than `with out:`, because
the latter only captures output inside a running kernel; this way the widget shows the same thing in
JupyterLab, under nbval and in plain pytest.
"""

from __future__ import annotations

import io

import ipywidgets as W
from IPython.display import Image
from matplotlib.figure import Figure

BACKENDS = ("eager", "batched_mm", "grouped_mm")


def _png(fig: Figure) -> Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return Image(data=buf.getvalue(), format="png")


def _show(out: W.Output, *objects) -> None:
    out.outputs = ()
    for obj in objects:
        out.append_display_data(obj)
