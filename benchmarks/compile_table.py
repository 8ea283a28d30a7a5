"""Regenerate docs/compile_table.md: which experts backends torch.compile captures on this machine, and the speedup.

    python benchmarks/compile_table.py                 # the full table (~10 minutes on 2 cores)
    python benchmarks/compile_table.py --quick         # float32 / bfloat16, two modes: a smoke run

Each backend x dtype x fullgraph x mode is compiled with inductor on CPU, checked against the uncompiled output,
and timed at T=1 (decode) and T=256 (prefill) tokens; speedup = uncompiled median / compiled median.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moelab  # noqa: E402
from moelab.backends import ExpertsInterface, force_fallback  # noqa: E402
from moelab.bench.env import environment  # noqa: E402
from moelab.bench.timing import measure_time  # noqa: E402

BACKENDS = ("eager", "batched_mm", "grouped_mm", "grouped_mm (fallback)", "auto")
DTYPES = ("float32", "bfloat16", "float16")
MODES = (None, "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
TOKENS = (1, 256)
SHAPE = dict(hidden_size=1024, intermediate_size=512, num_experts=8, top_k=2)
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-3}


def _reset():
    """torch._dynamo.reset(), retried: after a failed reduce-overhead compile, a cached backend can be garbage
    collected while reset() iterates over them ("dictionary changed size during iteration")."""
    for _ in range(3):
        gc.collect()
        try:
            torch._dynamo.reset()
            return
        except RuntimeError:
            continue
    torch._dynamo.reset()


def _backend(name):
    base = name.split(" ")[0]
    fn = ExpertsInterface.get(base)
    ctx = force_fallback if "fallback" in name else contextlib.nullcontext
    return fn, ctx


def run(dtypes, modes, min_run_time: float):
    torch.set_num_threads(1)
    config = moelab.MoEConfig(**SHAPE)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        moe = moelab.SparseMoE(config, seed=0, dtype=dtype)
        inputs = {}
        for T in TOKENS:
            x = torch.randn(T, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(T)).to(dtype)
            with torch.no_grad():
                r = moe.router(x)
            inputs[T] = (x, r.top_k_index, r.top_k_weights)
        for name in BACKENDS:
            fn, ctx = _backend(name)
            plain = {}
            with torch.no_grad(), ctx():
                for T, args in inputs.items():
                    ref = fn(moe.experts, *args)
                    timing = measure_time(lambda: fn(moe.experts, *args), num_threads=1, clock="process",
                                           min_run_time=min_run_time)
                    plain[T] = (ref, timing["median_ms"])
            for fullgraph, mode in itertools.product((True, False), modes):
                row = {"backend": name, "dtype": dtype_name, "fullgraph": fullgraph, "mode": mode or "default"}
                print(f"{name:22s} {dtype_name:9s} fullgraph={fullgraph!s:5s} mode={row['mode']:28s}", end=" ",
                      flush=True)
                _reset()
                torch._dynamo.utils.counters.clear()
                started = time.perf_counter()
                try:
                    with torch.no_grad(), ctx(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        compiled = torch.compile(lambda x, i, w: fn(moe.experts, x, i, w), fullgraph=fullgraph,
                                                 mode=mode, dynamic=False)
                        for T, args in inputs.items():
                            out = compiled(*args)
                            err = (out.float() - plain[T][0].float()).abs().max().item()
                            if not err <= TOL[dtype_name]:
                                raise AssertionError(f"wrong result at T={T}: max abs error {err:.3g}")
                            t = measure_time(lambda: compiled(*args), num_threads=1, clock="process",
                                              min_run_time=min_run_time)
                            row[f"speedup_T{T}"] = plain[T][1] / t["median_ms"]
                            row[f"compiled_ms_T{T}"] = t["median_ms"]
                            row[f"eager_ms_T{T}"] = plain[T][1]
                    row["compiles"] = True
                    row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
                    row["note"] = ""
                except Exception as err:  # noqa: BLE001 - an incompatibility is the result we record
                    row["compiles"] = False
                    text = " ".join(str(err).split())
                    row["note"] = f"{type(err).__name__}: {text[:160]}"
                row["compile_s"] = time.perf_counter() - started
                print("yes" if row["compiles"] else "NO", f"{row['compile_s']:.1f}s", row.get("note", "")[:80],
                      flush=True)
                rows.append(row)
                _reset()
    return rows


def _fmt(v):
    return "" if v is None or v != v else f"{v:.2f}x"


def markdown(rows, env, command: str) -> str:
    lines = [
        "# torch.compile and the experts backends, measured on this machine",
        "",
        "<!-- generated by benchmarks/compile_table.py; do not edit by hand -->",
        f"Regenerate with: `{command}`",
        "",
        f"Measured {env['time']} on {env['device_name']} ({env['cpu_capability']}), torch {env['torch_version']}, "
        f"1 thread, inductor on CPU, `dynamic=False`. Shape: H={SHAPE['hidden_size']}, I={SHAPE['intermediate_size']}, "
        f"E={SHAPE['num_experts']}, k={SHAPE['top_k']}; T=1 (decode) and T=256 (prefill). "
        "Speedup = uncompiled median / compiled median (CPU time of the process; > 1 means compiling helps). "
        "`compiles` means the compiled function ran and matched the uncompiled output.",
        "",
        "## Summary, in the reference page's format",
        "",
        "| Implementation | compilation modes | dtypes | `fullgraph=True` |",
        "| --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == name]
        ok = [r for r in mine if r["compiles"]]
        modes = sorted({r["mode"] for r in ok}, key=lambda m: [r["mode"] for r in mine].index(m))
        dtypes = [d for d in dict.fromkeys(r["dtype"] for r in mine) if any(r["dtype"] == d for r in ok)]
        fg = [r for r in mine if r["fullgraph"]]
        fg_ok = [r for r in fg if r["compiles"]]
        fg_text = "Yes" if fg and len(fg_ok) == len(fg) else ("No" if not fg_ok else
                                                               f"partly ({len(fg_ok)}/{len(fg)})")
        all_modes = len(modes) == len({r["mode"] for r in mine})
        lines.append(f"| `{name}` | {'all' if all_modes else ', '.join(f'`{m}`' for m in modes) or 'none'} | "
                     f"{', '.join(f'`{d}`' for d in dtypes) or 'none'} | {fg_text} |")
    lines += ["", "## Every combination", "",
              "| backend | dtype | fullgraph | mode | compiles | graph breaks | speedup T=1 | speedup T=256 | "
              "compile time | note |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['backend']}` | {r['dtype']} | {r['fullgraph']} | `{r['mode']}` | "
                     f"{'yes' if r['compiles'] else '**no**'} | {r.get('graph_breaks', '')} | "
                     f"{_fmt(r.get('speedup_T1'))} | {_fmt(r.get('speedup_T256'))} | {r['compile_s']:.1f} s | "
                     f"{r['note'].replace('|', '/')} |")
    lines += ["", "## Reading it", "",
              "- `eager` loops over the experts that received tokens (`nonzero` + `tolist`): data-dependent, so "
              "`fullgraph=True` fails, while `fullgraph=False` compiles with graph breaks.",
              "- `auto` under `torch.compile` chooses among `batched_mm` and `grouped_mm` only "
              "(`moelab.backends.auto`), so it captures whole.",
              "- `reduce-overhead` asks for CUDA graphs; on CPU inductor has none to make and the mode behaves like "
              "`default`.",
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "compile_table.md"))
    parser.add_argument("--quick", action="store_true", help="float32/bfloat16 and two modes only")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args(argv)
    dtypes = DTYPES[:2] if args.quick else DTYPES
    modes = MODES[:1] + MODES[2:3] if args.quick else MODES
    env = environment("cpu", 1, "process")
    rows = run(dtypes, modes, args.min_run_time)
    command = "python benchmarks/compile_table.py" + (" --quick" if args.quick else "")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(rows, env, command))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
