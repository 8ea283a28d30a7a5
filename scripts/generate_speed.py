"""Greedy generation speed of a tiny MoEForCausalLM on each experts backend.

    .venv/bin/python scripts/generate_speed.py                       # CPU, the default tiny model
    .venv/bin/python scripts/generate_speed.py --device cuda --dtype bfloat16

For each backend: one warm-up run, then `--repeats` timed runs; the median is printed. Also checks that every
backend generated the same tokens, and shows which backend the MoE layers ran in prefill and in decode (on a
GPU, `grouped_mm` switches to `batched_mm` for decode; on CPU it stays).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import moelab


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=moelab.ExpertsInterface.names())
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model = moelab.MoEForCausalLM(moelab.MoEModelConfig(), seed=args.seed, device=args.device,
                                  dtype=getattr(torch, args.dtype))
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_length),
                           generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MoEForCausalLM: {n_params / 1e6:.2f}M params, {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, {config.moe.num_experts} experts top-{config.moe.top_k} | {args.device} "
          f"{args.dtype}, {torch.get_num_threads()} threads | batch {args.batch_size}, prompt {args.prompt_length}, "
          f"{args.max_new_tokens} new tokens, median of {args.repeats}")
    print(f"{'backend':<12} {'prefill ms':>10} {'decode tok/s':>13} {'total tok/s':>12}   backend in prefill -> decode")

    sequences = {}
    for backend in args.backends:
        model.set_experts_implementation(backend)
        model.generate(prompt, max_new_tokens=args.max_new_tokens)  # warm-up
        runs = [model.generate(prompt, max_new_tokens=args.max_new_tokens) for _ in range(args.repeats)]
        decode_tokens = args.batch_size * (args.max_new_tokens - 1)
        prefill_ms = statistics.median(r.prefill_seconds for r in runs) * 1e3
        decode_rate = statistics.median(decode_tokens / r.decode_seconds for r in runs)
        total_rate = statistics.median(r.tokens_per_second for r in runs)
        used = {stage: sorted({b for s in r.values() for b in s}) for stage, r in
                (("prefill", runs[0].stage_backends("prefill")), ("decode", runs[0].stage_backends("decode")))}
        print(f"{backend:<12} {prefill_ms:>10.2f} {decode_rate:>13.1f} {total_rate:>12.1f}   "
              f"{'/'.join(used['prefill'])} -> {'/'.join(used['decode'])}")
        sequences[backend] = runs[0].sequences

    first = next(iter(sequences.values()))
    same = all(torch.equal(s, first) for s in sequences.values())
    print(f"same tokens on every backend: {same}")
    new = first[0, args.prompt_length:].tolist()
    print(f"first sequence's new tokens: {new[:16]}{' ...' if len(new) > 16 else ''}")


if __name__ == "__main__":
    main()
