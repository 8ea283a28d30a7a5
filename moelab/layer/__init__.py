"""moelab.layer: one MoE layer as modules: `TopKRouter` (scores, top-k, the expert bias, the drops), `Experts` (the
E gated MLPs as 3D parameters, dispatching to a backend by name), `SparseMoE` (router + experts + an optional shared
expert), the capacity rules (`capacity`), the router's auxiliary losses (`losses`) and made-up routings with a chosen
skew (`synthetic`). Imports `moelab.core` and `moelab.backends` only.
"""

from .capacity import drop_by_position, drop_by_probs, drop_pairs, expert_capacity
from .experts import Experts
from .losses import GlobalLoad, load_balancing_loss, router_z_loss
from .moe import SharedExpert, SparseMoE
from .router import RouterOutput, TopKRouter
from .synthetic import skewed_routing

__all__ = ["Experts", "SharedExpert", "SparseMoE", "RouterOutput", "TopKRouter", "load_balancing_loss",
           "router_z_loss", "GlobalLoad", "expert_capacity", "drop_pairs", "drop_by_position", "drop_by_probs",
           "skewed_routing"]
