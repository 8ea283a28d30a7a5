"""The experts backends' backward passes, designed rather than inherited from autograd: `torch.autograd.Function`s
the readable backend files call where plain autograd would move far more bytes than the gradients need.
Imports `moelab.core` and the rest of `moelab.backends`."""

import torch

from .pair_matmul import PairMatmul, pair_matmul


def needs_autograd(experts, hidden_states, top_k_weights) -> bool:
    """True when autograd records this call: grad mode is on and an input or an expert weight requires grad. (Not
    the module's `training` flag: an eval-mode layer can be differentiated, a training one run under no_grad.)"""
    return torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad
                                        or experts.gate_up_proj.requires_grad or experts.down_proj.requires_grad)


__all__ = ["PairMatmul", "pair_matmul", "needs_autograd"]
