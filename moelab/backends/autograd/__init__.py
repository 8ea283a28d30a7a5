"""The experts backends' backward passes, designed rather than inherited from autograd: `torch.autograd.Function`s
the readable backend files call where plain autograd would move far more bytes than the gradients need.
Imports `moelab.core` and the rest of `moelab.backends`."""

import torch

from .pair_matmul import PairMatmul, pair_matmul


def needs_grad(*tensors) -> bool:
    """Whether autograd records this call: grad mode on and any of `tensors` requires grad. (Not the module's
    `training` flag: an eval-mode layer can be differentiated, a training one run under no_grad.) Compiled
    calls keep plain autograd: the designed backward loops over experts with one host sync, which a graph
    cannot hold."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling())


__all__ = ["PairMatmul", "pair_matmul", "needs_grad"]
