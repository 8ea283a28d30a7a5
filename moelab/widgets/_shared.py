"""What the widgets share: the backends they select by default, and how they write to their Output widgets.

Outputs are written with `Output.outputs = ()` + `append_display_data(...)` rather than `with out:`, because
the latter only captures output inside a running kernel; this way the widget shows the same thing in
JupyterLab, under nbval and in plain pytest.
"""

from __future__ import annotations

import io

import ipywidgets as W
from IPython.display import Image
from matplotlib.figure import Figure

from ..backends.calibration import REFERENCE_BACKENDS

# what the widgets select by default: the three of the reference page; every other registered backend (capacity,
# block_aligned, yours) is offered beside them, to select
BACKENDS = REFERENCE_BACKENDS


def figure_png(fig: Figure) -> Image:
    """`fig` as a PNG image to display (80 dpi, tight)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return Image(data=buf.getvalue(), format="png")


def show_in(out: W.Output, *objects) -> None:
    """Replace what `out` shows with `objects`, in a kernel or not (see the module docstring)."""
    out.outputs = ()
    for obj in objects:
        out.append_display_data(obj)
