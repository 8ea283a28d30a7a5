"""Save a sweep (CSV + JSON, with its environment), load it back, and pivot it into a printable summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

_ENV_COLUMNS = ("moelab_version", "torch_version", "transformers_version", "device_name", "cpu_capability")


def save(table: pd.DataFrame, out_dir, name: str = "sweep") -> dict[str, Path]:
    """Write `out_dir/name.csv` (rows + the key environment fields as columns) and `out_dir/name.json`
    ({"environment": ..., "rows": [...]}); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(table.attrs.get("environment", {}))
    flat = table.copy()
    for key in _ENV_COLUMNS:
        flat[key] = env.get(key)
    paths = {"csv": out / f"{name}.csv", "json": out / f"{name}.json"}
    flat.to_csv(paths["csv"], index=False)
    records = json.loads(table.to_json(orient="records"))
    paths["json"].write_text(json.dumps({"environment": env, "rows": records}, indent=1, default=str) + "\n")
    return paths


def load(path) -> pd.DataFrame:
    """A table saved by `save` (the .json keeps the whole environment; the .csv its key fields)."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        table = pd.DataFrame(data["rows"])
        table.attrs["environment"] = data.get("environment", {})
    else:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
        table["reason"] = table["reason"].fillna("")
        env = {key: table[key].iloc[0] for key in _ENV_COLUMNS if key in table and len(table)}
        table = table.drop(columns=[c for c in _ENV_COLUMNS if c in table])
        table.attrs["environment"] = env
    return table


def label(row) -> str:
    """'grouped_mm', 'hf:grouped_mm', 'grouped_mm+compile' ... one name per measured variant."""
    name = row["backend"] if row["library"] == "moelab" else f"hf:{row['backend']}"
    return name + ("+compile" if bool(row["compiled"]) else "")


def summary(table: pd.DataFrame, value: str = "median_ms") -> pd.DataFrame:
    """One line per configuration, one column per variant: `value` ("median_ms", "frac_dense", "gflops"...),
    "skip" / "error" where nothing was measured; for median_ms also the dense limit, and moelab/transformers
    ratios when both libraries ran."""
    if table.empty:
        return pd.DataFrame()
    t = table.copy()
    t["variant"] = t.apply(label, axis=1)
    keys = ["dtype", "num_experts", "top_k", "num_tokens"]

    def cell(rows):
        r = rows.iloc[0]
        if r["status"] != "ok":
            return "skip" if r["status"] == "skipped" else "error"
        return r[value]
    wide = t.groupby(keys + ["variant"], sort=False).apply(cell, include_groups=False).unstack("variant")
    order = [v for v in dict.fromkeys(t["variant"]) if v in wide.columns]
    wide = wide[order]
    if value == "median_ms":
        dense = t.groupby(keys, sort=False)["dense_median_ms"].first()
        wide["dense"] = dense
        for variant in order:
            if variant.startswith("hf:") and variant[3:] in wide.columns:
                ours, theirs = wide[variant[3:]], wide[variant]
                wide[f"{variant[3:]}/hf"] = [o / h if isinstance(o, float) and isinstance(h, float) else math.nan
                                             for o, h in zip(ours, theirs)]
    return wide
