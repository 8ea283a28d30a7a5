"""`save_pretrained` / `from_pretrained`: a local folder with `config.json` and `model.safetensors`.

The folder holds the model's config (plus `model_type`, the dtype the weights were saved in and the moelab
version) and its weights. The experts backend is not saved: like the attention implementation in transformers,
it is a choice of how to run the model, made again at load time (`experts_implementation=`).
Every way a folder can be wrong (missing, not JSON, another model, truncated weights, missing tensors, wrong
shapes, files of two different saves, weights changed since the save) raises FileNotFoundError or ValueError
naming the file and the problem. The config is checked against the weights' header (names, shapes, dtypes, read
without the data) before anything is built, so a config edited past its weights (`vocab_size`, layers) fails at
once, naming the config field, instead of allocating the model it describes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import uuid
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.dtypes import parse_dtype

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAVE_ID_KEY = "moelab_save_id"  # in config.json and in the safetensors metadata: the two files of one save
WEIGHTS_HASH_KEY = "weights_sha256"  # in config.json: the checksum of model.safetensors, checked on load
_META_KEYS = ("model_type", "dtype", "moelab_version", SAVE_ID_KEY, WEIGHTS_HASH_KEY)
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}  # header names
MODEL_TYPES: dict[str, type] = {}  # model_type (as written in config.json) -> model class; classes register here


def package_version() -> str:
    """moelab's installed version (from its package metadata, without importing the root package)."""
    try:
        return version("moelab")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _atomic_write(path: Path, write) -> None:
    # NOTE: write to a temporary name, then rename: an interrupted save never leaves a half-written file behind
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_pretrained(model, save_directory) -> Path:
    """Write `config.json` and `model.safetensors` into `save_directory` (created if needed); returns its path.

    The two files of one save carry the same random save id, and the config the checksum of the weights file, so
    `from_pretrained` refuses a folder whose files come from different saves or whose weights changed.
    """
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_directory {directory} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    # NOTE: the weights first, then the config that names them: a save interrupted while writing the weights
    # leaves the previous save whole; one interrupted while writing the config leaves files whose save ids differ.
    _atomic_write(directory / WEIGHTS_NAME,
                  lambda p: save_file(tensors, str(p), metadata={"format": "pt", SAVE_ID_KEY: save_id}))
    config = {"model_type": model.model_type, **model.config.to_dict(),
              "dtype": str(model.dtype).removeprefix("torch."), "moelab_version": package_version(),
              SAVE_ID_KEY: save_id, WEIGHTS_HASH_KEY: file_sha256(directory / WEIGHTS_NAME)}
    _atomic_write(directory / CONFIG_NAME,
                  lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
    return directory


def check_same_save(raw_config: dict, config_path: Path, weights_path: Path) -> None:
    """ValueError unless config.json and model.safetensors were written by one `save_pretrained` and the weights
    are unchanged since. Folders saved before moelab recorded save ids (neither file has one) pass."""
    if not weights_path.is_file():
        return  # _read_weights names the missing file
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            weights_id = (f.metadata() or {}).get(SAVE_ID_KEY)
    except Exception:  # safetensors' own error types; _read_weights reports the unreadable file
        return
    config_id = raw_config.get(SAVE_ID_KEY)
    if config_id is None and weights_id is None:
        return  # a folder from before save ids
    if config_id != weights_id:
        raise ValueError(f"{config_path} and {weights_path} come from different saves (save id {config_id!r} vs "
                         f"{weights_id!r}): a save was interrupted or one file was replaced; save the model again")
    expected = raw_config.get(WEIGHTS_HASH_KEY)
    if expected is not None and file_sha256(weights_path) != expected:
        raise ValueError(f"{weights_path} does not match the checksum in {config_path}: the weights changed or are "
                         f"corrupt since they were saved")


def _read_config(cls, config_path: Path):
    """config.json -> (the config object, the raw JSON object); the meta keys are checked or skipped."""
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {config_path.parent} is not a folder written by "
                                f"save_pretrained")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type != cls.model_type:
        hint = f"; load it with moelab.{MODEL_TYPES[model_type].__name__}" if model_type in MODEL_TYPES else ""
        raise ValueError(f"{config_path} has model_type {model_type!r}, but {cls.__name__} loads "
                         f"{cls.model_type!r}{hint}")
    fields = {key: value for key, value in raw.items() if key not in _META_KEYS}
    try:
        config = cls.config_class.from_dict(fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_path} holds an invalid {cls.config_class.__name__}: {error}") from None
    return config, raw


def _unreadable(weights_path: Path, error: Exception) -> ValueError:
    # safetensors raises its own error types (truncated header, bad offsets, ...)
    return ValueError(f"{weights_path} is not a readable safetensors file, it may be truncated or corrupt "
                      f"({type(error).__name__}: {error})")


def _read_header(weights_path: Path) -> dict[str, tuple[list[int], str]]:
    """model.safetensors' tensor names -> (shape, safetensors dtype such as 'F32'), from its header: no data read."""
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing: {weights_path.parent} is not a folder written by "
                                f"save_pretrained")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {name: (list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as error:
        raise _unreadable(weights_path, error) from None


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights_path))
    except Exception as error:
        raise _unreadable(weights_path, error) from None


class _LayerStack(NamedTuple):
    """The layers of one backbone: the config field that counts them, their names' prefix, how many."""

    field: str  # "num_hidden_layers", or "text_config.num_hidden_layers" for a sub-config
    prefix: str  # "model.layers."
    count: int


def _skeleton(cls, config):
    """A copy of `cls(config)` with one layer per backbone, on the meta device: its tensors' names and shapes,
    nothing allocated or drawn; and each backbone's `_LayerStack`, counted as `config` asks."""
    keys = cls.sub_configs or ("",)
    subs = {key: getattr(config, key) if key else config for key in keys}
    one_layer = {key: dataclasses.replace(sub, num_hidden_layers=1) for key, sub in subs.items()}
    small = one_layer[""] if "" in one_layer else dataclasses.replace(config, **one_layer)
    with torch.device("meta"):
        skeleton = cls(small)
    names = {id(module): name for name, module in skeleton.named_modules()}
    stacks = []
    for key, layers in skeleton._experts_groups().items():
        parts = names[id(layers[0])].split(".")  # e.g. model.layers.0.moe: the list is the parent of the "0"
        i = next(i for i, part in enumerate(parts) if part == "0"
                 and isinstance(skeleton.get_submodule(".".join(parts[:i])), nn.ModuleList))
        stacks.append(_LayerStack(f"{key}.num_hidden_layers" if key else "num_hidden_layers",
                                  ".".join(parts[:i]) + ".", subs[key].num_hidden_layers))
    return skeleton, stacks


def _sized_fields(config_dict: dict, prefix: str = "") -> dict[str, int]:
    """Every int field of a config (nested ones dotted, e.g. moe.intermediate_size) by name."""
    fields = {}
    for key, value in config_dict.items():
        if isinstance(value, dict):
            fields.update(_sized_fields(value, f"{prefix}{key}."))
        elif isinstance(value, int) and not isinstance(value, bool):
            fields[f"{prefix}{key}"] = value
    return fields


def _explain(config, expected: list[int], found: list[int], config_path: Path) -> str:
    """' (config.json's vocab_size = 20000000)': the config fields that may set the sizes that differ."""
    sized = _sized_fields(config.to_dict())
    named = []
    for want, got in zip(expected, found):
        if want != got:
            named += [f"{name} = {value}" for name, value in sized.items() if value == want]
            named += [f"2 * {name} = {want}" for name, value in sized.items() if 2 * value == want]
    return f" ({config_path.name}'s {', '.join(dict.fromkeys(named))})" if named else ""


def check_config_against_header(cls, config, header: dict, config_path: Path, weights_path: Path) -> None:
    """ValueError unless `cls(config)` has exactly the tensors of the header `header` (names, shapes, floating
    dtypes), naming the config field that differs; nothing is built but a one-layer copy on the meta device."""
    skeleton, stacks = _skeleton(cls, config)
    for stack in stacks:  # NOTE: first, so a huge layer count fails before its names are spelt out
        pattern = re.compile(re.escape(stack.prefix) + r"(\d+)\.")
        found = sorted({int(m.group(1)) for name in header if (m := pattern.match(name))})
        if len(found) != stack.count:
            held = f"{stack.prefix}{found[0]}" + (f"-{found[-1]}" if len(found) > 1 else "") if found else "none"
            raise ValueError(f"{config_path} sets {stack.field} = {stack.count}, but {weights_path} holds "
                             f"{len(found)} layer{'s' if len(found) != 1 else ''} ({held}): the config does not "
                             f"describe these weights")
    expected: dict[str, list[int]] = {}
    for name, tensor in skeleton.state_dict().items():
        stack = next((s for s in stacks if name.startswith(s.prefix + "0.")), None)
        if stack is None:
            expected[name] = list(tensor.shape)
        else:  # the one layer built stands for every layer of its backbone
            rest = name[len(stack.prefix) + 2:]
            expected.update({f"{stack.prefix}{i}.{rest}": list(tensor.shape) for i in range(stack.count)})
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match its config: missing tensors {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected tensors {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
    for name, (shape, dtype) in header.items():
        if shape != expected[name]:
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {shape}, the config expects "
                             f"{expected[name]}{_explain(config, expected[name], shape, config_path)}")
        if dtype not in SAFETENSORS_DTYPES:  # also float8 (F8_E4M3): loaded as saved, the model could not run
            raise ValueError(f"{weights_path}: tensor {name!r} has dtype {dtype}, expected a floating dtype moelab "
                             f"runs in ({', '.join(SAFETENSORS_DTYPES.values())})")


def from_pretrained(cls, pretrained_model_path, experts_implementation: str | dict | None = None, *,
                    dtype: torch.dtype | str | None = None, device=None):
    """Load a `cls` model saved with `save_pretrained` from a local folder.

    experts_implementation: a backend name or a dict per sub-config (see `set_experts_implementation`);
        None uses the default.
    dtype: None / "auto" keeps the dtype the weights were saved in; else cast to it (e.g. torch.bfloat16).
    device: where to put the model (default CPU).
    """
    if not isinstance(pretrained_model_path, (str, os.PathLike)):
        raise ValueError(f"pretrained_model_path must be a local folder path, got "
                         f"{type(pretrained_model_path).__name__}")
    directory = Path(pretrained_model_path)
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist; from_pretrained loads local folders written by "
                                f"save_pretrained (there is no hub download)")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; pass the folder that save_pretrained wrote")
    target_dtype = parse_dtype(dtype, allow_auto=True)
    config, raw_config = _read_config(cls, directory / CONFIG_NAME)
    weights_path = directory / WEIGHTS_NAME
    check_same_save(raw_config, directory / CONFIG_NAME, weights_path)
    check_config_against_header(cls, config, _read_header(weights_path), directory / CONFIG_NAME, weights_path)
    tensors = _read_weights(weights_path)

    model = cls(config, experts_implementation, seed=0)  # the weights are overwritten below
    if target_dtype is None:  # keep the saved dtype: the one most tensors have
        target_dtype = Counter(t.dtype for t in tensors.values()).most_common(1)[0][0]
    model.to(target_dtype)
    model.load_state_dict(tensors)  # copies, casting to each parameter's dtype
    if device is not None:
        model.to(device)
    return model


def load_pretrained(pretrained_model_path, experts_implementation: str | dict | None = None, *,
                    dtype: torch.dtype | str | None = None, device=None):
    """Load whichever moelab model a `save_pretrained` folder holds (chosen by its config's model_type)."""
    config_path = Path(pretrained_model_path) / CONFIG_NAME
    model_type = None
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        pass  # the class's from_pretrained below reports what is wrong with the folder
    cls = MODEL_TYPES.get(model_type, MODEL_TYPES["moelab_causal_lm"])
    return from_pretrained(cls, pretrained_model_path, experts_implementation, dtype=dtype, device=device)
