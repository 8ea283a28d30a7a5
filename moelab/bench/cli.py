"""`python -m moelab bench` and `python -m moelab calibrate`: the sweep and the calibration, headless."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from ..core.machine import bf16_note
from . import io, plots
from .calibrate import calibrate
from .sweep import DEFAULT_BACKENDS, DEFAULT_GRID, sweep


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated ints, got {text!r}") from None


def _tokens(text: str) -> list:
    """'1,16,4x128' -> [1, 16, (4, 128)]: T, or batch_size x seq_len."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            out.append(tuple(int(v) for v in item.split("x")) if "x" in item else int(item))
        except ValueError:
            raise ValueError(f"--tokens takes comma-separated T or BxS (e.g. 1,16,4x128), got {text!r}") from None
    return out


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _join(values) -> str:
    return ",".join(str(v) for v in values)


def _add_grid_arguments(p, backends: bool = True) -> None:
    p.add_argument("--tokens", default=_join(DEFAULT_GRID["tokens"]),
                   help="T per point, comma-separated; BxS for batch x sequence (default %(default)s)")
    p.add_argument("--experts", default=_join(DEFAULT_GRID["num_experts"]), help="num_experts list (%(default)s)")
    p.add_argument("--top-k", default=_join(DEFAULT_GRID["top_k"]), help="top_k list (%(default)s)")
    p.add_argument("--hidden", default=_join(DEFAULT_GRID["hidden_size"]), help="hidden sizes H (%(default)s)")
    p.add_argument("--intermediate", default=_join(DEFAULT_GRID["intermediate_size"]),
                   help="expert intermediate sizes I (%(default)s)")
    p.add_argument("--dtype", default=_join(DEFAULT_GRID["dtypes"]), help="dtypes (%(default)s)")
    if backends:
        p.add_argument("--backends", default=_join(DEFAULT_BACKENDS), help="moelab backends (%(default)s)")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                   help="time the torch.compile'd variants too (yes: only them; default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per measurement (0.2)")
    p.add_argument("--memory-budget", default=None,
                   help="skip measurements estimated above this: bytes ('8GiB') or a fraction of the available "
                        "memory ('0.5', the default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="sweep the experts backends: table, CSV/JSON and plots")
    _add_grid_arguments(p)
    p.add_argument("--compare-transformers", action="store_true",
                   help="also time transformers' eager / batched_mm / grouped_mm on identical weights "
                        "(needs pip install -e .[hf])")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for compiled variants")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    p.add_argument("--clock", choices=["auto", "wall", "process"], default="auto",
                   help="auto: this process's CPU time for one CPU thread (steady on a shared machine), else wall")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory (faster)")
    p.add_argument("--gemm-bound", action="store_true",
                   help="also time the bare grouped GEMMs per configuration (weights streamed, and cached)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="moelab-bench", help="output folder (default ./moelab-bench)")
    p.set_defaults(func=run_bench)


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure the crossovers the 'auto' backend uses and store them")
    _add_grid_arguments(p, backends=False)
    p.set_defaults(tokens="1,4,16,64,256,1024,2048", min_run_time=0.1)
    p.add_argument("--path", default=None, help="where to store them (default: this machine's calibration file)")
    p.add_argument("--backward", choices=["no", "yes", "both"], default="no",
                   help="also calibrate calls that need gradients, timed forward + backward (yes: only them; "
                        "default %(default)s: they keep the default backward rules)")
    p.add_argument("--no-save", action="store_true", help="print the crossovers without storing them")
    p.set_defaults(func=run_calibrate)


def _compiled(choice: str) -> tuple[bool, ...]:
    """"no" / "yes" / "both" (--compile, calibrate's --backward) -> the values to sweep."""
    return {"no": (False,), "yes": (True,), "both": (False, True)}[choice]


def run_bench(args) -> int:
    try:
        table = sweep(_names(args.backends), _tokens(args.tokens), _ints(args.experts), _ints(args.top_k),
                      _ints(args.hidden), _ints(args.intermediate), _names(args.dtype), _compiled(args.compile),
                      transformers=args.compare_transformers, device=args.device, num_threads=args.threads,
                      backward=args.backward, min_run_time=args.min_run_time, memory_budget=args.memory_budget,
                      measure_memory=not args.no_memory, gemm_bound=args.gemm_bound, clock=args.clock,
                      compile_mode=args.compile_mode, seed=args.seed, progress=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # --compare-transformers without transformers: the message names the extra
        print(f"error: --compare-transformers: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    paths = io.save(table, out)
    env = table.attrs["environment"]
    print(f"moelab {env['moelab_version']}, torch {env['torch_version']}, transformers "
          f"{env['transformers_version']}, {env['num_threads']} thread(s), {env['clock']} clock, "
          f"{table['pass'].iloc[0]}")
    print(env["cpu_description"] if env["device"].startswith("cpu") else env["device_name"])
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_rows", 500):
        print("\nmedian time per call (ms); dense = the dense limit"
              + ("; x/hf = moelab time / transformers time" if args.compare_transformers else ""))
        print(io.summary(table, "median_ms").to_string(float_format=lambda v: f"{v:.4g}"))
        print("\nfraction of the dense limit (dense time / backend time)")
        print(io.summary(table, "frac_dense").to_string(float_format=lambda v: f"{v:.3f}"))
    note = bf16_note("bfloat16") if env["device"].startswith("cpu") and (table["dtype"] == "bfloat16").any() else None
    if note:  # the bfloat16 times above are this CPU's emulation
        print(f"\nnote: {note}")
    not_ok = table[table["status"] != "ok"]
    if len(not_ok):
        print(f"\n{len(not_ok)} of {len(table)} measurements not run:")
        for _, r in not_ok.iterrows():
            print(f"  {r['status']}: {io.label(r)} T={r['num_tokens']} E={r['num_experts']} k={r['top_k']} "
                  f"{r['dtype']}: {r['reason']}")
    written = [paths["csv"], paths["json"]]
    if not args.no_plots and (table["status"] == "ok").any():
        written += _write_plots(table, out)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _write_plots(table, out: Path) -> list[Path]:
    written = []
    ok = table[table["status"] == "ok"]
    for dtype in dict.fromkeys(ok["dtype"]):
        figures = {f"time_{dtype}.png": plots.plot_time(table, dtype=dtype),
                   f"memory_{dtype}.png": plots.plot_memory(table, dtype=dtype)}
        labels = set(ok[ok["dtype"] == dtype].apply(plots.label, axis=1))
        for base, target in (("eager", "grouped_mm"), ("hf:grouped_mm", "grouped_mm"), ("hf:eager", "eager"),
                             ("hf:batched_mm", "batched_mm")):
            if {base, target} <= labels:
                name = f"speedup_{target}_over_{base.replace(':', '_')}_{dtype}.png"
                figures[name] = plots.plot_speedup_map(table, base, target, dtype=dtype)
        for name, fig in figures.items():
            fig.savefig(out / name, dpi=110)
            written.append(out / name)
    return written


def run_calibrate(args) -> int:
    try:
        table = calibrate(_tokens(args.tokens), _ints(args.experts), _ints(args.top_k), _ints(args.hidden)[0],
                          _ints(args.intermediate)[0], _names(args.dtype), _compiled(args.compile),
                          backward=_compiled(args.backward), device=args.device, num_threads=args.threads,
                          min_run_time=args.min_run_time, memory_budget=args.memory_budget, save=not args.no_save,
                          path=args.path, progress=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, segments in table.rules.items():
        print(f"{key:24s} " + "  ".join(f"S<={m}: {b}" if m is not None else f"else: {b}" for m, b in segments))
    if not args.no_save:
        print(f"stored in {table.meta.get('path')}")
    return 0
