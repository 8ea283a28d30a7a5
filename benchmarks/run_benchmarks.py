"""Regenerate BENCHMARKS.md and its plots under docs/bench/: the one command.

    python benchmarks/run_benchmarks.py             # measure (~35 minutes on 2 cores, one thread) and write
    python benchmarks/run_benchmarks.py --reuse     # rewrite BENCHMARKS.md from the sweeps saved last time
    python benchmarks/run_benchmarks.py --only-backward   # re-measure the forward + backward sweep only

It runs (1) the default sweep, moelab and transformers side by side on identical weights, with the dense limit
and the bare grouped GEMMs; (2) the same grid with every backend compiled (inductor, fullgraph where possible),
the uncompiled backends timed again beside them; (3) forward + backward on a smaller grid (a training step costs
about 3x a forward), moelab and transformers side by side with the dense forward + backward limit;
then compares moelab with transformers, with the dense limit, `auto` with the fastest fixed backend, and checks
the reference page's CPU claims. docs/compile_table.md has its own command: benchmarks/compile_table.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moelab import bench  # noqa: E402
from moelab.bench import plots  # noqa: E402
from moelab.bench.report import markdown  # noqa: E402

OUT = ROOT / "docs" / "bench"


def measure(args, only_compiled: bool = False) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    grid = dict(bench.DEFAULT_GRID)
    if args.tokens:
        grid["tokens"] = tuple(int(t) for t in args.tokens.split(","))
    common = dict(tokens=grid["tokens"], num_experts=grid["num_experts"], top_k=grid["top_k"],
                  hidden_size=grid["hidden_size"], intermediate_size=grid["intermediate_size"],
                  dtypes=grid["dtypes"], min_run_time=args.min_run_time, num_threads=1, progress=True)
    if only_compiled:
        default = bench.load(OUT / "default" / "sweep.json")
    else:
        started = time.time()
        default = bench.sweep(bench.DEFAULT_BACKENDS, compiled=(False,), transformers=True, gemm_bound=True,
                              **common)
        default.attrs["environment"]["elapsed_s"] = time.time() - started
        bench.save(default, OUT / "default")
    compiled = None
    if not args.skip_compiled:
        started = time.time()
        # the uncompiled backends again, interleaved with the compiled ones: "auto compiled vs every variant"
        # then compares timings of one run
        compiled = bench.sweep(bench.DEFAULT_BACKENDS, compiled=(False, True), measure_memory=False,
                               dense_limit=False, **common)
        compiled.attrs["environment"]["elapsed_s"] = time.time() - started
        bench.save(compiled, OUT / "compiled")
    return default, compiled


# forward + backward: the backward issue's grid, smaller than the forward one
BACKWARD_GRID = dict(tokens=(128, 1024), num_experts=(8, 64), top_k=(2, 8), hidden_size=512, intermediate_size=256,
                     dtypes=("float32", "bfloat16"))


def measure_backward(args) -> pd.DataFrame:
    started = time.time()
    table = bench.sweep(bench.DEFAULT_BACKENDS, compiled=(False,), transformers=True, backward=True,
                        measure_memory=False, min_run_time=args.min_run_time, num_threads=1, progress=True,
                        **BACKWARD_GRID)
    table.attrs["environment"]["elapsed_s"] = time.time() - started
    bench.save(table, OUT / "backward")
    return table


def load_gpu() -> dict | None:
    """What benchmarks/gpu.py saved under docs/bench/gpu (None where it never ran: no CUDA device)."""
    gpu = {name: bench.load(OUT / "gpu" / name / "sweep.json") for name in ("forward", "backward")
           if (OUT / "gpu" / name / "sweep.json").exists()}
    if (OUT / "gpu" / "decode_switch.json").exists():
        gpu["decode_switch"] = json.loads((OUT / "gpu" / "decode_switch.json").read_text())
    return gpu or None


def write_plots(default: pd.DataFrame, compiled: pd.DataFrame | None) -> dict[str, str]:
    figures = {}
    for dtype in dict.fromkeys(default["dtype"]):
        figures[f"time_{dtype}.png"] = plots.plot_time(default, dtype=dtype)
        figures[f"memory_{dtype}.png"] = plots.plot_memory(default, dtype=dtype)
    figures["speedup_grouped_mm_over_eager.png"] = plots.plot_speedup_map(default, "eager", "grouped_mm")
    figures["speedup_grouped_mm_over_hf_grouped_mm.png"] = plots.plot_speedup_map(default, "hf:grouped_mm",
                                                                                   "grouped_mm")
    figures["speedup_eager_over_hf_eager.png"] = plots.plot_speedup_map(default, "hf:eager", "eager")
    if compiled is not None and (compiled["status"] == "ok").any():
        for dtype in dict.fromkeys(compiled["dtype"]):
            figures[f"time_compiled_{dtype}.png"] = plots.plot_time(compiled, dtype=dtype, dense=False,
                                                                    variants=[f"{b}+compile" for b in
                                                                              bench.DEFAULT_BACKENDS],
                                                                    annotate=[("batched_mm+compile",
                                                                               "grouped_mm+compile")])
    paths = {}
    for name, fig in figures.items():
        fig.savefig(OUT / name, dpi=100)
        paths[name] = f"docs/bench/{name}"
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="rewrite BENCHMARKS.md from docs/bench/*/sweep.json")
    parser.add_argument("--skip-compiled", action="store_true", help="no compiled sweep")
    parser.add_argument("--only-compiled", action="store_true",
                        help="re-measure the compiled sweep only, reusing the saved default sweep")
    parser.add_argument("--only-backward", action="store_true",
                        help="re-measure the forward + backward sweep only, reusing the saved forward sweeps")
    parser.add_argument("--skip-backward", action="store_true", help="no forward + backward sweep")
    parser.add_argument("--tokens", default=None, help="override the token grid (e.g. 1,16 for a smoke run)")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    saved_backward = OUT / "backward" / "sweep.json"
    if args.reuse or args.only_backward:
        default = bench.load(OUT / "default" / "sweep.json")
        path = OUT / "compiled" / "sweep.json"
        compiled = bench.load(path) if path.exists() and not args.skip_compiled else None
    else:
        default, compiled = measure(args, only_compiled=args.only_compiled)
    if args.only_backward or not (args.reuse or args.skip_backward or args.only_compiled):
        backward = measure_backward(args)
    else:
        backward = bench.load(saved_backward) if saved_backward.exists() and not args.skip_backward else None
    images = write_plots(default, compiled)
    command = "python benchmarks/run_benchmarks.py"
    Path(args.out).write_text(markdown(default, compiled, images, command, backward=backward, gpu=load_gpu()))
    print(f"wrote {args.out} and {len(images)} plots under {OUT}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    sys.exit(main())
