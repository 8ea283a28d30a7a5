"""`markdown(default, compiled, images, command)`: the whole BENCHMARKS.md from two sweeps, the answers first.

`benchmarks/run_benchmarks.py` measures the sweeps, draws the plots and writes the file; this module only reads
the tables, so `--reuse` rewrites the report from saved sweeps in seconds.
"""

from __future__ import annotations

import pandas as pd

from ..core.machine import bf16_emulation_note
from ..hf.inspect_adapter import NAMESAKE_BACKENDS
from ..memory import format_bytes
from . import analysis
from .io import label
from .report_sections import (compiled_run, pct, section_auto, section_backward, section_claims, section_dense,
                              section_gpu, section_transformers, shape_text, span)


def _verdict(hits: int, total: int) -> str:
    """How a claim fared over `total` shapes, `hits` of which agree with it."""
    if total == 0:
        return "**not measured**"
    if hits == total:
        return "**holds**"
    return "**mostly, not always**" if hits > total / 2 else "**does not hold**"


def _measured(part: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The rows where every one of `columns` was measured (none if a column is missing altogether)."""
    return part.dropna(subset=list(columns)) if all(c in part for c in columns) else part[:0]


def section_summary(default, compiled, min_pairs: int = 4096) -> list[str]:
    """The answers first: the targets and the reference page's CPU claims, one line each."""
    lines = ["## Summary", ""]
    worst = {}
    for b in NAMESAKE_BACKENDS:
        r = analysis.ratio_table(default, b, f"hf:{b}")
        if len(r):
            worst[b] = (r["ratio"].median(), (r["verdict"] == "slower").sum(), len(r), r["ratio"].max())
    if worst:
        lines.append("- **moelab vs transformers** (median ratio of times, lower is better; shapes where moelab is "
                     "slower beyond the IQRs): " + "; ".join(
                         f"`{b}` {m:.2f} ({n} of {t} slower, worst {w:.2f})" for b, (m, n, t, w) in worst.items())
                     + ".")
    frac = analysis.dense_fractions(default, min_pairs)
    if len(frac) and "grouped_mm" in frac:
        g = frac["grouped_mm"]
        vs_eager = analysis.ratio_table(default, "grouped_mm", "eager")
        vs_eager = vs_eager[vs_eager["pairs"] >= min_pairs]
        lines.append(f"- **grouped_mm at S ≥ {min_pairs}**: {span(g, pct)} of the dense limit (≥ 90% at "
                     f"{(g >= 0.9).sum()} of {len(g)} shapes; transformers' {span(frac.get('hf:grouped_mm'), pct)}"
                     f"); the bare grouped GEMMs alone reach {span(frac['grouped_gemm_bound'], pct)} "
                     f"({span(frac['cached_gemm_bound'], pct)} with the weights cached); no slower than eager at "
                     f"{(vs_eager['verdict'] != 'slower').sum()} of {len(vs_eager)} shapes.")
    both = compiled_run(default, compiled)
    for name, table, comp in (("uncompiled", default, False), ("compiled", both, True)):
        r = analysis.auto_vs_best(table, compiled=comp) if table is not None else pd.DataFrame()
        if len(r):
            lines.append(f"- **auto, {name}**: worst {r['ratio'].max():.2f}x the fastest fixed backend (median "
                         f"{r['ratio'].median():.2f}; above 1.10 at {(r['ratio'] > 1.1).sum()} of {len(r)} shapes).")
    for lib in ("transformers", "moelab"):
        f = analysis.fastest(default, library=lib, backends=NAMESAKE_BACKENDS)  # the claims rank these three
        if f.empty:
            continue
        grouped_first = f["tied_with_fastest"].apply(lambda v: "grouped_mm" in v).sum()
        eg = _measured(f, "eager_ms", "grouped_mm_ms")
        eb = _measured(f, "eager_ms", "batched_mm_ms")
        owner = f"{lib}'" if lib.endswith("s") else f"{lib}'s"
        lines.append(f"- Reference claims for {owner} backends: *grouped_mm is the most efficient CPU backend for "
                     f"all input sizes* {_verdict(grouped_first, len(f))} (fastest or tied at {grouped_first} of "
                     f"{len(f)} shapes); *eager is slower than grouped_mm* "
                     f"{_verdict((eg['eager_ms'] > eg['grouped_mm_ms']).sum(), len(eg))} "
                     f"({(eg['eager_ms'] > eg['grouped_mm_ms']).sum()} of {len(eg)}); *eager is faster than "
                     f"batched_mm* {_verdict((eb['eager_ms'] < eb['batched_mm_ms']).sum(), len(eb))} "
                     f"({(eb['eager_ms'] < eb['batched_mm_ms']).sum()} of {len(eb)} where batched_mm ran). "
                     "Section 4 names the exceptions.")
    lines.append("")
    return lines


def section_skipped(default, compiled) -> list[str]:
    lines = ["## 6. What was not measured, and why", ""]
    for name, table in (("default sweep", default), ("compiled sweep", compiled)):
        if table is None:
            continue
        rows = table[table["status"] != "ok"]
        lines += [f"- {name}: {len(rows)} of {len(table)} measurements not run.", "",
                  "<details><summary>Which, and the reason recorded</summary>", ""]
        for _, r in rows.iterrows():
            lines.append(f"  - {r['status']}: {label(r)} {shape_text(r)}: {r['reason']}")
        lines += ["", "</details>", ""]
    lines.append("")
    return lines


def bf16_status(env: dict) -> str:
    """What the record says of bfloat16 on its CPU: 'native bf16', 'no native bf16: bfloat16 emulated', or ''
    (a record from before `native_bf16` was kept, or unknown flags)."""
    native = env.get("native_bf16")
    return "" if native is None else "native bf16" if native else "no native bf16: bfloat16 emulated"


def bf16_caveat(env: dict, *tables) -> list[str]:
    """The lines to put next to bfloat16 figures measured where bfloat16 is emulated (none elsewhere)."""
    if env.get("native_bf16") is not False:
        return []
    if not any(t is not None and (t["dtype"] == "bfloat16").any() for t in tables):
        return []
    return [f"> **bfloat16 rows below were emulated.** {bf16_emulation_note(env.get('onednn_bf16'))}", ""]


def _under_heading(section: list[str], caveat: list[str]) -> list[str]:
    """`caveat` between a section's heading (its first two lines) and its text."""
    return section[:2] + caveat + section[2:] if caveat else section


def markdown(default: pd.DataFrame, compiled: pd.DataFrame | None = None, images: dict[str, str] | None = None,
             command: str = "python benchmarks/run_benchmarks.py", min_pairs: int = 4096,
             backward: pd.DataFrame | None = None, gpu: dict | None = None) -> str:
    """BENCHMARKS.md from the default sweep (uncompiled, run with `transformers=True, gemm_bound=True`) and the
    compiled one; `images`: {file name: path} of the plots to show; `min_pairs`: where "large S" starts;
    `backward`: the forward + backward sweep (`backward=True, transformers=True`), its own section when given;
    `gpu`: what benchmarks/gpu.py saved (None: the GPU section says it was not measured)."""
    images = images or {}
    env = default.attrs["environment"]
    cenv = compiled.attrs["environment"] if compiled is not None else {}
    lines = ["# Benchmarks: measured, not claimed", "",
             "<!-- generated by benchmarks/run_benchmarks.py; do not edit by hand -->",
             f"Regenerate everything (tables, plots, this file) with `{command}`; rewrite this file from the saved "
             "sweeps with `python benchmarks/run_benchmarks.py --reuse`. Raw data: "
             "[docs/bench/default/sweep.csv](docs/bench/default/sweep.csv)"
             + (", [docs/bench/compiled/sweep.csv](docs/bench/compiled/sweep.csv)" if compiled is not None else "")
             + ".", "",
             f"**Machine:** {env['device_name']} ({env['cpu_capability']}"
             + (f", {bf16_status(env)}" if bf16_status(env) else "") + f"), {env['cpu_count']} cores, "
             f"{env['platform']}; torch {env['torch_version']}, transformers {env['transformers_version']}, moelab "
             f"{env['moelab_version']}. **One thread**, forward only, clock = **{env['clock']}** (CPU time of the "
             "process: on this shared machine wall time swings 2x with other users' load, CPU time does not). "
             f"Measured {env['time']}; load average before {_load(env.get('load_average'))}, after "
             f"{_load(env.get('load_average_after'))} (other engineers share this machine). "
             f"Default sweep: {env.get('elapsed_s', 0) / 60:.0f} min"
             + (f", compiled sweep: {cenv.get('elapsed_s', 0) / 60:.0f} min" if cenv else "") + ".", "",
             f"**Grid** (the issue's default sweep): T ∈ {_values(default, 'num_tokens')}, "
             f"num_experts ∈ {_values(default, 'num_experts')}, top_k ∈ {_values(default, 'top_k')}, hidden "
             f"{_values(default, 'hidden_size')}, expert-intermediate {_values(default, 'intermediate_size')}, "
             f"dtypes {_values(default, 'dtype')}. Each measurement: `torch.utils.benchmark` blocked_autorange, ≥ 0.2 s and ≥ 5 blocks; "
             "median and interquartile range per call. Memory budget for the guard: "
             f"{format_bytes(env['budget_bytes'])} (half of the available memory).", ""]
    caveat = bf16_caveat(env, default, compiled)
    lines += caveat
    lines += section_summary(default, compiled, min_pairs)
    # NOTE: the caveat again under every section whose tables have bfloat16 rows: a reader jumps to one table
    lines += _under_heading(section_transformers(default), caveat)
    lines += _under_heading(section_dense(default, min_pairs), caveat)
    lines += _under_heading(section_auto(default, compiled), caveat)
    lines += _under_heading(section_claims(default, compiled), caveat)
    lines += ["## 5. Plots", ""]
    captions = {"time_": "Time per call vs tokens (log-log), moelab solid, transformers dashed, dense limit dotted; "
                         "crossovers marked",
                "memory_": "Measured peak extra memory vs tokens; hollow markers: skipped by the memory guard, "
                           "drawn at its estimate",
                "speedup_": "Speedup maps over (top_k, num_experts)",
                "time_compiled_": "Compiled variants: time vs tokens"}
    for name, path in images.items():
        cap = next(v for k, v in sorted(captions.items(), key=lambda kv: -len(kv[0])) if name.startswith(k))
        lines += [f"**{name.removesuffix('.png')}** — {cap}.", "", f"![{name}]({path})", ""]
    lines += section_skipped(default, compiled)
    lines += ["## 7. What changed in the backends to get here", "",
              "- `grouped_mm` on CPU inference (no autograd, not compiling) takes its fast path, `moelab/backends/cpu/lean.py`: the same "
              "steps, but dead intermediates are overwritten in place and the large ones live in a per-thread "
              "workspace (`moelab.backends.cpu.workspace`), written by `torch.mm(out=...)` per group — exactly the loop "
              "the native CPU `grouped_mm` kernel runs, minus allocating its result. Profiling showed where the time "
              "went: fresh multi-MiB buffers are fresh pages (glibc returns buffers ≥ 32 MiB to the OS on free and "
              "trims the heap), one page fault per 4 KiB, ~1.7 µs each here: 12,000–98,000 faults per call at "
              "S ≥ 4096, 10–25% of the call. Also: gathers by `index_select` (3x faster than advanced indexing on "
              "CPU), the k = 2 reduction as one add (the strided bf16 sum was 8x slower).",
              "- `grouped_mm` under `torch.compile`: the k slots are summed by a chain of adds, not `sum(dim=1)`: "
              "inductor fused that sum with the unsort gather into one kernel walking the k rows innermost, 16 ms "
              "instead of 0.4 ms per call at bfloat16 E=8 k=8 T=512 (compiled grouped_mm went from 82 to 66 ms).",
              "- `batched_mm`: `index_select` for the weight gather and each pair as a row vector times the "
              "transposed weight in `bmm` (the same dot products; 2–5x faster CPU kernels). It still copies "
              "S·3·I·H weight elements — that is the algorithm.",
              "- `eager`: `index_select` for the per-expert token gather.",
              ""]
    if backward is not None:
        benv = backward.attrs["environment"]
        machine = (f"{benv['device_name']} ({benv['cpu_capability']}"
                   + (f", {bf16_status(benv)}" if bf16_status(benv) else "") + ")")
        lines += _under_heading(section_backward(backward, machine), bf16_caveat(benv, backward))
    lines += section_gpu(gpu)
    return "\n".join(lines)


def _values(table: pd.DataFrame, column: str) -> str:
    values = sorted(table[column].unique().tolist())
    return str(values[0]) if len(values) == 1 else str(values)


def _load(v) -> str:
    return ", ".join(f"{x:.2f}" for x in v) if v else "n/a"

