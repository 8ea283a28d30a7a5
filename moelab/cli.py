"""`python -m moelab`: the headless jobs. With no sub-command, compare the backends on a default config."""

from __future__ import annotations

import argparse
import math
import re
import sys

import torch

from .bench.cli import add_bench, add_calibrate
from .bench.compare import compare_backends
from .bench.env import resolve_clock
from .core.config import MoEConfig
from .core.dtypes import DTYPES
from .core.machine import cpu_description
from .models.io import package_version
from .parallel.bench import add_ep


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="each backend's difference to eager and its time (the default job)")
    p.add_argument("--tokens", type=int, default=128, help="T, tokens in the batch (default 128)")
    p.add_argument("--hidden", type=int, default=512, help="H, hidden size (default 512)")
    p.add_argument("--intermediate", type=int, default=256, help="I, expert intermediate size (default 256)")
    p.add_argument("--experts", type=int, default=8, help="E, number of experts (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="k, experts per token (default 2)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="seconds of timed calls per backend (default 0.2; at least 5 runs unless a call is slow)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    try:
        config = MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_experts=args.experts,
                           top_k=args.top_k)
        table = compare_backends(config, num_tokens=args.tokens, dtype=args.dtype, seed=args.seed,
                                 num_threads=args.threads, min_run_time=args.min_run_time)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    clock = resolve_clock("auto", "cpu", args.threads)
    print(f"moelab {package_version()}, torch {torch.__version__}, {args.threads} thread(s), {clock} clock")
    print(cpu_description())
    print(f"SparseMoE T={args.tokens} H={args.hidden} I={args.intermediate} E={args.experts} k={args.top_k} "
          f"{args.dtype}")
    shown = table.drop(columns="skipped")
    few = shown["runs"].between(1, MIN_RUNS_FOR_IQR - 1)
    # NOTE: an IQR of one or two timed calls is 0 or a difference, not a spread: shown as n/a, and said why
    shown["iqr_ms"] = shown["iqr_ms"].where(~few)
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="n/a"))
    for name, runs in zip(shown["backend"][few], shown["runs"][few]):
        print(f"{name}: {runs} timed run(s), too few for an IQR (each call is slow here; --min-run-time "
              f"{args.min_run_time} buys more)")
    for name, why in zip(table["backend"], table["skipped"]):
        if why:  # the memory guard refused it before it allocated (its message says what would fit)
            print(f"skipped {name}: {why}")
    if table.attrs.get("bf16_note"):  # the times above are this CPU's emulation of bfloat16
        print(f"note: {table.attrs['bf16_note']}")
    return 0


MIN_RUNS_FOR_IQR = 4  # the interquartile range of fewer timed runs is no spread
SUBCOMMANDS = [_add_compare, add_bench, add_calibrate, add_ep]  # each adds its sub-command to the parser


def _device_problem(text: str) -> str | None:
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as err:
        return f"--device {text!r} is not a torch device ({err})"
    if device.type == "meta":
        return "--device meta holds no data to time; use cpu, or cuda on a machine with a GPU"
    try:  # NOTE: the one check that holds for every device type: can it hold a tensor here?
        torch.empty(0, device=device)
    except Exception as err:  # AssertionError (torch without CUDA), RuntimeError (no such device), ...
        return f"--device {text} is not available on this machine ({type(err).__name__}: {err})"
    return None


def _memory_budget_problem(text: str) -> str | None:
    # NOTE: the guard reads '0.5' as a fraction and '2.0' as 2 bytes (it reads a unitless number > 1 as bytes),
    # which skips every measurement; a point without a unit means a fraction, so ask which was meant
    match = re.fullmatch(r"\s*([0-9]*\.[0-9]+)\s*", text)
    if match and float(match.group(1)) > 1:
        return (f"--memory-budget {text} is ambiguous: a number with a point and no unit is a fraction of the "
                f"available memory, in (0, 1]; for bytes give a unit ('{match.group(1).removesuffix('.0')}GiB', "
                f"'{match.group(1).removesuffix('.0')}GB') or an integer")
    return None


def check_bench_flags(args) -> str | None:
    """What is wrong with the flags `bench` and `calibrate` share (`--device`, `--min-run-time`,
    `--memory-budget`), said before the job starts; None when they are fine."""
    if getattr(args, "min_run_time", None) is not None and (not math.isfinite(args.min_run_time)
                                                            or args.min_run_time <= 0):
        return f"--min-run-time must be a finite number of seconds > 0, got {args.min_run_time}"
    if getattr(args, "memory_budget", None) is not None:
        problem = _memory_budget_problem(args.memory_budget)
        if problem:
            return problem
    if getattr(args, "device", None) is not None:
        return _device_problem(args.device)
    return None


EPILOG = ("With no sub-command (or options only, e.g. `python -m moelab --tokens 1024`) it runs `compare` on "
          "T=128 tokens, H=512, I=256, E=8 experts, k=2, float32, one thread; `python -m moelab compare --help` "
          "lists its options (--tokens, --hidden, --intermediate, --experts, --top-k, --dtype, --threads, "
          "--min-run-time, --seed).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moelab", description=__doc__, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["compare", *argv]  # the default job
    args = build_parser().parse_args(argv)
    problem = check_bench_flags(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return args.func(args)
