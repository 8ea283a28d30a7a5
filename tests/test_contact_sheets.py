"""scripts/contact_sheets.py: every stored figure of a notebook, one titled tile each, on one sheet."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("contact_sheets", ROOT / "scripts" / "contact_sheets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(color: str) -> str:
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().set_facecolor(color)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_sheet_has_one_tile_per_stored_figure_in_cell_order(tmp_path):
    sheets = _module()
    cells = [{"cell_type": "markdown", "id": "m", "source": []},
             {"cell_type": "code", "id": "a", "outputs": [{"data": {"image/png": _png("red"), "text/plain": "x"}}]},
             {"cell_type": "code", "id": "b", "outputs": [{"text": "no figure"}]},
             {"cell_type": "code", "id": "c", "outputs": [{"data": {"image/png": _png("blue")}},
                                                          {"data": {"image/png": _png("green")}}]}]
    path = tmp_path / "demo.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert [label for label, _ in sheets.stored_figures(path)] == ["cell 1 (a)", "cell 3 (c)", "cell 3 (c)"]
    sheet = sheets.contact_sheet(path, columns=2)
    assert [ax.get_title() for ax in sheet.axes] == ["cell 1 (a)", "cell 3 (c)", "cell 3 (c)"]
    empty = tmp_path / "empty.ipynb"
    empty.write_text(json.dumps({"cells": cells[:1]}))
    assert sheets.contact_sheet(empty) is None
    assert sheets.main([str(path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "demo.png").stat().st_size > 0
