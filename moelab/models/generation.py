"""`generate()`: prefill, then decode one token at a time, with the decode-time backend switch.

Stages, as the reference describes them:
- prefill: one forward over the whole prompt (many tokens per MoE layer), filling the KV cache;
- decode step n: one forward over the newest token only (B tokens per MoE layer), reading the cache.

Each forward runs inside `moelab.stage.generation_stage(...)`, the public channel inspection reads. For the
decode stage the backends are swapped by the decode policy (`moelab.selection.decode_backends`: on GPU
`grouped_mm` -> `batched_mm`, on CPU nothing) and restored afterwards, also when generation raises. A forward
pre-hook on every experts module records which backend each layer really ran in each stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .selection import check_backend_map, decode_backends as _decode_policy, switched_experts_implementation
from ..core.stage import current_stage, generation_stage, stage_label
from .configs import check_input_ids


@dataclass
class GenerateOutput:
    """What one `generate()` call produced and which experts backends ran where.

    `backends_used` maps each stage, in order, to `{MoE layer name: backend it ran}`:
    `{"prefill": {...}, "decode 0": {...}, "decode 1": {...}, ...}`. Only layers that ran appear.
    """

    sequences: torch.Tensor  # [B, P + n]: the prompt followed by the n new tokens
    backends_used: dict[str, dict[str, str]]
    prompt_length: int  # P
    prefill_seconds: float
    decode_seconds: float
    logits: torch.Tensor | None = None  # [B, n, V] float32 scores of each new token, when output_logits

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]  # [B, n]

    @property
    def tokens_per_second(self) -> float:
        """New tokens (all sequences) per second of prefill + decode."""
        seconds = self.prefill_seconds + self.decode_seconds
        return self.new_tokens.numel() / seconds if seconds > 0 else float("nan")

    def stage_backends(self, stage: str) -> dict[str, set[str]]:
        """`{layer: backends it ran}` over every step of `stage` ("prefill" or "decode")."""
        merged: dict[str, set[str]] = {}
        for label, layers in self.backends_used.items():
            if label.split(" ")[0] == stage:
                for layer, backend in layers.items():
                    merged.setdefault(layer, set()).add(backend)
        return merged


class BackendRecorder:
    """While active, records `{stage label: {layer: backend}}` from a pre-hook on each experts module.

    The hook reads `experts.experts_implementation` at the moment the layer runs, so the record is what
    actually ran, not what was planned.
    """

    def __init__(self, moe_layers: dict):
        self.moe_layers = moe_layers
        self.record: dict[str, dict[str, str]] = {}
        self._handles = []

    def __enter__(self):
        for name, moe in self.moe_layers.items():
            self._handles.append(moe.experts.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(experts, args):
            self.record.setdefault(stage_label(current_stage()), {})[name] = experts.experts_implementation
        return hook

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False


def _check_generate_args(model, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, seed, generator,
                         eos_token_id, backend_map, model_kwargs):
    text_config = model.text_config
    check_input_ids(input_ids, text_config.vocab_size)
    if input_ids.device != model.device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {model.device}; "
                         f"move it with input_ids.to(model.device)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or not temperature > 0):  # inf would flatten every distribution to uniform noise
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < text_config.vocab_size):
        raise ValueError(f"eos_token_id must be None or an int in [0, vocab_size = {text_config.vocab_size}), "
                         f"got {eos_token_id!r}")
    prefill_length = model._prefill_length(input_ids, **model_kwargs)
    if prefill_length + max_new_tokens > text_config.max_position_embeddings:
        raise ValueError(f"max_new_tokens = {max_new_tokens} after a prefill of {prefill_length} positions exceeds "
                         f"max_position_embeddings = {text_config.max_position_embeddings}")
    for name, moe in model.moe_layers().items():
        if moe.config.eval_capacity_factor is not None:
            raise ValueError(f"generate() cannot run {name} with eval_capacity_factor = "
                             f"{moe.config.eval_capacity_factor}: capacity drops are not causal (whether a token's "
                             f"pair drops depends on the other tokens of the call, so a prefill and a decode step "
                             f"would route it differently); set eval_capacity_factor=None to generate dropless")
    if backend_map is None:
        return _decode_policy(model.device.type)
    return check_backend_map(backend_map)


def next_token(logits, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax when greedy, else a draw from the filtered softmax."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # NOTE: the best logit is moved to 0 first: softmax is unchanged, and a tiny temperature then sends the others
    # to -inf instead of every logit to +-inf (inf - inf: NaN probabilities). A temperature below float32's range
    # would round to 0 (0 / 0 at the best logit), so it is held at the smallest normal float32.
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # [B, V]
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones already reach top_p (the most likely one always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # [B, V]
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # [B]


def _synchronize(device: torch.device) -> None:
    # NOTE: GPU kernels run asynchronously; wait for them so the stage timings measure the work, not the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, eos_token_id: int | None = None,
             use_cache: bool = True, output_logits: bool = False, decode_backends: dict | None = None,
             **model_kwargs) -> GenerateOutput:
    """Generate `max_new_tokens` after `input_ids` [B, P]; returns a `GenerateOutput`.

    Greedy by default; `do_sample=True` draws from softmax(logits / temperature), optionally restricted to the
    `top_k` most likely tokens and/or the smallest set reaching probability `top_p`. `seed` (or a
    `generator`) makes sampling reproducible. A sequence that emits `eos_token_id` is padded with it; generation
    stops early once all have. `use_cache=False` recomputes the whole sequence at every decode step (slow, the
    reference the cache must match). `model_kwargs` (e.g. `pixel_values`) go to the prefill forward only,
    and to every forward when `use_cache=False`. The model runs in eval mode (no router jitter, the eval capacity)
    and gets its mode back afterwards.

    `decode_backends` is the `{selected: used in decode}` swap applied for the decode stage; None asks the policy
    `moelab.decode_backends(model.device.type)`. Pass `moelab.decode_backends("cuda")` to see the GPU schedule
    on a CPU, or `{}` to switch nothing.
    """
    backend_map = _check_generate_args(model, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                                       generator, eos_token_id, decode_backends, model_kwargs)
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    prompt_length = input_ids.shape[1]
    sequences = input_ids
    scores = []
    times = {"prefill": 0.0, "decode": 0.0}
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # [B]

    def step(forward_ids, cache, kwargs):
        nonlocal sequences, finished
        out = model(forward_ids, past_key_values=cache, use_cache=use_cache, **kwargs)
        logits = out.logits[:, -1]  # [B, V]: the prediction for the next position
        token = next_token(logits, do_sample, temperature, top_k, top_p, generator)  # [B]
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished = finished | (token == eos_token_id)
        if output_logits:
            scores.append(logits.float())
        sequences = torch.cat([sequences, token[:, None]], dim=1)  # [B, P + n]
        return out.past_key_values

    was_training = model.training
    model.eval()  # generation is inference: no router jitter, and the eval capacity (refused above) if any
    try:
        with BackendRecorder(model.moe_layers()) as recorder:
            if max_new_tokens > 0:
                _synchronize(model.device)
                start = time.perf_counter()
                with generation_stage("prefill"):
                    cache = step(input_ids, None, model_kwargs)
                _synchronize(model.device)
                times["prefill"] = time.perf_counter() - start

                start = time.perf_counter()
                with switched_experts_implementation(model, backend_map):
                    for decode_step in range(max_new_tokens - 1):
                        if eos_token_id is not None and bool(finished.all()):
                            break
                        with generation_stage("decode", decode_step):
                            if use_cache:  # only the newest token; the cache holds the rest
                                cache = step(sequences[:, -1:], cache, {})
                            else:  # the whole sequence again
                                step(sequences, None, model_kwargs)
                _synchronize(model.device)
                times["decode"] = time.perf_counter() - start
    finally:
        model.train(was_training)

    logits = torch.stack(scores, dim=1) if output_logits and scores else None  # [B, n, V]
    if output_logits and logits is None:
        logits = torch.empty(input_ids.shape[0], 0, model.text_config.vocab_size, device=input_ids.device)
    return GenerateOutput(sequences, recorder.record, prompt_length, times["prefill"], times["decode"], logits)
