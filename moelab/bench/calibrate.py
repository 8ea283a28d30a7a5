"""`calibrate`: measure where `auto`'s candidates (eager, batched_mm, grouped_mm, capacity) overtake each other.

For each dtype and mode (`moelab.backends.calibration.MODES`: "eager" and "compiled" from forward timings,
"backward" from uncompiled rows timed forward + backward, `pass == "forward+backward"`) and each value x of the
sweep (x = S = T*k pairs, or S/E pairs per expert), the backend chosen is the one with the smallest worst-case
slowdown against the fastest backend over the configurations sharing that x (so a choice that is best at E=8 but
bad at E=64 loses to one that is good at both). A crossover lies at the geometric midpoint between two measured x
whose choices differ. Both units are fitted; the one whose choices lose least over the sweep is kept. The table
is stored per machine (`moelab.backends.calibration_path()`) and read by `auto` from then on.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from ..backends.calibration import (AUTO_CANDIDATES, DEFAULT_CROSSOVERS, NOT_COMPILED, UNITS, CrossoverTable,
                                    calibration_path, call_mode, machine_key, reload_crossovers)
from .sweep import sweep

PREFERENCE = ("grouped_mm", "eager", "batched_mm", "capacity")  # on a tie: no weight copies, no padding first
BACKWARD_PASS = "forward+backward"  # the sweep's `pass` for rows timed forward + backward


def _segments(choice_by_x: dict, unit: str) -> list[list]:
    """Merge consecutive equal choices; put each crossover at the geometric midpoint of its two neighbours."""
    ordered = sorted(choice_by_x.items())
    segments: list[list] = []
    for (x_a, b_a), (x_b, b_b) in zip(ordered, ordered[1:]):
        if b_a != b_b:
            if unit == "pairs":
                upper = max(int(x_a), math.isqrt(int(x_a) * int(x_b)))
            else:
                upper = float(f"{math.sqrt(x_a * x_b):.3g}")
            segments.append([upper, b_a])
    segments.append([None, ordered[-1][1]])
    return segments


def _fit_part(part: pd.DataFrame, candidates, tolerance: float):
    """{x: choice}, {x: its worst slowdown}, {x: every candidate's worst slowdown} over the rows sharing x."""
    config_keys = ["num_tokens", "num_experts", "top_k", "hidden_size", "intermediate_size"]
    choice_by_x, penalties, scores_by_x = {}, {}, {}
    for x, at in part.groupby("x"):
        times = at.pivot_table(index=config_keys, columns="backend", values="median_ms", aggfunc="first")
        present = [c for c in candidates if c in times]
        if times.empty or not present:
            continue
        best = times[present].min(axis=1)
        scores = {b: (math.inf if b not in times or times[b].isna().any()  # skipped somewhere: not safe
                      else float((times[b] / best).max())) for b in candidates}
        top = min(scores.values())
        if not math.isfinite(top):
            continue
        tied = [b for b in PREFERENCE if b in candidates and scores[b] <= top * (1 + tolerance)]
        choice_by_x[x], penalties[x], scores_by_x[f"{x:g}"] = tied[0], scores[tied[0]], scores
    return choice_by_x, penalties, scores_by_x


def _compiled_grouped_is_lean(ok: pd.DataFrame) -> pd.DataFrame:
    """Compiled on CPU, auto runs grouped_mm's uncompiled lean path (an opaque op in the graph): so the time that
    counts for that choice is the uncompiled grouped_mm's, where the sweep has it."""
    keys = ["device", "dtype", "pass", "num_tokens", "num_experts", "top_k", "hidden_size", "intermediate_size"]
    plain = ok[(ok["backend"] == "grouped_mm") & ~ok["compiled"].astype(bool) & ok["device"].str.startswith("cpu")]
    if plain.empty:
        return ok
    swapped = plain.assign(compiled=True)
    compiled_configs = ok[ok["compiled"].astype(bool)][keys].drop_duplicates()
    swapped = swapped.merge(compiled_configs, on=keys)
    drop = ok["compiled"].astype(bool) & (ok["backend"] == "grouped_mm") & ok["device"].str.startswith("cpu")
    keep_compiled = ok[drop].merge(swapped[keys], on=keys, how="left", indicator=True)
    keep_compiled = keep_compiled[keep_compiled["_merge"] == "left_only"].drop(columns="_merge")
    return pd.concat([ok[~drop], keep_compiled, swapped], ignore_index=True)


def _fit(ok: pd.DataFrame, unit: str, tolerance: float):
    """(rules, scores, worst penalty of the rules without /E=) for one unit: one rule per device/dtype/mode over
    every num_experts measured, and one per num_experts ("/E=<n>")."""
    rules, scores_meta, worst = {}, {}, 1.0
    ok = _compiled_grouped_is_lean(ok)
    for (device, dtype, compiled, pass_), part in ok.groupby(["device", "dtype", "compiled", "pass"]):
        key = f"{torch.device(device).type}/{dtype}/{call_mode(compiled, pass_ == BACKWARD_PASS)}"
        candidates = [b for b in AUTO_CANDIDATES if not (compiled and b in NOT_COMPILED)]
        part = part.assign(x=part["pairs"] if unit == "pairs" else part["pairs"] / part["num_experts"])
        choice_by_x, penalties, scores = _fit_part(part, candidates, tolerance)
        if not choice_by_x:
            continue
        rules[key] = _segments(choice_by_x, unit)
        scores_meta[key] = scores
        worst = max(worst, max(penalties.values()))
        if part["num_experts"].nunique() > 1:
            for E, per_e in part.groupby("num_experts"):
                choice_e, _, scores_e = _fit_part(per_e, candidates, tolerance)
                if choice_e:
                    rules[f"{key}/E={int(E)}"] = _segments(choice_e, unit)
                    scores_meta[f"{key}/E={int(E)}"] = scores_e
    return rules, scores_meta, worst


def crossovers_from_sweep(table: pd.DataFrame, tolerance: float = 0.0, unit: str = "auto") -> CrossoverTable:
    """The crossover table a sweep's moelab rows imply (see the module docstring).

    tolerance: a backend within `1 + tolerance` of the best score counts as tied (then PREFERENCE decides).
    unit: "pairs", "pairs_per_expert", or "auto": the one whose choices (without /E=) lose least against the
    fastest backend over the sweep (pairs on a tie). With several num_experts in the sweep, each also gets its
    own rule ("/E=<n>"), which `auto` applies to layers with the nearest number of experts. Keys the sweep does
    not cover keep the defaults; uncompiled rows timed forward + backward (`pass == "forward+backward"`) give the
    ".../backward" keys, and without them backward calls read the default backward rules. Compiled
    forward + backward rows are left out: compiled calls read the "compiled" rules, fitted on forward timings.
    """
    ok = table[(table["library"] == "moelab") & table["backend"].isin(AUTO_CANDIDATES) & (table["status"] == "ok")]
    # a table from before the `pass` column: forward timings
    passes = ok["pass"].fillna("forward") if "pass" in ok else pd.Series("forward", index=ok.index)
    ok = ok.assign(**{"pass": passes})
    ok = ok[~(ok["compiled"].astype(bool) & (ok["pass"] == BACKWARD_PASS))]
    if ok.empty:
        raise ValueError(f"the sweep has no measured moelab rows for {' / '.join(AUTO_CANDIDATES)}")
    units = UNITS if unit == "auto" else (unit,)
    fits = {u: _fit(ok, u, tolerance) for u in units}
    chosen = min(units, key=lambda u: (fits[u][2], u != "pairs"))
    rules, scores_meta, worst = fits[chosen]
    env = table.attrs.get("environment", {})
    meta = {"machine_key": machine_key(), "environment": env, "scores": scores_meta,
            "worst_penalty": {u: fits[u][2] for u in units},
            "grid": {c: sorted(map(int, ok[c].unique())) for c in ("num_tokens", "num_experts", "top_k",
                                                                    "hidden_size", "intermediate_size")},
            "passes": sorted(ok["pass"].unique())}
    # the defaults (in the chosen unit) stay for what the sweep did not measure; measured keys are more specific
    return CrossoverTable(rules={**_DEFAULTS_IN[chosen], **rules}, unit=chosen, source="calibrated", meta=meta)


# the default advice restated per unit (for the devices a calibration did not measure). Not the backward rules: a
# table without its own defers backward calls to DEFAULT_CROSSOVERS, and its reason then says so.
_DEFAULTS_IN = {
    "pairs_per_expert": {k: v for k, v in DEFAULT_CROSSOVERS.rules.items() if k.split("/")[2] != "backward"},
    "pairs": {"cpu/*/eager": [[None, "grouped_mm"]], "cpu/*/compiled": [[32, "batched_mm"], [None, "grouped_mm"]],
              "*/*/eager": [[64, "batched_mm"], [None, "grouped_mm"]],
              "*/*/compiled": [[64, "batched_mm"], [None, "grouped_mm"]]},
}


def calibrate(tokens=(1, 4, 16, 64, 256, 1024, 2048), num_experts=(8, 64), top_k=(2, 8), hidden_size=1024,
              intermediate_size=512, dtypes=("float32", "bfloat16"), compiled=(False,), *, backward=(False,),
              device="cpu", num_threads: int = 1, min_run_time: float = 0.1, memory_budget=None,
              tolerance: float = 0.03, unit: str = "auto", save: bool = True, path=None,
              progress: bool = True) -> CrossoverTable:
    """Sweep `auto`'s candidates (`AUTO_CANDIDATES`), derive the crossovers, and (save=True) store them for this
    machine so that `auto` uses them; `path` overrides where. Returns the `CrossoverTable`.

    Include `compiled=(False, True)` to calibrate the compiled mode too (slow: one compilation per point; the
    compiled rules never choose eager or capacity, `NOT_COMPILED`). backward: `(True,)` times forward + backward
    instead (the "backward" rules, for calls that need gradients), `(False, True)` both; the backward sweep runs
    uncompiled only, since compiled calls read the "compiled" rules either way.
    """
    backward = _flags(backward, "backward")
    tables = [sweep(AUTO_CANDIDATES, tokens, num_experts, top_k, hidden_size, intermediate_size, dtypes,
                    (False,) if grads else compiled, device=device, num_threads=num_threads, backward=grads,
                    min_run_time=min_run_time, memory_budget=memory_budget, measure_memory=False,
                    dense_limit=False, progress=progress)
              for grads in backward]
    table = pd.concat(tables, ignore_index=True)
    table.attrs = tables[0].attrs  # the environment of the first sweep (the same machine and settings)
    result = crossovers_from_sweep(table, tolerance=tolerance, unit=unit)
    if save:
        target = path or calibration_path()
        result.save(target)
        result.meta["path"] = str(target)
        if path is None:
            reload_crossovers()
    return result


def _flags(value, name: str) -> tuple[bool, ...]:
    """A bool or a non-empty tuple of bools -> the distinct values, in order."""
    values = (value,) if isinstance(value, bool) else tuple(value) if isinstance(value, (tuple, list)) else None
    if not values or not all(isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a bool or a non-empty tuple of bools such as (False, True), "
                         f"got {value!r}")
    return tuple(dict.fromkeys(values))
