"""Every stored figure of every notebook on one contact sheet per notebook, so a reviewer sees them at a glance.

    python scripts/contact_sheets.py                  # all notebooks -> artifacts/contact_sheets/<notebook>.png
    python scripts/contact_sheets.py notebooks/05_grouped_mm.ipynb --out /tmp/sheets

It reads the PNG outputs the notebooks were stored with (nothing is executed): re-run a notebook first to see
its current figures. Each tile is titled with the cell it comes from. The sheets are not committed
(artifacts/ is ignored).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import sys
from pathlib import Path

import matplotlib.image as mpimg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]


def stored_figures(path: Path) -> list[tuple[str, bytes]]:
    """(label, PNG bytes) of every image output of the notebook at `path`, in cell order."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for number, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            data = output.get("data", {}).get("image/png")
            if data:
                found.append((f"cell {number} ({cell.get('id', '?')})", base64.b64decode(data)))
    return found


def contact_sheet(path: Path, columns: int = 3, tile_inches: float = 5.0) -> Figure | None:
    """One figure with every stored figure of the notebook as a titled tile; None if it has none."""
    figures = stored_figures(path)
    if not figures:
        return None
    rows = math.ceil(len(figures) / columns)
    fig = Figure(figsize=(columns * tile_inches, rows * tile_inches * 0.75))
    fig.suptitle(f"{path.name}: {len(figures)} stored figure(s)", fontsize=12)
    for index, (label, png) in enumerate(figures):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(mpimg.imread(io.BytesIO(png), format="png"))
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "contact_sheets")
    parser.add_argument("--columns", type=int, default=3)
    args = parser.parse_args(argv)
    if args.columns < 1:
        parser.error(f"--columns must be >= 1, got {args.columns}")
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if not path.is_file():
            parser.error(f"no notebook at {path}")
        fig = contact_sheet(path, args.columns)
        if fig is None:
            print(f"{path.name}: no stored figures")
            continue
        target = args.out / f"{path.stem}.png"
        fig.savefig(target, dpi=80)
        print(f"{path.name}: {len(stored_figures(path))} figure(s) -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
