"""Max |difference| of every backend to a float64 reference, per dtype (the figures in the core issue's note).

The reference is dense and independent of moelab's backends: every expert runs on every token in float64, and a
[T, E] routing matrix (zero where an expert was not chosen) combines them.

    .venv/bin/python benchmarks/accuracy.py [--tokens 256 --hidden 256 --intermediate 512 --experts 8 --top-k 2]
"""

import argparse

import pandas as pd
import torch
import torch.nn.functional as F

import moelab


def dense_reference(x, top_k_index, top_k_weights, gate_up_proj, down_proj):
    x, gate_up_proj, down_proj = x.double(), gate_up_proj.double(), down_proj.double()
    inter = down_proj.shape[-1]
    gate_up = torch.einsum("th,eoh->teo", x, gate_up_proj)  # [T, E, 2I]: every expert on every token
    hidden = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # [T, E, I]
    outputs = torch.einsum("tei,ehi->teh", hidden, down_proj)  # [T, E, H]
    routing = torch.zeros(x.shape[0], gate_up_proj.shape[0], dtype=torch.float64)  # [T, E]
    routing.scatter_(1, top_k_index, top_k_weights.double())
    return torch.einsum("te,teh->th", routing, outputs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    args = p.parse_args()
    H, I = args.hidden, args.intermediate
    # weights of O(1/sqrt(fan_in)) keep outputs O(1), so absolute differences read as relative ones
    cfg = moelab.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=args.experts, top_k=args.top_k,
                           initializer_range=H ** -0.5)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        moe = moelab.SparseMoE(cfg, seed=0)
        with torch.no_grad():
            moe.experts.down_proj.mul_((H / I) ** 0.5)
        moe = moe.to(dtype)
        x = torch.randn(args.tokens, H, generator=torch.Generator().manual_seed(1)).to(dtype)
        routing = moe.router(x)
        ref = dense_reference(x, routing.top_k_index, routing.top_k_weights, moe.experts.gate_up_proj,
                              moe.experts.down_proj)
        for backend in ("eager", "batched_mm", "grouped_mm"):
            moe.set_experts_implementation(backend)
            with torch.no_grad():
                out = moe.experts(x, routing.top_k_index, routing.top_k_weights).double()
            rows.append({"backend": backend, "dtype": str(dtype).removeprefix("torch."),
                         "max_abs_diff": (out - ref).abs().max().item(), "max_abs_reference": ref.abs().max().item()})
    table = pd.DataFrame(rows).pivot(index="backend", columns="dtype", values="max_abs_diff")
    print(f"T={args.tokens} H={H} I={I} E={args.experts} k={args.top_k}; max |output| ~ {rows[0]['max_abs_reference']:.2f}")
    print("max |backend - float64 reference|:")
    print(table.to_string(float_format=lambda v: f"{v:.2e}"))


if __name__ == "__main__":
    main()
