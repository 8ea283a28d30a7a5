"""Regenerate docs/compile_table.md: which experts backends torch.compile captures on this machine, and the speedup.

    python benchmarks/compile_table.py                 # the full table (~20 minutes on 2 shared cores)
    python benchmarks/compile_table.py --quick         # float32 / bfloat16, two modes: a smoke run

Each backend x dtype x fullgraph x mode is compiled with inductor on CPU, checked against the uncompiled output,
and timed at T=1 (decode) and T=256 (prefill) tokens; speedup = uncompiled median / compiled median.
`capacity` runs twice: dropless (no dropped mask, C = the largest group: what `moelab.bench.sweep` times) and with
the layer's capacity factor (the router's dropped mask passed on, C = ceil(factor * T * k / E): static shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moelab  # noqa: E402
from moelab.backends import BLOCK_SIZE, ExpertsInterface, force_fallback  # noqa: E402
from moelab.bench.env import environment  # noqa: E402
from moelab.bench.timing import measure_time  # noqa: E402

CAPACITY_FACTOR = 1.25  # the capacity variant's factor (Switch Transformer's usual training value)
BACKENDS = ("eager", "batched_mm", "grouped_mm", "grouped_mm (fallback)", "capacity (dropless)",
            f"capacity (factor {CAPACITY_FACTOR})", "block_aligned", "auto")
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
    """(backend function, context to run it in, capacity factor of the layer or None) for a row name."""
    base = name.split(" ")[0]
    fn = ExpertsInterface.get(base)
    ctx = force_fallback if "fallback" in name else contextlib.nullcontext
    return fn, ctx, CAPACITY_FACTOR if "factor" in name else None


def _inputs(moe, dtype, with_dropped: bool) -> dict:
    """{T: backend arguments after the experts}: the layer's own routing of a seeded input (+ its dropped mask)."""
    inputs = {}
    for T in TOKENS:
        x = torch.randn(T, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(T)).to(dtype)
        with torch.no_grad():
            r = moe.router(x)
        inputs[T] = (x, r.top_k_index, r.top_k_weights) + ((r.dropped,) if with_dropped else ())
    return inputs


def run_group(name: str, dtype_name: str, combos, min_run_time: float, emit) -> None:
    """Compile and time one backend in one dtype for each (fullgraph, mode) of `combos`; `emit(row)` each row."""
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    fn, ctx, factor = _backend(name)
    config = moelab.MoEConfig(**SHAPE, capacity_factor=factor, eval_capacity_factor=factor)
    moe = moelab.SparseMoE(config, seed=0, dtype=dtype)  # seed 0: the same weights and router for every row
    inputs = _inputs(moe, dtype, with_dropped=factor is not None)
    plain = {}
    with torch.no_grad(), ctx():
        for T, args in inputs.items():
            ref = fn(moe.experts, *args)
            timing = measure_time(lambda: fn(moe.experts, *args), num_threads=1, clock="process",
                                  min_run_time=min_run_time)
            plain[T] = (ref, timing["median_ms"])
    for fullgraph, mode in combos:
        row = {"backend": name, "dtype": dtype_name, "fullgraph": fullgraph, "mode": mode or "default"}
        print(f"{name:22s} {dtype_name:9s} fullgraph={fullgraph!s:5s} mode={row['mode']:28s}", end=" ", flush=True)
        _reset()
        torch._dynamo.utils.counters.clear()
        started = time.perf_counter()
        try:
            with torch.no_grad(), ctx(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = torch.compile(lambda *args: fn(moe.experts, *args), fullgraph=fullgraph, mode=mode,
                                         dynamic=False)
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
        print("yes" if row["compiles"] else "NO", f"{row['compile_s']:.1f}s", row.get("note", "")[:80], flush=True)
        emit(row)
        _reset()


def _worker(spec: str) -> int:
    """The child's side of `run`: one group, each finished row appended to the rows file as a JSON line."""
    job = json.loads(spec)
    with open(job["rows_file"], "a", encoding="utf-8") as out:
        def emit(row):
            out.write(json.dumps(row) + "\n")
            out.flush()  # a later combination may kill the process: what is finished stays written
        run_group(job["backend"], job["dtype"], [tuple(c) for c in job["combos"]], job["min_run_time"], emit)
    return 0


def run(dtypes, modes, min_run_time: float, backends=BACKENDS):
    """Every row, each (backend, dtype) group in a child process of its own.

    NOTE: a child process, because one combination can kill the interpreter (inductor's max-autotune segfaulted
    on dropless capacity's data-dependent bmm here); its row then says so and the group goes on in a new child.
    """
    rows = []
    for dtype_name, name in itertools.product(dtypes, backends):
        todo = list(itertools.product((True, False), modes))
        while todo:
            with tempfile.TemporaryDirectory() as tmp:
                rows_file = Path(tmp) / "rows.jsonl"
                rows_file.touch()
                spec = json.dumps({"backend": name, "dtype": dtype_name, "combos": todo, "rows_file": str(rows_file),
                                   "min_run_time": min_run_time})
                code = subprocess.run([sys.executable, __file__, "--worker", spec], cwd=ROOT).returncode
                done = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines()]
            rows += done
            todo = todo[len(done):]
            if todo and code != 0:  # the combination after the last finished one ended the process
                fullgraph, mode = todo.pop(0)
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                print(f"  -> the process died ({how}) at fullgraph={fullgraph} mode={mode or 'default'}", flush=True)
                rows.append({"backend": name, "dtype": dtype_name, "fullgraph": fullgraph, "mode": mode or "default",
                             "compiles": False, "compile_s": None,
                             "note": f"crashed: the Python process died ({how}) while compiling or running it"})
            elif todo:
                raise RuntimeError(f"the worker for {name} {dtype_name} exited cleanly with {len(todo)} rows left")
    return rows


def _fmt(v):
    return "" if v is None or v != v else f"{v:.2f}x"


def _seconds(v):
    return "" if v is None else f"{v:.1f} s"  # None: the process died, no time to give


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
                     f"{_fmt(r.get('speedup_T1'))} | {_fmt(r.get('speedup_T256'))} | "
                     f"{_seconds(r['compile_s'])} | "
                     f"{r['note'].replace('|', '/')} |")
    lines += ["", "## Reading it", "",
              "- `eager` loops over the experts that received tokens (`nonzero` + `tolist`): data-dependent, so "
              "`fullgraph=True` fails, while `fullgraph=False` compiles with graph breaks.",
              "- `auto` under `torch.compile` chooses among `batched_mm` and `grouped_mm` only "
              "(`moelab.backends.auto`), so it captures whole.",
              "- `reduce-overhead` asks for CUDA graphs; on CPU inductor has none to make and the mode behaves like "
              "`default`."]
    layouts = {  # why each layout's shapes are static or not; what happened is read off the rows
        "capacity (dropless)": "C is the largest group, `int(tokens_per_expert.max())`: a size read from the data",
        f"capacity (factor {CAPACITY_FACTOR})": f"C = min(ceil({CAPACITY_FACTOR} * T * k / E), T), from the "
                                                 "shapes alone, with the router's dropped mask passed on",
        "block_aligned": f"the buffer has the static bound S + E * (M - 1) rows (M = {BLOCK_SIZE}); only the "
                         "padded group ends are data",
    }
    for name, why in layouts.items():
        if any(r["backend"] == name for r in rows):
            lines.append(f"- `{name}`: {why}. {_fullgraph_outcome([r for r in rows if r['backend'] == name])}")
    lines.append("")
    return "\n".join(lines)


def _fullgraph_outcome(mine) -> str:
    """One sentence: what `fullgraph=True` and `fullgraph=False` did for one backend's rows, as measured."""
    parts = []
    for fullgraph in (True, False):
        part = [r for r in mine if r["fullgraph"] is fullgraph]
        ok = [r for r in part if r["compiles"]]
        if not part:
            continue
        if len(ok) == len(part):
            breaks = sorted({r["graph_breaks"] for r in ok})
            what = "compiled in every dtype and mode" + (
                "" if breaks == [0] else f" (graph breaks: {', '.join(str(b) for b in breaks)})")
        elif not ok:
            errors = sorted({r["note"].split(":")[0] for r in part})
            what = f"failed in every dtype and mode ({', '.join(errors)})"
        else:
            errors = sorted({r["note"].split(":")[0] for r in part if not r["compiles"]})
            what = (f"compiled in {len(ok)} of {len(part)} combinations (failed in "
                    + ", ".join(f"{r['dtype']} `{r['mode']}`" for r in part if not r["compiles"])
                    + f": {', '.join(errors)})")
        parts.append(f"`fullgraph={fullgraph}` {what}")
    return "Measured: " + "; ".join(parts) + "."


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # run()'s child process
        return _worker(argv[1])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "compile_table.md"))
    parser.add_argument("--quick", action="store_true", help="float32/bfloat16 and two modes only")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated rows to run (default: all of them)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backends takes names from {list(BACKENDS)}, got {unknown or args.backends!r}")
    dtypes = DTYPES[:2] if args.quick else DTYPES
    modes = MODES[:1] + MODES[2:3] if args.quick else MODES
    env = environment("cpu", 1, "process")
    rows = run(dtypes, modes, args.min_run_time, backends)
    command = ("python benchmarks/compile_table.py" + (" --quick" if args.quick else "")
               + (f" --backends '{args.backends}'" if backends != list(BACKENDS) else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(rows, env, command))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
