"""The sections of BENCHMARKS.md that check the issue's targets and the reference page's claims, each a list of
Markdown lines computed from the sweeps (`default`: uncompiled, with transformers and the GEMM bounds;
`compiled`: every backend compiled). `moelab.bench.report.markdown` puts them together."""

from __future__ import annotations

import pandas as pd

from ..hf.inspect_adapter import NAMESAKE_BACKENDS
from ..memory import format_bytes
from . import analysis
from .analysis import FIXED_BACKENDS
from .io import label


def shape_text(r) -> str:
    """A measured shape in a sentence: 'bfloat16 E=8 k=2 T=512'."""
    return f"{r['dtype']} E={r['num_experts']} k={r['top_k']} T={r['num_tokens']}"


def pct(v) -> str:
    """0.93 -> '93%'; '' for a missing value."""
    return "" if v is None or v != v else f"{100 * v:.0f}%"


def _x(v, digits=2) -> str:
    return "" if v is None or v != v else f"{v:.{digits}f}"


def span(values, fmt=_x) -> str:
    """'lowest–highest' of the values present (NaN and None left out), each written by `fmt`; 'n/a' if none."""
    values = [v for v in (values if values is not None else []) if v == v]
    return f"{fmt(min(values))}–{fmt(max(values))}" if values else "n/a"


def compiled_run(default, compiled):
    """The table to judge compiled variants on: the compiled sweep itself when it also timed the uncompiled
    backends (same run, interleaved: fair ratios), else the two sweeps together (two runs: their drift included)."""
    if compiled is None:
        return None
    if (~compiled["compiled"].astype(bool)).any():
        return compiled
    return pd.concat([default, compiled], ignore_index=True)


def section_transformers(default, heading: str = "## 1. moelab vs transformers, side by side",
                         sweep_name: str = "the default sweep") -> list[str]:
    lines = [heading, "",
             "Each moelab backend against transformers' same-named one, in the same run, same thread, identical "
             "weights (copied 1:1) and identical routing. ratio = moelab median / transformers median; a ratio "
             "above 1.0 whose interquartile ranges overlap counts as equal (the machine is shared).", "",
             "| backend | shapes | median ratio | worst ratio | faster | equal (IQRs overlap) | slower |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    detail = {}
    verdicts = {}
    for b in NAMESAKE_BACKENDS:
        r = analysis.ratio_table(default, b, f"hf:{b}")
        detail[b] = r
        counts = r["verdict"].value_counts()
        verdicts[b] = counts.get("slower", 0)
        lines.append(f"| `{b}` | {len(r)} | {_x(r['ratio'].median(), 3)} | {_x(r['ratio'].max(), 3)} | "
                     f"{counts.get('faster', 0)} | {counts.get('equal (IQRs overlap)', 0)} | "
                     f"{counts.get('slower', 0)} |")
    slower = pd.concat([d.assign(backend=b) for b, d in detail.items()])
    slower = slower[slower["verdict"] == "slower"]
    lines.append("")
    if slower.empty:
        lines.append("**Target met:** no moelab backend is slower than transformers' at any measured shape of "
                     f"{sweep_name} (beyond overlapping interquartile ranges).")
    else:
        lines.append(f"**Target missed at {len(slower)} shape(s)** (ratio > 1, IQRs apart):")
        for _, r in slower.iterrows():
            lines.append(f"- `{r['backend']}` {shape_text(r)}: {r['ratio']:.3f}")
    lines += ["", "<details><summary>Every shape</summary>", "",
              "| dtype | E | k | T | S | " + " | ".join(NAMESAKE_BACKENDS) + " |",
              "| --- " * (5 + len(NAMESAKE_BACKENDS)) + "|"]
    keys = ["dtype", "num_experts", "top_k", "num_tokens", "pairs"]
    merged = None
    for b, d in detail.items():
        col = d[keys + ["ratio", "verdict"]].rename(columns={"ratio": b, "verdict": f"{b}_v"})
        merged = col if merged is None else merged.merge(col, on=keys, how="outer")
    mark = {"faster": "", "equal (IQRs overlap)": " ≈", "slower": " **✗**"}
    for _, r in merged.sort_values(keys).iterrows():
        cells = [f"{_x(r[b], 3)}{mark.get(r[f'{b}_v'], '')}" if r[b] == r[b] else "skipped"
                 for b in NAMESAKE_BACKENDS]
        lines.append(f"| {r['dtype']} | {r['num_experts']} | {r['top_k']} | {r['num_tokens']} | {r['pairs']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "</details>", ""]
    return lines


def section_dense(default, min_pairs: int = 4096) -> list[str]:
    frac = analysis.dense_fractions(default, min_pairs)
    lines = [f"## 2. The dense limit at S = T·k ≥ {min_pairs}", "",
             "Fraction of the dense limit = (time of one dense matmul pair doing the same useful FLOPs) / (backend "
             "time). Where the time goes, measured in the same run: `GEMMs` is the same fraction for the two bare "
             "grouped GEMMs of the call's routing on pre-sorted inputs (no backend that multiplies per expert can "
             "beat it); `GEMMs, weights cached` runs the same GEMMs with every group reading one expert's weights, "
             "which then stay in cache, so the difference between the two is what streaming E experts' weights from "
             "memory costs on every call; `other steps` is the share of grouped_mm's time outside the GEMMs (sort, "
             "gathers, activation, weighting, unsort, sum; below zero where the backend's GEMMs, writing into a reused "
             "workspace, beat the bare pair, which allocates its outputs). The same split operator by operator: "
             "`python benchmarks/profile_steps.py --dtype bfloat16 --experts 8 --top-k 2 --tokens 2048`.", "",
             "| dtype | E | k | T | S | moelab grouped_mm | moelab eager | hf grouped_mm | hf eager | GEMMs | "
             "GEMMs, weights cached | other steps | eager time / grouped time (moelab) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ok_target, other_share = [], []
    for _, r in frac.sort_values(["dtype", "pairs", "num_experts"]).iterrows():
        g, e = r.get("grouped_mm"), r.get("eager")
        eager_over_grouped = g / e if g == g and e == e else float("nan")  # time_e / time_g = frac_g / frac_e
        other = 1 - g / r.get("grouped_gemm_bound", float("nan"))  # 1 - gemm time / grouped_mm time
        ok_target.append((r, g, eager_over_grouped))
        other_share.append(other)
        lines.append(f"| {r['dtype']} | {r['num_experts']} | {r['top_k']} | {r['num_tokens']} | {r['pairs']} | "
                     f"{pct(g)} | {pct(e)} | {pct(r.get('hf:grouped_mm'))} | {pct(r.get('hf:eager'))} | "
                     f"{pct(r.get('grouped_gemm_bound'))} | {pct(r.get('cached_gemm_bound'))} | {pct(other)} | "
                     f"{_x(eager_over_grouped)} |")
    met = [r for r, g, eg in ok_target if g >= 0.9]
    vs_eager = analysis.ratio_table(default, "grouped_mm", "eager")
    vs_eager = vs_eager[vs_eager["pairs"] >= min_pairs]
    not_slower = vs_eager[vs_eager["verdict"] != "slower"]
    lines += ["", f"- moelab grouped_mm ≥ 90% of the dense limit at {len(met)} of {len(ok_target)} shapes "
                  f"(range {span([g for _, g, _ in ok_target], pct)}); "
                  f"transformers' grouped_mm: {span(frac.get('hf:grouped_mm', pd.Series(dtype=float)), pct)}.",
              f"- moelab grouped_mm no slower than moelab eager at {len(not_slower)} of {len(vs_eager)} shapes "
              f"(IQRs overlapping count as equal; eager time / grouped time {span([eg for *_, eg in ok_target])})."]
    below = [(r, g) for r, g, _ in ok_target if g < 0.9]
    if below:
        lines.append("- Below 90%: " + "; ".join(
            f"{shape_text(r)} {pct(g)} (GEMMs {pct(r.get('grouped_gemm_bound'))}"
            + (f", cached {pct(r['cached_gemm_bound'])}" if r.get('cached_gemm_bound') == r.get('cached_gemm_bound')
               else "") + ")" for r, g in below) + ".")
    many = [(r, g, o) for (r, g, _), o in zip(ok_target, other_share)
            if g < 0.9 and r["num_experts"] == frac["num_experts"].max()]
    if many and all(r.get("cached_gemm_bound") == r.get("cached_gemm_bound") for r, _, _ in many):
        lines.append(
            f"- Below 90% with E = {many[0][0]['num_experts']}: the bare GEMMs reach "
            f"{span([r['grouped_gemm_bound'] for r, _, _ in many], pct)} of the dense limit, "
            f"{span([r['cached_gemm_bound'] for r, _, _ in many], pct)} once the weights stay in cache: every call "
            "reads each expert's weights from memory (and the GEMM packs them) for only S/E rows, a cost the dense "
            "limit (one weight matrix) never pays, and small per-expert GEMMs run below the dense rate even from "
            f"cache. The backend's other steps take {span([o for *_, o in many], pct)} of its time there.")
    lines.append("")
    return lines


def section_auto(default, compiled) -> list[str]:
    lines = ["## 3. `auto` vs the fastest fixed backend", "",
             "ratio = auto median / median of the fastest of eager, batched_mm, grouped_mm (the backends auto "
             "chooses among) at that shape (target ≤ 1.10). Uncompiled: the default sweep. Compiled: every backend "
             "compiled (inductor, `fullgraph=True` except eager and dropless capacity), auto compiled against the "
             "three compiled; the last line also against every variant of the three, compiled or not"
             + (" (the compiled sweep times the uncompiled backends too, in the same run)."
                if compiled is not None and compiled_run(default, compiled) is compiled
                else " (uncompiled from the default sweep: another run)."), ""]
    both = compiled_run(default, compiled)
    for name, table, comp, against in (("uncompiled", default, False, "same"), ("compiled", both, True, "same"),
                                       ("compiled, against every variant", both, True, "all")):
        if table is None:
            continue
        r = analysis.auto_vs_best(table, compiled=comp, against=against)
        if r.empty:
            lines.append(f"- {name}: no measurements.")
            continue
        over = r[r["ratio"] > 1.10]
        lines.append(f"- **{name}**: {len(r)} shapes, worst ratio {r['ratio'].max():.3f}, median "
                     f"{r['ratio'].median():.3f}; above 1.10 at {len(over)} shape(s)"
                     + (": " + "; ".join(f"{shape_text(x)} {x['ratio']:.2f} (auto took {x['chosen']}, fastest "
                                         f"{x['best_fixed']})" for _, x in over.iterrows()) if len(over) else "")
                     + ".")
    lines += ["", "<details><summary>Every shape</summary>", "",
              "| mode | dtype | E | k | T | auto took | fastest | ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, table, comp in (("uncompiled", default, False), ("compiled", both, True)):
        if table is None:
            continue
        r = analysis.auto_vs_best(table, compiled=comp)
        for _, x in r.sort_values(["dtype", "num_experts", "top_k", "num_tokens"]).iterrows():
            lines.append(f"| {name} | {x['dtype']} | {x['num_experts']} | {x['top_k']} | {x['num_tokens']} | "
                         f"{x['chosen']} | {x['best_fixed']} | {x['ratio']:.3f} |")
    lines += ["", "</details>", ""]
    return lines


def section_claims(default, compiled) -> list[str]:
    lines = ["## 4. The reference page's CPU claims, checked on this machine", ""]
    for lib, prefix in (("moelab", ""), ("transformers", "hf:")):
        # the claims rank transformers' three backends: moelab's namesakes are ranked among themselves alike
        f = analysis.fastest(default, library=lib, backends=NAMESAKE_BACKENDS)
        n = len(f)
        grouped_first = f[f["tied_with_fastest"].apply(lambda v: "grouped_mm" in v)]
        others = f[~f.index.isin(grouped_first.index)]
        order = f.copy()
        eager_slower = sum(r["eager_ms"] > r["grouped_mm_ms"] for _, r in order.iterrows()
                           if r.get("eager_ms") == r.get("eager_ms") and r.get("grouped_mm_ms") == r.get("grouped_mm_ms"))
        both = [(r["eager_ms"], r.get("batched_mm_ms")) for _, r in order.iterrows()
                if r.get("batched_mm_ms") == r.get("batched_mm_ms")]
        eager_faster_than_batched = sum(e < b for e, b in both)
        ratio_bg = [r["batched_mm_ms"] / r["grouped_mm_ms"] for _, r in order.iterrows()
                    if r.get("batched_mm_ms") == r.get("batched_mm_ms")]
        owner = f"{lib}'" if lib.endswith("s") else f"{lib}'s"
        lines += [f"### {owner} backends ({n} shapes, uncompiled, one thread)", "",
                  f"- *\"grouped_mm: most efficient backend for all input sizes\"*: fastest (or tied within the IQR) "
                  f"at **{len(grouped_first)} of {n}** shapes"
                  + ("." if others.empty else "; not at " + "; ".join(
                      f"{shape_text(r)} ({r['ranking']}, {r['runner_up_over_fastest']:.2f}x)"
                      for _, r in others.iterrows()) + "."),
                  f"- *\"eager: slower than grouped_mm\"*: at **{eager_slower} of {n}** shapes.",
                  f"- *\"eager: faster than batched_mm\"*: at **{eager_faster_than_batched} of {len(both)}** shapes "
                  "where batched_mm ran.",
                  f"- *\"batched_mm: not recommended (significantly slower)\"*: batched_mm / grouped_mm time = "
                  f"**{span(ratio_bg)}x** ({len(ratio_bg)} shapes; the others were skipped by the memory guard).",
                  ""]
    ok = default[(default["status"] == "ok")]
    # reference figures for transformers 5.23 on a machine like ours
    frac = analysis.dense_fractions(default, 4096)
    hf_g, hf_e = frac.get("hf:grouped_mm"), frac.get("hf:eager")
    bf = frac[(frac["dtype"] == "bfloat16") & (frac["pairs"] == 16384)]
    hf_rows = analysis.fastest(default, library="transformers", backends=NAMESAKE_BACKENDS)
    big = hf_rows[hf_rows["pairs"] >= 4096]
    eg = big["eager_ms"] / big["grouped_mm_ms"]
    batched_ratio = [r["batched_mm_ms"] / r["grouped_mm_ms"] for _, r in hf_rows.iterrows()
                     if r.get("batched_mm_ms") == r.get("batched_mm_ms")]
    lines += ["### The reference figures (transformers 5.23 on a machine like ours) against ours", "",
              "| claim | reference | measured here (transformers " + str(default.attrs['environment'].get(
                  'transformers_version')) + ") | moelab |", "| --- | --- | --- | --- |",
              f"| hf grouped_mm, fraction of the dense limit at S ≥ 4096 | 52–93% | {span(hf_g, pct)} | "
              f"{span(frac.get('grouped_mm'), pct)} |",
              f"| … in bfloat16 at S = 16384 | 57–64% | {span(bf.get('hf:grouped_mm'), pct)} | "
              f"{span(bf.get('grouped_mm'), pct)} |",
              f"| hf eager, fraction of the dense limit at S ≥ 4096 | 84–107% | {span(hf_e, pct)} | "
              f"{span(frac.get('eager'), pct)} |",
              f"| eager time / grouped_mm time at S ≥ 4096 (< 1: grouped_mm slower) | 0.62–0.97 | {span(eg)} | "
              f"{span(frac['grouped_mm'] / frac['eager'] if {'eager', 'grouped_mm'} <= set(frac) else None)} |",
              f"| uncompiled batched_mm / grouped_mm time | 3–290x | {span(batched_ratio, lambda v: f'{v:.1f}')}x | "
              f"{span([r['batched_mm_ms'] / r['grouped_mm_ms'] for _, r in analysis.fastest(default, backends=NAMESAKE_BACKENDS).iterrows() if r.get('batched_mm_ms') == r.get('batched_mm_ms')], lambda v: f'{v:.1f}')}x |"]
    b1024 = ok[(ok["backend"] == "batched_mm") & (ok["pairs"] == 1024) & (ok["dtype"] == "bfloat16")]
    if len(b1024):
        copied = 1024 * 3 * 1024 * 512 * 2
        lines.append(f"| batched_mm copies S·3·H·I weight elements (3 GiB at S = 1024 in bfloat16) | 3 GiB | "
                     f"peak extra {span(b1024[b1024['library'] == 'transformers']['peak_extra_bytes'], format_bytes)} "
                     f"| peak extra {span(b1024[b1024['library'] == 'moelab']['peak_extra_bytes'], format_bytes)} "
                     f"(the copy alone: {format_bytes(copied)}) |")
    if compiled is not None:
        run = compiled_run(default, compiled)
        at_t1 = run[(run["status"] == "ok") & (run["num_tokens"] == 1) & (run["library"] == "moelab")
                    & run["backend"].isin(FIXED_BACKENDS)]
        overall = [label(part.loc[part["median_ms"].idxmin()])
                   for _, part in at_t1.groupby(["dtype", "num_experts", "top_k"])]
        lines.append(f"| compiled batched_mm (inductor, fullgraph) is the fastest variant at T = 1 | yes | | "
                     f"fastest at T=1 among all variants: {', '.join(f'{v} ({overall.count(v)})' for v in dict.fromkeys(overall))} |")
    lines += ["", "Claims about torch.compile (which backends and dtypes compile, `fullgraph`): see "
              "[docs/compile_table.md](docs/compile_table.md).", ""]
    return lines



def section_backward(backward, machine: str, min_pairs: int = 8192) -> list[str]:
    """Forward + backward: the transformers comparison of section 1 on the backward sweep, the dense
    forward + backward limit, and the backward issue's targets, each met or missed; `machine`: the CPU, in words."""
    env = backward.attrs["environment"]
    lines = ["## 8. Forward + backward (a training step's experts)", "",
             "One call of the experts forward and its backward (`out.backward(grad)`: gradients of hidden_states, "
             "top_k_weights and both weight tensors), on the backward issue's grid, smaller than the forward one "
             f"(a training step costs about 3x a forward): T ∈ {sorted(backward['num_tokens'].unique().tolist())}, "
             f"E ∈ {sorted(backward['num_experts'].unique().tolist())}, k ∈ "
             f"{sorted(backward['top_k'].unique().tolist())}, H = {backward['hidden_size'].iloc[0]}, "
             f"I = {backward['intermediate_size'].iloc[0]}, dtypes {sorted(backward['dtype'].unique().tolist())}. "
             f"Measured {env['time']} on {machine}, one thread, clock = {env['clock']}, "
             f"{env.get('elapsed_s', 0) / 60:.0f} min; load average before {_load_avg(env.get('load_average'))}, "
             f"after {_load_avg(env.get('load_average_after'))}. Raw data: "
             "[docs/bench/backward/sweep.csv](docs/bench/backward/sweep.csv).", ""]
    lines += section_transformers(backward, "### 8.1 moelab vs transformers, forward + backward",
                                  "the forward + backward sweep")
    frac = analysis.dense_fractions(backward, 1)
    lines += ["### 8.2 The dense forward + backward limit", "",
              "Fraction = (time of the dense matmul pair doing the same useful FLOPs, forward + backward) / (backend "
              "time, forward + backward).", "",
              "| dtype | E | k | T | S | moelab grouped_mm | moelab eager | moelab batched_mm | hf grouped_mm | "
              "hf eager |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in frac.sort_values(["dtype", "num_experts", "top_k", "num_tokens"]).iterrows():
        lines.append(f"| {r['dtype']} | {r['num_experts']} | {r['top_k']} | {r['num_tokens']} | {r['pairs']} | "
                     f"{pct(r.get('grouped_mm'))} | {pct(r.get('eager'))} | {pct(r.get('batched_mm'))} | "
                     f"{pct(r.get('hf:grouped_mm'))} | {pct(r.get('hf:eager'))} |")
    lines += ["", "### 8.3 The backward issue's targets", ""]
    fp32 = frac[frac["dtype"] == "float32"]
    large = fp32[fp32["pairs"] >= min_pairs]
    targets = [("grouped_mm", large, 0.75, f"float32, S ≥ {min_pairs}"),
               ("eager", large, 0.60, f"float32, S ≥ {min_pairs}"),
               ("eager", fp32[(fp32["num_experts"] == 64) & (fp32["pairs"] == 1024)], 0.30,
                "float32, E = 64, S = 1024")]
    for backend, part, goal, where in targets:
        values = part.get(backend, pd.Series(dtype=float)).dropna()
        if values.empty:
            lines.append(f"- `{backend}` ≥ {goal:.0%} of the dense limit at {where}: **not measured** (no such shape "
                         "in this sweep).")
            continue
        verdict = "met" if (values >= goal).all() else f"missed at {(values < goal).sum()} of {len(values)}"
        lines.append(f"- `{backend}` ≥ {goal:.0%} of the dense limit at {where}: {span(values, pct)} — "
                     f"**{verdict}**.")
    lines.append("")
    return lines


def _load_avg(v) -> str:
    return ", ".join(f"{x:.2f}" for x in v) if v else "n/a"


def section_gpu(gpu: dict | None) -> list[str]:
    """The reference page's GPU claims: `gpu` = {"forward": sweep, "backward": sweep, "decode_switch": dict} as
    benchmarks/gpu.py saves them, or None where no CUDA device measured them (then the section says so)."""
    lines = ["## 9. GPU", ""]
    if not gpu:
        return lines + ["**Not measured.** The machine that wrote this file has no CUDA device, so the reference "
                        "page's GPU claims (`batched_mm` fastest for small inputs, the decode switch's gain, the "
                        "compiled variants) are neither confirmed nor refuted here. On a machine with one: "
                        "`python benchmarks/gpu.py`, then `python benchmarks/run_benchmarks.py --reuse`.", ""]
    for name in ("forward", "backward"):
        table = gpu.get(name)
        if table is None:
            continue
        env = table.attrs["environment"]
        best = analysis.fastest(table, backends=("eager", "batched_mm", "grouped_mm"))
        small = best[best["num_tokens"] <= 16]
        lines += [f"### {name.replace('backward', 'forward + backward')}, {env['device_name']}", "",
                  f"*batched_mm is the fastest for small inputs* (T ≤ 16): fastest at "
                  f"{(small['fastest'] == 'batched_mm').sum()} of {len(small)} shapes; at T > 16 `grouped_mm` "
                  f"is fastest at {(best[best['num_tokens'] > 16]['fastest'] == 'grouped_mm').sum()} of "
                  f"{(best['num_tokens'] > 16).sum()}.", "",
                  "| dtype | E | k | T | fastest | runner-up's time / fastest's |", "| --- | --- | --- | --- | --- | --- |"]
        for _, r in best.sort_values(["dtype", "num_experts", "top_k", "num_tokens"]).iterrows():
            lines.append(f"| {r['dtype']} | {r['num_experts']} | {r['top_k']} | {r['num_tokens']} | "
                         f"`{r['fastest']}` | {_x(r['runner_up_over_fastest'])}x |")
        lines.append("")
    switch = gpu.get("decode_switch")
    if switch:
        gain = switch["grouped_mm throughout"] / switch["decode switch"]
        lines += [f"*The decode switch*: one `generate` of 32 new tokens for 8 prompts of 64 tokens took "
                  f"{switch['grouped_mm throughout']:.3f} s with grouped_mm throughout and "
                  f"{switch['decode switch']:.3f} s with the switch ({_x(gain)}x); same tokens: "
                  f"{switch['same tokens']}.", ""]
    return lines
