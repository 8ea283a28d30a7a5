"""The layouts issue's figures: the waste table of one balanced and one skewed routing (T=256, E=8, k=2, H=64,
I=128, float32, dropless) and the time of all five layouts on both. Prints; writes nothing.

    .venv/bin/python benchmarks/layouts_table.py
"""

import torch, pandas as pd
torch.set_num_threads(1)
pd.set_option("display.width", 250); pd.set_option("display.max_columns", 30)
from moelab import MoEConfig
from moelab.core.machine import cpu_description
from moelab.bench import layout_sweep
from moelab.layer import skewed_routing
from moelab.memory import waste_table, format_waste
big = MoEConfig(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2)
print(cpu_description())
for skew in (0.0, 1.0):
    idx, _ = skewed_routing(256, 8, 2, skew, seed=0)
    print(f"skew {skew}:"); print(format_waste(waste_table(big, idx, measure=True)).drop(columns=["CUDA graphs"]).to_string(index=False))
t = layout_sweep(big, tokens=(256,), skews=(0.0, 1.0), min_run_time=0.2)
print(t.pivot_table(index="skew", columns="backend", values="median_ms").round(3).to_string())
