import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import reference.py

import moelab  # noqa: E402

BACKENDS = ("eager", "batched_mm", "grouped_mm")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_moe(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2, dtype=torch.float32,
             backend="grouped_mm", seed=0, **kw):
    """A layer whose weights are O(1/sqrt(fan_in)), so outputs are O(1) and tolerances mean something."""
    cfg = moelab.MoEConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_experts=num_experts,
                           top_k=top_k, initializer_range=hidden_size ** -0.5, **kw)
    moe = moelab.SparseMoE(cfg, experts_implementation=backend, seed=seed)
    with torch.no_grad():
        moe.experts.down_proj.mul_(hidden_size ** 0.5 * intermediate_size ** -0.5)
    return moe.to(dtype)
