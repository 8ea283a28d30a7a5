"""Training tokens/second of every registered backend, on the training notebooks' tiny LM (the figures in the
training issue's note).

One `Trainer` run per backend and round on planted topics (2 layers, H = I = 32, a 64-token vocabulary; E and k
from the flags), one torch thread. A row's tokens/s is the median over a run's steps after the first `--skip`
(warm-up: allocator, first-call paths); rounds alternate the backends and each backend keeps its best round
(other processes on a shared machine only ever slow a round down). Prints the table with the CPU, writes
`training_throughput.csv` and `.png` into `--out`.

    .venv/bin/python benchmarks/training_throughput.py                      # E=8, k=2, 8 x 64 tokens a step
    .venv/bin/python benchmarks/training_throughput.py --experts 64 --top-k 8 --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from moelab import ExpertsInterface  # noqa: E402
from moelab.core.machine import cpu_description  # noqa: E402
from moelab.data import planted_topics  # noqa: E402
from moelab.training import Trainer, TrainingConfig, tiny_moe_lm  # noqa: E402


def run_once(backend: str, args) -> float:
    """Median tokens/s of one seeded run of `args.steps` steps, the first `args.skip` left out."""
    model = tiny_moe_lm(args.experts, args.top_k, seed=0, experts_implementation=backend)
    config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, progress=False)
    history = Trainer(model, planted_topics(4, 64, seed=0), config).train()
    return float(history["tokens_per_s"].iloc[args.skip:].median())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backends", default=None, help="comma-separated; default every registered backend")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    if args.skip >= args.steps:
        p.error(f"--skip ({args.skip}) must be below --steps ({args.steps})")
    torch.set_num_threads(args.threads)
    backends = args.backends.split(",") if args.backends else ExpertsInterface.names()
    for name in backends:
        ExpertsInterface.validate(name)

    best = {name: 0.0 for name in backends}
    for _ in range(args.rounds):
        for name in backends:
            best[name] = max(best[name], run_once(name, args))
    table = pd.DataFrame({"backend": list(best), "tokens_per_s": [round(v) for v in best.values()]})
    table["vs_fastest"] = (table["tokens_per_s"] / table["tokens_per_s"].max()).round(3)
    machine = f"{cpu_description()}, torch {torch.__version__}, {args.threads} thread(s)"
    shape = (f"E={args.experts}, k={args.top_k}, H=I=32, 2 layers, {args.batch_size}x{args.seq_len} tokens a step, "
             f"float32, fwd+bwd+AdamW")
    print(f"# training tokens/s: {shape}\n# {machine}; best of {args.rounds} rounds, median over steps "
          f"{args.skip + 1}..{args.steps}")
    print(table.to_string(index=False))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.assign(machine=machine, shape=shape).to_csv(out / "training_throughput.csv", index=False)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.barh(table["backend"], table["tokens_per_s"], color=[f"C{i}" for i in range(len(table))])
    ax.set_xlabel("training tokens / s (higher is better)")
    ax.set_title(f"{shape}\n{machine}", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "training_throughput.png", dpi=120)
    print(f"wrote {out / 'training_throughput.csv'} and {out / 'training_throughput.png'}")


if __name__ == "__main__":
    main()
