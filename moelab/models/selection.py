"""Which experts backend each part of a model runs: the `experts_implementation` selection and the decode policy.

A model's MoE layers fall into groups, one per sub-config (`"text_config"`, `"vision_config"`, ...); a
single-backbone model has no sub-configs. Its selection is a dict:

    {"": "grouped_mm", "text_config": "grouped_mm", "vision_config": "eager"}

- `""` is the model-wide choice: it applies to every sub-config that has no key of its own;
- a sub-config key overrides `""` for that backbone;
- a plain string `"eager"` means `{"": "eager"}` (all backbones).

`resolve_selection` turns a request into the full dict, validating every key and name before anything is
applied, so a bad request changes nothing. `decode_backends(device_type)` is the public decode policy:
which backends `generate()` swaps for the decode stage on a device, as transformers does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from ..core.registry import ExpertsInterface

DEFAULT_EXPERTS_IMPLEMENTATION = "grouped_mm"


def resolve_selection(requested, sub_configs=(), current: Mapping[str, str] | None = None) -> dict[str, str]:
    """`requested` (str | dict | None) -> the full selection `{"": ..., sub_config: ...}`; applies nothing.

    Keys missing from `requested` keep their `current` value (`current=None`: a new model, everything starts at
    `DEFAULT_EXPERTS_IMPLEMENTATION`), except that a `""` key also reaches every sub-config without its own key.
    Raises ValueError naming the valid keys for an unknown key, and the valid names for an unknown backend.
    """
    valid_keys = ["", *sub_configs]
    if current is None:
        current = dict.fromkeys(valid_keys, DEFAULT_EXPERTS_IMPLEMENTATION)
    if requested is None:
        requested = {}
    elif isinstance(requested, str):
        requested = {"": requested}
    elif not isinstance(requested, Mapping):
        raise ValueError(f"experts_implementation must be a str or a dict keyed by {valid_keys} ('' means all), "
                         f"got {type(requested).__name__}")
    unknown = [key for key in requested if key not in valid_keys]
    if unknown:
        raise ValueError(f"unknown experts_implementation key(s) {unknown}; valid keys are {valid_keys} "
                         f"('' applies to all)")
    for key, name in requested.items():
        try:
            ExpertsInterface.validate(name)
        except ValueError as error:
            raise ValueError(f"experts_implementation[{key!r}]: {error}") from None

    everywhere = requested.get("", current[""])
    resolved = {"": everywhere}
    for key in sub_configs:
        resolved[key] = requested.get(key, everywhere if "" in requested else current[key])
    return resolved


def apply_selection(selection: Mapping[str, str], groups: Mapping[str, list]) -> None:
    """Set every SparseMoE layer in `groups[key]` to `selection[key]`; all or nothing.

    `groups` maps a selection key (`""` for a single backbone) to its MoE layers. The names were validated by
    `resolve_selection`; should a layer still refuse (a backend unregistered in between), the layers already
    switched are put back before the error propagates.
    """
    previous = [(layer, layer.get_experts_implementation()) for layers in groups.values() for layer in layers]
    try:
        for key, layers in groups.items():
            for layer in layers:
                layer.set_experts_implementation(selection[key])
    except Exception:
        for layer, name in previous:
            layer.experts.experts_implementation = name  # restore without re-validating
        raise


def decode_backends(device_type: str | torch.device) -> dict[str, str]:
    """The decode policy: `{selected backend: backend run during decode}` for a device type.

    On a GPU (any non-CPU device) `grouped_mm` becomes `batched_mm` for decode: a decode step has a handful of
    tokens, where one batched GEMM over duplicated weights beats a sort plus a grouped GEMM. On CPU nothing
    switches by default: there `batched_mm` leads at a few tokens on some CPUs and not on others, by little either
    way (notebook 7 measures it); pass your own map to `generate(decode_backends=...)` where it pays. Backends
    not in the dict stay as they are.

    >>> decode_backends("cuda")
    {'grouped_mm': 'batched_mm'}
    >>> decode_backends("cpu")
    {}
    """
    try:
        device_type = torch.device(device_type).type  # "cuda:0" -> "cuda"
    except (RuntimeError, TypeError):
        raise ValueError(f"device_type must name a torch device type such as 'cpu' or 'cuda', "
                         f"got {device_type!r}") from None
    return {} if device_type == "cpu" else {"grouped_mm": "batched_mm"}


def check_backend_map(mapping, argument: str = "decode_backends") -> dict[str, str]:
    """Validate a `{selected: replacement}` backend map (both sides registered names); returns a copy."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{argument} must be a dict {{selected backend: decode backend}}, "
                         f"got {type(mapping).__name__}")
    for selected, replacement in mapping.items():
        for name in (selected, replacement):
            try:
                ExpertsInterface.validate(name)
            except ValueError as error:
                raise ValueError(f"{argument}: {error}") from None
    return dict(mapping)


@contextlib.contextmanager
def switched_experts_implementation(model, mapping: Mapping[str, str]):
    """Within the block, every selection entry `v` of `model` runs `mapping.get(v, v)`; restored on exit.

    Goes through `model.set_experts_implementation`, so `get_experts_implementation()` reports the switched
    dict inside the block (as transformers does). The original is restored also when the block raises.
    """
    original = model.get_experts_implementation()
    switched = {key: mapping.get(name, name) for key, name in original.items()}
    if switched == original:  # nothing to do: no set/restore round trip
        yield switched
        return
    model.set_experts_implementation(switched)
    try:
        yield switched
    finally:
        model.set_experts_implementation(original)
