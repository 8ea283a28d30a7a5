"""Questions asked of a sweep: is variant A slower than B (beyond the noise)? how close is `auto` to the best
fixed backend? what fraction of the dense limit does each variant reach at large S?"""

from __future__ import annotations

import pandas as pd

from ..backends.calibration import AUTO_CANDIDATES
from .io import label

CONFIG = ["dtype", "num_experts", "top_k", "num_tokens", "pairs", "hidden_size", "intermediate_size"]
# the built-in backends that run one algorithm on every call (not `auto`, which picks one per call): what
# `compare_backends` runs and `fastest` ranks by default. `auto` is judged against its own candidates only
# (`AUTO_CANDIDATES`, a subset): a layout it never picks says nothing about how well it picks.
FIXED_BACKENDS = ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned")


def _ok(table: pd.DataFrame) -> pd.DataFrame:
    t = table[table["status"] == "ok"].copy()
    t["variant"] = t.apply(label, axis=1) if len(t) else []
    return t


def ratio_table(table: pd.DataFrame, numerator: str, denominator: str) -> pd.DataFrame:
    """Per configuration measured for both variants: ratio = numerator median / denominator median, whether their
    interquartile ranges overlap, and a verdict: "faster" (ratio <= 1), "equal (IQRs overlap)" or "slower"."""
    t = _ok(table)
    a = t[t["variant"] == numerator].set_index(CONFIG)
    b = t[t["variant"] == denominator].set_index(CONFIG)
    both = a.merge(b, how="inner", left_index=True, right_index=True, suffixes=("_a", "_b"))
    out = pd.DataFrame(index=both.index)
    out["ratio"] = both["median_ms_a"] / both["median_ms_b"]
    out["overlap"] = (both["q1_ms_a"] <= both["q3_ms_b"]) & (both["q1_ms_b"] <= both["q3_ms_a"])
    out["verdict"] = ["faster" if r <= 1 else ("equal (IQRs overlap)" if o else "slower")
                      for r, o in zip(out["ratio"], out["overlap"])]
    return out.reset_index()


def auto_vs_best(table: pd.DataFrame, compiled: bool = False, against: str = "same") -> pd.DataFrame:
    """Per configuration: auto's median over the fastest of the backends auto chooses among (`AUTO_CANDIDATES`),
    which variant that was and which backend auto chose. compiled: take auto's compiled rows; against: "same"
    (candidates compiled the same way) or "all" (every candidate variant in the table, compiled or not)."""
    t = _ok(table)
    t = t[t["library"] == "moelab"]
    rows = []
    for key, part in t.groupby(CONFIG):
        mine = part["compiled"].astype(bool) == compiled
        auto = part[mine & (part["backend"] == "auto")]
        fixed = part[part["backend"].isin(AUTO_CANDIDATES) & (mine if against == "same" else True)]
        if auto.empty or fixed.empty:
            continue
        best = fixed.loc[fixed["median_ms"].idxmin()]
        a = auto.iloc[0]
        rows.append({**dict(zip(CONFIG, key)), "auto_ms": a["median_ms"], "chosen": a["chosen"],
                     "best_fixed": best["variant"], "best_ms": best["median_ms"],
                     "ratio": a["median_ms"] / best["median_ms"],
                     "overlap": bool(a["q1_ms"] <= best["q3_ms"] and best["q1_ms"] <= a["q3_ms"])})
    return pd.DataFrame(rows)


def dense_fractions(table: pd.DataFrame, min_pairs: int = 4096, variants=None) -> pd.DataFrame:
    """frac_dense per configuration with S >= min_pairs, one column per variant, plus the bare grouped GEMMs'
    fraction (`grouped_gemm_bound`) and the same GEMMs with every group reading one expert's weights, so they stay
    in cache (`cached_gemm_bound`), where the sweep measured them (`gemm_bound=True`)."""
    t = _ok(table)
    t = t[t["pairs"] >= min_pairs]
    if variants is not None:
        t = t[t["variant"].isin(variants)]
    if t.empty:
        return pd.DataFrame(columns=CONFIG + ["grouped_gemm_bound", "cached_gemm_bound"])
    wide = t.pivot_table(index=CONFIG, columns="variant", values="frac_dense", aggfunc="first")
    bound = t.reindex(columns=CONFIG + ["dense_median_ms", "grouped_gemm_median_ms",
                                        "grouped_gemm_cached_median_ms"]).groupby(CONFIG).first()
    wide["grouped_gemm_bound"] = bound["dense_median_ms"] / bound["grouped_gemm_median_ms"]
    wide["cached_gemm_bound"] = bound["dense_median_ms"] / bound["grouped_gemm_cached_median_ms"]
    return wide.reset_index()


def fastest(table: pd.DataFrame, library: str = "moelab", backends=FIXED_BACKENDS,
            compiled: bool = False) -> pd.DataFrame:
    """Per configuration: the fastest of `backends`, its margin over the runner-up, and the whole ranking."""
    t = _ok(table)
    t = t[(t["library"] == library) & t["backend"].isin(backends) & (t["compiled"].astype(bool) == compiled)]
    rows = []
    for key, part in t.groupby(CONFIG):
        part = part.sort_values("median_ms")
        first = part.iloc[0]
        second = part.iloc[1] if len(part) > 1 else None
        rows.append({**dict(zip(CONFIG, key)), "fastest": first["backend"],
                     "ranking": " < ".join(part["backend"]),
                     "tied_with_fastest": [r["backend"] for _, r in part.iterrows() if r["q1_ms"] <= first["q3_ms"]],
                     "runner_up_over_fastest": second["median_ms"] / first["median_ms"] if second is not None else None,
                     "tie": bool(second is not None and second["q1_ms"] <= first["q3_ms"]),
                     **{f"{b}_ms": v for b, v in zip(part["backend"], part["median_ms"])}})
    return pd.DataFrame(rows)
