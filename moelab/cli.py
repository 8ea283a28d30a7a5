"""`python -m moelab`: the headless jobs. With no sub-command, compare the backends on a default config."""

from __future__ import annotations

import argparse
import sys

import torch

from .bench.cli import add_bench, add_calibrate
from .bench.compare import compare_backends
from .bench.env import resolve_clock
from .core.config import MoEConfig
from .core.dtypes import DTYPES
from .core.machine import cpu_description
from .models.io import package_version


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="each backend's difference to eager and its time (the default job)")
    p.add_argument("--tokens", type=int, default=128, help="T, tokens in the batch (default 128)")
    p.add_argument("--hidden", type=int, default=512, help="H, hidden size (default 512)")
    p.add_argument("--intermediate", type=int, default=256, help="I, expert intermediate size (default 256)")
    p.add_argument("--experts", type=int, default=8, help="E, number of experts (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="k, experts per token (default 2)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    try:
        config = MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_experts=args.experts,
                           top_k=args.top_k)
        table = compare_backends(config, num_tokens=args.tokens, dtype=args.dtype, seed=args.seed,
                                 num_threads=args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    clock = resolve_clock("auto", "cpu", args.threads)
    print(f"moelab {package_version()}, torch {torch.__version__}, {args.threads} thread(s), {clock} clock")
    print(cpu_description())
    print(f"SparseMoE T={args.tokens} H={args.hidden} I={args.intermediate} E={args.experts} k={args.top_k} "
          f"{args.dtype}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


SUBCOMMANDS = [_add_compare, add_bench, add_calibrate]  # each adds its sub-command to the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moelab", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["compare", *argv]  # the default job
    args = build_parser().parse_args(argv)
    return args.func(args)
