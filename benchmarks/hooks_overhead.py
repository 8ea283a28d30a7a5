"""What the inspection hooks cost when no inspection is active.

Builds hook-free copies of the three backends and of `SparseMoE.forward` (their source with every
`record_step(...)` statement removed, compiled again in the original module's namespace, so nothing else
changes), checks they give the same output, then times a forward of each variant at T=16 and T=512 with
`torch.utils.benchmark`, one thread, under `torch.no_grad()`. Batches of ~50 ms alternate between the variants;
each variant's time is its fastest batch (other processes on a shared machine only ever add time). `--control`
adds a second hook-free copy: its difference to the first is the measurement's noise floor.

    .venv/bin/python benchmarks/hooks_overhead.py                  # T=16 and T=512, all three backends
    .venv/bin/python benchmarks/hooks_overhead.py --tokens 16 --repeats 80 --backends grouped_mm --control

Overhead % = (hooked - hook-free) / hook-free * 100; within noise it can come out negative.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect as pyinspect
import textwrap
import types

import torch
import torch.utils.benchmark as benchmark

import moelab
from moelab import ExpertsInterface, SparseMoE
from moelab.backends.cpu import lean

BACKEND_MODULES = {"eager": ("moelab.backends.eager", "eager_experts"),
                   "batched_mm": ("moelab.backends.batched_mm", "batched_mm_experts"),
                   "grouped_mm": ("moelab.backends.grouped_mm", "grouped_mm_experts")}


class _StripRecordStep(ast.NodeTransformer):
    """Replace every statement `record_step(...)` by `pass`."""

    removed = 0

    def visit_Expr(self, node):
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "record_step":
            self.removed += 1
            return ast.copy_location(ast.Pass(), node)
        return node


def without_hooks(fn, overrides: dict | None = None):
    """A copy of function `fn` with its `record_step(...)` statements removed; returns (copy, how many).
    `overrides`: names of `fn`'s module namespace to replace in the copy's (e.g. a hook-free callee)."""
    tree = ast.parse(textwrap.dedent(pyinspect.getsource(fn)))
    stripper = _StripRecordStep()
    tree = ast.fix_missing_locations(stripper.visit(tree))
    namespace = dict(fn.__globals__) | (overrides or {})
    exec(compile(tree, f"<{fn.__qualname__} without record_step>", "exec"), namespace)  # noqa: S102
    return namespace[fn.__name__], stripper.removed


def hook_free_variants() -> tuple[type, dict[str, str]]:
    """Register `<backend>__nohooks` backends and return (SparseMoE subclass without hooks, name map)."""
    names = {}
    # NOTE: grouped_mm dispatches CPU inference to its fast path (moelab.backends.cpu.lean), which records its
    # own steps: the hook-free grouped_mm calls a hook-free copy of it, through the same dispatch.
    lean_free, removed = without_hooks(lean.lean_grouped_mm)
    assert removed >= 2, f"lean_grouped_mm: expected record_step calls to remove, found {removed}"
    overrides = {"grouped_mm": {"lean": types.SimpleNamespace(applies=lean.applies, lean_grouped_mm=lean_free)}}
    for backend, (module_name, fn_name) in BACKEND_MODULES.items():
        fn = getattr(importlib.import_module(module_name), fn_name)
        stripped, removed = without_hooks(fn, overrides.get(backend))
        assert removed >= 2, f"{fn_name}: expected record_step calls to remove, found {removed}"
        ExpertsInterface.register(f"{backend}__nohooks", stripped, overwrite=True)
        names[backend] = f"{backend}__nohooks"
    forward, removed = without_hooks(SparseMoE.forward)
    assert removed >= 1, "SparseMoE.forward should emit the route step"
    plain_moe = type("SparseMoEWithoutHooks", (SparseMoE,), {"forward": forward})
    return plain_moe, names


def compare(variants: dict, x, repeats: int, batch_time: float) -> dict[str, float]:
    """Seconds per forward of each variant: the minimum over `repeats` interleaved batches of ~`batch_time` s.

    NOTE: on a shared machine other processes only ever add time, so the minimum of many short batches,
    taken in alternating order, estimates the undisturbed cost better than one long median.
    """
    timers = {name: benchmark.Timer(stmt="moe(x)", globals={"moe": moe, "x": x}, num_threads=1)
              for name, moe in variants.items()}
    first = next(iter(timers.values())).blocked_autorange(min_run_time=batch_time)
    number = max(1, int(batch_time / first.median))
    best = {name: float("inf") for name in timers}
    names = list(timers)
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            best[name] = min(best[name], timers[name].timeit(number).mean)
    return best


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--backends", nargs="+", default=list(BACKEND_MODULES), choices=list(BACKEND_MODULES))
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40, help="interleaved batches per variant")
    parser.add_argument("--batch-time", type=float, default=0.05, help="seconds per batch")
    parser.add_argument("--control", action="store_true",
                        help="also time the hook-free variant against a second hook-free copy (A/A: the noise floor)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    config = moelab.MoEConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                              num_experts=args.num_experts, top_k=args.top_k)
    plain_moe, names = hook_free_variants()
    print(f"torch {torch.__version__}, 1 thread; H={config.hidden_size}, I={config.intermediate_size}, "
          f"E={config.num_experts}, k={config.top_k}, float32; min over {args.repeats} interleaved batches "
          f"of ~{args.batch_time * 1e3:.0f} ms")
    print(f"{'backend':<11} {'T':>5} {'hooked (us)':>12} {'hook-free (us)':>15} {'overhead':>9}"
          + (f" {'A/A control':>12}" if args.control else ""))
    results = []
    try:
        for backend in args.backends:
            hooked = SparseMoE(config, backend, seed=0)
            plain = plain_moe(config, names[backend], seed=0)
            for tokens in args.tokens:
                x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
                with torch.no_grad():
                    torch.testing.assert_close(plain(x), hooked(x), rtol=0, atol=0)
                    variants = {"hooked": hooked, "plain": plain}
                    if args.control:
                        variants["plain_again"] = plain_moe(config, names[backend], seed=0)
                    best = compare(variants, x, args.repeats, args.batch_time)
                overhead = (best["hooked"] - best["plain"]) / best["plain"] * 100
                row = {"backend": backend, "tokens": tokens, "hooked_s": best["hooked"],
                       "hook_free_s": best["plain"], "overhead_pct": overhead}
                line = (f"{backend:<11} {tokens:>5} {best['hooked'] * 1e6:>12.1f} {best['plain'] * 1e6:>15.1f} "
                        f"{overhead:>+8.2f}%")
                if args.control:
                    row["control_pct"] = (best["plain_again"] - best["plain"]) / best["plain"] * 100
                    line += f" {row['control_pct']:>+11.2f}%"
                results.append(row)
                print(line, flush=True)
    finally:
        for name in names.values():
            ExpertsInterface.unregister(name)
    return results


if __name__ == "__main__":
    main()
