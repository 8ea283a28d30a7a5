"""The reference page's GPU claims, measured on a CUDA device: one short prepared script (a few minutes).

    python benchmarks/gpu.py                 # measure on cuda:0, save docs/bench/gpu/*, then
    python benchmarks/run_benchmarks.py --reuse   # write them into BENCHMARKS.md (section 9)

It checks, forward and forward + backward, on a grid that spans decode (T = 1..16) and prefill (T = 256..4096):
- `batched_mm` is the fastest backend for small inputs (the decode stage) and loses to `grouped_mm` at large T;
- the gain of the decode switch (`generate(..., decode_backends=...)` picks `batched_mm` for decode steps);
- the compiled variants (inductor) against the uncompiled ones.
Without a CUDA device it says so and exits 2: nothing here runs on a CPU, and CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moelab  # noqa: E402
from moelab import bench  # noqa: E402

OUT = ROOT / "docs" / "bench" / "gpu"
GRID = dict(tokens=(1, 4, 16, 256, 1024, 4096), num_experts=(8, 64), top_k=(2, 8), hidden_size=1024,
            intermediate_size=512, dtypes=("bfloat16",))


def decode_switch_gain(device: str, new_tokens: int = 32) -> dict:
    """Seconds of one `generate` with and without the decode switch, same prompt and weights (greedy)."""
    model = moelab.MoEForCausalLM(moelab.MoEModelConfig(num_hidden_layers=4), seed=0,
                                  experts_implementation="grouped_mm").to(device)
    prompt = torch.randint(0, model.config.vocab_size, (8, 64), device=device)
    times = {}
    for name, policy in (("grouped_mm throughout", {}), ("decode switch", moelab.decode_backends(device))):
        model.generate(prompt, max_new_tokens=2, decode_backends=policy)  # warm-up
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, decode_backends=policy)
        torch.cuda.synchronize(device)
        times[name] = time.perf_counter() - started
        times[f"{name} tokens"] = out.sequences[:, -new_tokens:].tolist()
    times["same tokens"] = times.pop("grouped_mm throughout tokens") == times.pop("decode switch tokens")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: benchmarks/gpu.py measures GPU claims only, on a machine with one",
              file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    common = dict(device=args.device, min_run_time=args.min_run_time, measure_memory=False, progress=True,
                  compiled=(False,) if args.no_compile else (False, True), **GRID)
    for name, backward in (("forward", False), ("backward", True)):
        started = time.time()
        table = bench.sweep(("eager", "batched_mm", "grouped_mm", "auto"), backward=backward, **common)
        table.attrs["environment"]["elapsed_s"] = time.time() - started
        bench.save(table, OUT / name)
        print(f"saved {OUT / name}")
    gain = decode_switch_gain(args.device)
    (OUT / "decode_switch.json").write_text(json.dumps(gain, indent=1))
    print(json.dumps(gain, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
