"""Training under expert parallelism: `ExpertParallelTrainer`, the globally normalised losses, the gradient
all-reduce and global-norm clipping, and saving a sharded model as one single-process folder.

On ep ranks, one optimizer step equals one step of the single-process `Trainer` on the global batch (every rank's
sequences concatenated), dropless, up to rounding:

- data: every rank draws the step's global micro-batch [B, S] as `Trainer` does (same seeds) and keeps its rows,
  `torch.tensor_split(batch, ep)[rank]` (rank r gets about B / ep sequences; B >= ep).
- the LM loss: cross-entropy summed over this rank's targets (labels != -100), divided by the all-reduced count
  of every rank's targets. Summed over the ranks these are the single-process mean on the global batch, so the
  gradients are too, and a rank with no target adds 0 (not 0 / 0 = NaN).
- the router losses: the balancing loss's f (pairs per expert) from counts all-reduced over the ranks (this
  micro-batch for the "batch" scope, the step's micro-batches so far for "global"), its P and the z-loss from this
  rank's tokens, each weighed by this rank's share of the tokens (of the sequences for the "sequence" scope), so
  they too sum to the single-process losses.
- gradients: the sharded expert weights already hold the gradient of every rank's tokens routed to them (the
  all-to-all's backward brings it); the replicated parameters (router, shared expert, attention, embeddings, norms,
  LM head) hold their rank's share and are summed over the ranks (all_reduce), as in data parallel, with no
  division since the loss is already global. AdamW then makes the same update of them on every rank.
- clipping: the global norm, sqrt(sum over ranks of the sharded squared norms + the replicated squared norm
  counted once).
- the expert-bias update and the history's routing columns: counts summed over the ranks, so the replicated
  routers never drift apart.

What does not match the single-process run: router jitter (each rank draws the noise of its own rows) and
capacity drops (each rank drops on its own tokens, as Megatron and DeepSpeed do). Checkpoints with optimizer
state are not written under EP; `save_expert_parallel` writes the model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..layer import GlobalLoad
from ..layer.losses import SCOPES, load_balancing_loss, router_z_loss
from ..layer.moe import SparseMoE
from ..models import MoEForCausalLM
from ..models.causal_lm import IGNORE_INDEX, CausalLMOutput, check_labels
from ..training import Trainer, TrainingConfig
from ..training.analysis import max_mean_load
from ..training.history import layer_stats
from .layer import ExpertParallelMoE, expert_parallel, group_rank_and_size


# ------------------------------------------------------------------------------------------- which is which

def _ep_layers(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ExpertParallelMoE)}


def sharded_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every weight split over the ranks: each `ExpertParallelMoE`'s local experts
    (`.experts.gate_up_proj [L, 2I, H]`, `.experts.down_proj [L, H, I]`), this rank's slice of them."""
    mine = {id(param) for layer in _ep_layers(model).values() for param in layer.experts.parameters()}
    return {name: param for name, param in model.named_parameters() if id(param) in mine}


def replicated_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every weight each rank holds whole (router, shared expert, attention, embeddings,
    norms, LM head): the parameters not in `sharded_parameters`."""
    sharded = set(sharded_parameters(model))
    return {name: param for name, param in model.named_parameters() if name not in sharded}


def model_group(model: nn.Module):
    """The process group of `model`'s `ExpertParallelMoE` layers (None: the default group); a ValueError when it
    has none, or when its layers use different groups."""
    layers = _ep_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no ExpertParallelMoE layer; make it expert-parallel "
                         f"first with moelab.parallel.expert_parallel(model, group)")
    groups = {id(layer.group): layer.group for layer in layers.values()}
    if len(groups) > 1:
        raise ValueError("model's ExpertParallelMoE layers use different process groups; one model, one group")
    return next(iter(groups.values()))


# ------------------------------------------------------------------------------------------------- the losses

def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def global_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's share of the next-token loss of the global batch: cross-entropy summed over its targets
    (labels[:, 1:] != -100), divided by the number of targets of every rank (all-reduced). Summed over the ranks it
    is `causal_lm_loss` on every rank's sequences concatenated; a rank with no target gives 0 (and gradient 0).

    logits [B, N, V], labels [B, N]. Every rank of `group` must call it (one all_reduce). A global batch with no
    target at all is a ValueError on every rank.
    """
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape {list(logits.shape[:2])}, got {got}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    targets = labels[:, 1:]  # [B, N - 1]: position t predicts t + 1
    count = (targets != IGNORE_INDEX).sum()
    if count:  # NOTE: check_labels refuses a batch with nothing to predict, which one rank may rightly have here
        check_labels(labels, logits)
    total = _all_reduce(count.to(torch.float64).reshape(1), group)  # [1]
    if not total.item():
        raise ValueError(f"labels leave nothing to predict on any rank: every label after the first position is "
                         f"{IGNORE_INDEX} (ignored) on every rank")
    # NOTE: in float32, as causal_lm_loss computes it, so the two runs round alike
    summed = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten().long(),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / total.to(summed.dtype).squeeze(0)


def global_router_losses(router_outputs, scope: str, batch_size: int, group=None,
                         global_load: GlobalLoad | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of (aux_loss, z_loss) of the global batch, each summed over the layers, as
    `moelab.models.aux_losses.router_losses` computes them on one process (see the module docstring).

    router_outputs: each layer's `RouterOutput` of this rank's B = `batch_size` sequences (T = B * S tokens).
    scope "batch": f from this micro-batch's pairs per expert, summed over the ranks; "global": from the step's
    micro-batches so far, summed over the ranks, kept in `global_load` (a fresh one counts this call only);
    "sequence": per sequence, so nothing to share but the number of sequences. One all_reduce.
    """
    if not router_outputs:
        raise ValueError("global_router_losses needs the RouterOutput of at least one MoE layer")
    if scope not in SCOPES:  # before the collective: every rank raises alike
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    tokens = router_outputs[0].router_probs.shape[0]
    counts = [torch.bincount(r.top_k_index.reshape(-1), minlength=r.router_probs.shape[-1]) for r in router_outputs]
    device = router_outputs[0].router_probs.device
    mine = torch.cat([torch.tensor([tokens, batch_size], dtype=torch.float64, device=device),
                      *(c.to(torch.float64) for c in counts)])
    everyone = _all_reduce(mine, group)
    global_tokens, global_sequences = everyone[0].item(), everyone[1].item()
    global_counts = everyone[2:].split([c.numel() for c in counts])  # each [E], pairs chosen on every rank
    token_share = tokens / global_tokens  # this rank's tokens out of the global batch's
    if scope == "global" and global_load is None:
        global_load = GlobalLoad()
    aux_terms, z_terms = [], []
    for layer, (routing, layer_counts) in enumerate(zip(router_outputs, global_counts)):
        if scope == "sequence":
            aux = load_balancing_loss(routing, scope="sequence", batch_size=batch_size) \
                * (batch_size / global_sequences)
        else:
            if scope == "global":  # the running count over the step's micro-batches, as GlobalLoad.add keeps it
                previous = global_load.tokens_per_expert.get(layer)
                if previous is not None:
                    layer_counts = layer_counts + previous.to(layer_counts)
                global_load.tokens_per_expert[layer] = layer_counts
            # f from the global counts, P the mean over this rank's tokens: times its share, P's global mean
            aux = load_balancing_loss(routing, scope="global", tokens_per_expert=layer_counts) * token_share
        aux_terms.append(aux)
        z_terms.append(router_z_loss(routing.router_logits) * token_share)
    return torch.stack(aux_terms).sum(), torch.stack(z_terms).sum()


def expert_parallel_loss(model: MoEForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                         global_load: GlobalLoad | None = None) -> CausalLMOutput:
    """The forward of this rank's sequences input_ids [B, S] through an expert-parallel `model`, with this rank's
    share of every loss (`global_lm_loss`, `global_router_losses`; labels default to input_ids), weighed into
    `loss` as `MoEForCausalLM` weighs them. Summed over the ranks, `loss` is the single-process loss on the global
    batch, so `loss.backward()` on every rank, then `all_reduce_gradients`, gives its gradients.
    """
    group = model_group(model)
    labels = input_ids if labels is None else labels
    # NOTE: no labels here: the model would take the mean over this rank's tokens only. (It still computes its
    # own per-rank router losses, unused; a few small reductions.)
    out = model(input_ids, output_router_logits=True)
    config = model.config
    lm_loss = global_lm_loss(out.logits, labels, group)
    aux_loss, z_loss = global_router_losses(out.router_outputs, config.router_aux_loss_scope, input_ids.shape[0],
                                            group, global_load)
    loss = lm_loss
    if config.router_aux_loss_coef:  # as model_output: a 0 coefficient adds nothing
        loss = loss + config.router_aux_loss_coef * aux_loss
    if config.router_z_loss_coef:
        loss = loss + config.router_z_loss_coef * z_loss
    return CausalLMOutput(out.logits, None, loss, aux_loss, z_loss, out.router_outputs, lm_loss)


# -------------------------------------------------------------------------------------------- the gradients

@torch.no_grad()
def all_reduce_gradients(model: nn.Module) -> None:
    """Sum the gradients of the replicated parameters over the ranks (one all_reduce per dtype and device); the
    sharded ones are left as they are. A parameter no rank has a gradient for keeps `grad = None`, so the optimizer
    skips it, as on one process."""
    group = model_group(model)
    params = [p for p in replicated_parameters(model).values() if p.requires_grad]  # same order on every rank
    kinds: dict[tuple, list[nn.Parameter]] = {}
    for param in params:
        kinds.setdefault((param.dtype, param.device), []).append(param)
    for (dtype, device), group_params in kinds.items():
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group_params]
        has_grad = torch.tensor([p.grad is not None for p in group_params], dtype=dtype, device=device)
        flat = _all_reduce(torch.cat([*(g.reshape(-1) for g in grads), has_grad]), group)
        *chunks, ranks_with_grad = flat.split([*(g.numel() for g in grads), len(group_params)])
        for param, chunk, count in zip(group_params, chunks, ranks_with_grad.tolist()):
            if not count:
                continue
            if param.grad is None:
                param.grad = chunk.view_as(param).clone()
            else:
                param.grad.copy_(chunk.view_as(param))


@torch.no_grad()
def clip_grad_norm_global(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip every gradient by the global norm, as `torch.nn.utils.clip_grad_norm_` would on the whole model;
    returns that norm (float64, before clipping). Call after `all_reduce_gradients`, on every rank.

    The norm: sqrt(sum over ranks of the sharded parameters' squared norms + the replicated ones' counted once,
    since every rank holds the same replicated gradients). Scale: max_norm / (norm + 1e-6), at most 1 (torch's).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a positive number (math.inf: measure, never clip), got {max_norm!r}")
    group = model_group(model)
    sharded = [p.grad for p in sharded_parameters(model).values() if p.grad is not None]
    replicated = [p.grad for p in replicated_parameters(model).values() if p.grad is not None]
    device = next(model.parameters()).device

    def squared(grads):
        return sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64, device=device))

    norm = (_all_reduce(squared(sharded).reshape(1), group).squeeze(0) + squared(replicated)).sqrt()
    if not math.isinf(max_norm):
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in sharded + replicated:
            grad.mul_(scale.to(grad.dtype))
    return norm


# ---------------------------------------------------------------------------------------------- the history

def global_layer_stats(routing: list[list], group=None) -> list[dict]:
    """`moelab.training.history.layer_stats` of each layer over every rank's tokens of the step (one all_reduce):
    the pairs per expert summed, the drop rate and router entropy over all tokens."""
    local = layer_stats(routing)
    parts = []
    for outputs, stat in zip(routing, local):
        tokens = sum(o.router_probs.shape[0] for o in outputs)
        pairs = sum(o.top_k_index.numel() for o in outputs)
        entropy_sum = stat["router_entropy"] * tokens if tokens else 0.0
        parts.append(torch.cat([stat["tokens_per_expert"].to(torch.float64),
                                torch.tensor([tokens, pairs, entropy_sum], dtype=torch.float64)]))
    device = routing[0][0].router_probs.device
    everyone = _all_reduce(torch.cat(parts).to(device), group).cpu().split([p.numel() for p in parts])
    stats = []
    for summed in everyone:
        tokens_per_expert = summed[:-3].round().long()  # [E], exact: counts far below 2**53
        tokens, pairs, entropy_sum = summed[-3:].tolist()
        kept = int(tokens_per_expert.sum())
        stats.append({"tokens_per_expert": tokens_per_expert, "max_mean_load": max_mean_load(tokens_per_expert),
                      "drop_rate": 1.0 - kept / pairs if pairs else 0.0,
                      "router_entropy": entropy_sum / tokens if tokens else math.nan})
    return stats


# ------------------------------------------------------------------------------------------------ the trainer

class ExpertParallelTrainer(Trainer):
    """`Trainer` on every rank of `group`, the model's experts sharded over them; `train()` on every rank.

    `model` is a `MoEForCausalLM` with the same weights on every rank (same seed; checked), already expert-parallel
    over `group` or made so here (in place). `config.batch_size` is the global micro-batch, split over the ranks
    by rows (at least one sequence a rank). Every rank's history is the same: the single-process history of the
    global batch (losses, gradient norm, loads, biases; see the module docstring for what differs).
    NOTE: every rank must make the same calls (train, evaluate) in the same order; a `callback` sees the same row
    on every rank and must decide alike, or the ranks part and a collective fails after the group's timeout.
    """

    def __init__(self, model: MoEForCausalLM, dataset, config: TrainingConfig | None = None, *, group=None,
                 callback=None):
        if not isinstance(model, MoEForCausalLM):
            raise ValueError(f"model must be a moelab.MoEForCausalLM, got {type(model).__name__}")
        rank, ep = group_rank_and_size(group)
        config = TrainingConfig() if config is None else config
        # checked before any collective, the same way on every rank, so all of them raise and none waits
        if not isinstance(config, TrainingConfig):
            raise ValueError(f"config must be a moelab.training.TrainingConfig, got {type(config).__name__}")
        if config.batch_size < ep:
            raise ValueError(f"config.batch_size = {config.batch_size} is the global micro-batch, split over "
                             f"ep = {ep} ranks by sequences: it must be at least ep")
        if config.checkpoint_every:
            raise ValueError("config.checkpoint_every must be 0 under expert parallelism: checkpoints with "
                             "optimizer state are not written for sharded experts; save the model with "
                             "moelab.parallel.save_expert_parallel")
        if not _ep_layers(model):
            expert_parallel(model, group)
        elif model_group(model) is not group:
            raise ValueError("model is expert-parallel over another process group than `group`")
        super().__init__(model, dataset, config, callback=callback)
        self.group, self.ep_rank, self.ep_size = group, rank, ep
        _check_replicated_agree(model, group)

    def _rows_of_this_rank(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows [B_r, S] of a global batch [B, S] this rank trains on."""
        return torch.tensor_split(input_ids, self.ep_size)[self.ep_rank]

    def _micro_batch(self, step: int, micro: int) -> torch.Tensor:
        return self._rows_of_this_rank(super()._micro_batch(step, micro))

    def _forward(self, input_ids: torch.Tensor, global_load: GlobalLoad | None):
        return expert_parallel_loss(self.model, input_ids, global_load=global_load)

    def _finish_gradients(self, max_norm: float) -> torch.Tensor:
        all_reduce_gradients(self.model)
        return clip_grad_norm_global(self.model, max_norm)

    def _step_summary(self, losses: dict[str, list], routing: list[list]) -> tuple[dict, list[dict]]:
        means, _ = super()._step_summary(losses, routing)
        names = [name for name, value in means.items() if value is not None]  # the same on every rank
        if names:  # each rank's share, summed: the global batch's loss
            summed = _all_reduce(torch.stack([means[name].double() for name in names]), self.group)
            means.update(zip(names, summed.unbind()))
        return means, global_layer_stats(routing, self.group)

    def _validation_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows_of_this_rank(input_ids)
        share = global_lm_loss(self.model(rows).logits, rows, self.group)
        return _all_reduce(share.double().reshape(1), self.group).squeeze(0)

    def save_checkpoint(self, directory):
        raise NotImplementedError("checkpoints with optimizer state are not written under expert parallelism; "
                                  "save the model with moelab.parallel.save_expert_parallel(model, path)")

    def load_checkpoint(self, directory):
        raise NotImplementedError("loading a Trainer checkpoint into an ExpertParallelTrainer is not supported; "
                                  "load a single-process model and make it expert-parallel")

    @classmethod
    def resume(cls, *args, **kwargs):
        raise NotImplementedError("ExpertParallelTrainer cannot resume a checkpoint; build the model from a saved "
                                  "folder (from_pretrained), make it expert-parallel, and train it")


@torch.no_grad()
def _check_replicated_agree(model: nn.Module, group) -> None:
    """One all_gather of the replicated weights' sums: ranks built with different seeds are a ValueError on all."""
    params = list(replicated_parameters(model).values())
    mine = torch.stack([sum(p.double().sum() for p in params), sum(p.double().abs().sum() for p in params)])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    everyone = torch.stack(everyone).cpu()  # [ep, 2]
    if not torch.isclose(everyone, everyone[0:1], rtol=1e-9, atol=0.0).all():
        raise ValueError(f"the ranks hold different replicated weights (attention, embeddings, ...): build the "
                         f"model the same way on every rank (the same seed); per rank sums {everyone.tolist()}")


# ------------------------------------------------------------------------------------------------- saving

@torch.no_grad()
def gather_full_model(model: nn.Module, dst: int | None = None) -> nn.Module | None:
    """The single-process model an expert-parallel `model` shards: every `ExpertParallelMoE` back as a full
    `SparseMoE` (each rank's experts gathered, in rank order), everything else copied. Every rank must call it.

    dst: None gives the full model on every rank (all_gather); a rank of the group gives it on that rank only
    (gather; the others get None and hold no full copy). `model` itself is left expert-parallel.
    """
    group = model_group(model)
    rank, ep = group_rank_and_size(group)
    if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < ep):
        raise ValueError(f"dst must be None (every rank) or a rank of the group, 0 <= dst < {ep}, got {dst!r}")
    receives = dst is None or rank == dst
    layers = _ep_layers(model)
    full_experts = {}  # layer name -> {"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}
    for name, layer in layers.items():  # the same order on every rank: the collectives line up
        full_experts[name] = {}
        for weight_name, shard in layer.experts.named_parameters():
            shard = shard.detach().contiguous()  # [L, ...]
            pieces = [torch.empty_like(shard) for _ in range(ep)] if receives else None
            if dst is None:
                dist.all_gather(pieces, shard, group=group)
            else:
                dist.gather(shard, pieces, group=group, group_dst=dst)
            if receives:
                full_experts[name][weight_name] = torch.cat(pieces)  # [E, ...], rank r's block at r * L
    if not receives:
        return None
    # NOTE: the process groups are shared, not copied (a ProcessGroup cannot be deep-copied)
    full = copy.deepcopy(model, memo={id(layer.group): layer.group for layer in layers.values()})
    full.zero_grad(set_to_none=True)  # the copy is a fresh model: this rank's gradients are not its own
    for name, layer in layers.items():
        weight = layer.experts.gate_up_proj
        moe = SparseMoE(layer.config, layer.get_experts_implementation(), dtype=weight.dtype, device=weight.device,
                        seed=0)  # seeded: its throwaway init must not draw from the global RNG
        state = {key: value for key, value in layer.state_dict().items() if not key.startswith("experts.")}
        state.update({f"experts.{key}": value for key, value in full_experts[name].items()})
        moe.load_state_dict(state)
        for key, param in moe.named_parameters():
            param.requires_grad_(layer.get_parameter(key).requires_grad)
        moe.train(layer.training)
        parent_name, _, attribute = name.rpartition(".")
        setattr(full.get_submodule(parent_name) if parent_name else full, attribute, moe)
    return full


def save_expert_parallel(model: nn.Module, save_directory) -> Path:
    """Write the full single-process model of an expert-parallel `model` into `save_directory` with
    `save_pretrained` (rank 0 gathers the experts and writes; `from_pretrained` loads it on one process). Every
    rank must call it; each returns the folder once it is written, and a failed write raises on every rank."""
    group = model_group(model)
    rank, _ = group_rank_and_size(group)
    full = gather_full_model(model, dst=0)
    error = None
    if rank == 0:
        try:
            full.save_pretrained(save_directory)
        except Exception as caught:  # noqa: BLE001 - told to every rank below, then raised here
            error = caught
    device = next(model.parameters()).device
    failed = _all_reduce(torch.tensor([error is not None], dtype=torch.float64, device=device), group)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"rank 0 failed to write {save_directory} (its error is raised on rank 0)")
    return Path(save_directory)
