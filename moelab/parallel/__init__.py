"""moelab.parallel: expert parallelism on `torch.distributed` (gloo on CPU, NCCL on GPUs).

An MoE layer's experts sharded over the ranks of a process group, each token sent to the rank of its experts and
back with two uneven all-to-alls per layer (torchtitan's ExpertParallel, Megatron-Core's AlltoAll dispatcher,
DeepSpeed-MoE). One idea a module: `steps` (counting and the permutations, pure functions), `all_to_all` (the
differentiable exchange), `layer` (`ExpertParallelMoE`, `expert_parallel`), `launch` (N ranks from a notebook,
or torchrun) and `checks` (the exactness checks each rank runs). Imports `moelab.layer`, `moelab.backends`,
`moelab.core` and, in `checks`, `moelab.models`. Dimension letters: T tokens (of one rank), k top-k, E experts,
H hidden, I intermediate, S = T * k pairs, ep ranks, L = E / ep experts per rank, N rows a rank receives.
"""

from .all_to_all import AllToAll, all_to_all, exchange_counts
from .launch import RankError, free_port, init_process_group_from_env, run_ranks
from .layer import ExpertParallelMoE, expert_parallel
from .steps import (expert_major_perm, inverse_perm, local_expert_ids, rank_major_perm, send_counts,
                    tokens_per_expert, unpermute_weigh_sum)

__all__ = ["ExpertParallelMoE", "expert_parallel", "run_ranks", "init_process_group_from_env", "RankError",
           "free_port", "AllToAll", "all_to_all", "exchange_counts", "tokens_per_expert", "send_counts",
           "rank_major_perm", "expert_major_perm", "local_expert_ids", "inverse_perm", "unpermute_weigh_sum"]

# watching the ranks (`watch`, `plots`), the model at scale (`scale`) and the benchmark of `python -m moelab ep`
from .bench import time_ep
from .plots import plot_send_matrix, plot_timeline
from .scale import (PRESETS, EPPreset, bytes_per_token, exchange_bytes, flops_per_pair, imbalance_from_counts,
                    layer_cost, preset_cost, scale_table, send_matrix_from_routing)
from .watch import EPWatch, trace_ranks

__all__ += ["trace_ranks", "EPWatch", "plot_send_matrix", "plot_timeline", "PRESETS", "EPPreset", "layer_cost",
            "preset_cost", "scale_table", "bytes_per_token", "flops_per_pair", "imbalance_from_counts",
            "send_matrix_from_routing", "exchange_bytes", "time_ep"]

# training under expert parallelism (moelab.parallel.training) and its torchrun entry point (moelab.parallel.train)
from .training import (ExpertParallelTrainer, all_reduce_gradients, clip_grad_norm_global, expert_parallel_loss,
                       gather_full_model, global_layer_stats, global_lm_loss, global_router_losses,
                       replicated_parameters, save_expert_parallel, sharded_parameters)

__all__ += ["ExpertParallelTrainer", "sharded_parameters", "replicated_parameters", "expert_parallel_loss",
            "global_lm_loss", "global_router_losses", "all_reduce_gradients", "clip_grad_norm_global",
            "global_layer_stats", "gather_full_model", "save_expert_parallel"]
