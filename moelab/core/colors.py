"""One colour per experts backend, the same in every plot of the package (bench, widgets, notebooks).

The built-ins have fixed colours; any other name (your own backend) gets one of the colours no built-in uses,
picked from its name, so it is stable across plots and sessions. Variants keep their backend's colour:
"hf:eager" and "eager+compile" are eager's colour (the plots tell them apart by line style and marker).
"""

from __future__ import annotations

import zlib

BACKEND_COLORS = {"eager": "tab:blue", "batched_mm": "tab:red", "grouped_mm": "tab:green",
                  "capacity": "tab:purple", "block_aligned": "tab:orange", "auto": "tab:brown"}
# what a backend that is not built in draws with: colours no built-in uses
OTHER_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "teal", "navy", "maroon")


def backend_name(variant: str) -> str:
    """The backend of a variant label: "hf:grouped_mm+compile" -> "grouped_mm"."""
    return variant.rpartition(":")[2].partition("+")[0]


def backend_color(variant: str) -> str:
    """The colour of `variant`'s backend: fixed for the built-ins, else stable per name."""
    name = backend_name(variant)
    if name in BACKEND_COLORS:
        return BACKEND_COLORS[name]
    return OTHER_COLORS[zlib.crc32(name.encode()) % len(OTHER_COLORS)]  # crc32: stable, unlike hash()


def expert_colormap(num_experts: int):
    """(ListedColormap, Normalize) with exactly `num_experts` colours over [-0.5, E - 0.5]: expert e is colour e
    in every picture, and a colorbar shows the E colours used, not the 10 or 20 bands of the palette."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, Normalize

    name = "tab10" if num_experts <= 10 else ("tab20" if num_experts <= 20 else "viridis")
    norm = Normalize(vmin=-0.5, vmax=num_experts - 0.5)
    colors = colormaps[name](norm(np.arange(max(num_experts, 1))) if name == "viridis"
                             else np.arange(max(num_experts, 1)))  # [E, 4]: the palette's first E colours
    return ListedColormap(colors), norm
