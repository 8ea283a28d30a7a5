"""Forward + backward time of one experts call per backend (the figures of the training-speed issue's notes):
process CPU time, one thread, the best of 3 after a warm-up; weights as in the tests (O(1) outputs).

    .venv/bin/python benchmarks/backward_step.py T E k H I [dtype] [backends]
    .venv/bin/python benchmarks/backward_step.py 128 64 8 512 256 float32 eager,batched_mm,grouped_mm
"""

import sys
import time

import torch

import moelab
from moelab.core.machine import cpu_description

torch.set_num_threads(1)
T, E, k, H, I = (int(a) for a in sys.argv[1:6])
dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.float32
names = sys.argv[7].split(",") if len(sys.argv) > 7 else ["eager", "batched_mm", "grouped_mm"]
config = moelab.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=k, initializer_range=H ** -0.5)
experts = moelab.SparseMoE(config, seed=0).to(dtype).experts
g = torch.Generator().manual_seed(0)
x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()  # [T, H]
top_k_index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k], distinct experts
top_k_weights = torch.softmax(torch.randn(T, k, generator=g), -1).to(dtype).requires_grad_()  # [T, k]
grad_out = torch.randn(T, H, generator=g).to(dtype)


def step(name):
    experts.zero_grad(set_to_none=True)
    x.grad = top_k_weights.grad = None
    moelab.ExpertsInterface.get(name)(experts, x, top_k_index, top_k_weights).backward(grad_out)


print(cpu_description(), f"| T={T} E={E} k={k} H={H} I={I} {dtype}, one thread, process time")
for name in names:
    step(name)  # warm-up
    times = []
    for _ in range(3):
        start = time.process_time()
        step(name)
        times.append(time.process_time() - start)
    print(f"{name:14s} forward + backward {min(times) * 1e3:9.1f} ms")
