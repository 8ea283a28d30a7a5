"""`auto`: pick eager, batched_mm or grouped_mm per call from the number of (token, expert) pairs S = T * k.

The choice reads a `CrossoverTable`: for each (device type, dtype, mode) a list of segments
`[(upper, backend), ..., (None, backend)]`; the first segment whose `upper` is None or >= x wins, where x is
S itself (`unit="pairs"`) or S / num_experts, the pairs per expert (`unit="pairs_per_expert"`). Per expert is
the default: whether the weights of E experts are read once (grouped_mm) or once per pair (batched_mm), and
whether grouped_mm's per-group overhead pays off, depend on S relative to E, so one crossover then fits E=8 and
E=64 alike.
`mode` is "eager" for a plain call and "compiled" while `torch.compile` traces (then eager, which cannot be
captured with `fullgraph=True`, is never chosen).

Where the table comes from, first hit wins:
1. `set_crossovers(table)` / `with use_crossovers(table): ...` (e.g. one made by hand, or a test's);
2. the calibration stored for this machine by `moelab.bench.calibrate()` (see `calibration_path()`);
3. `DEFAULT_CROSSOVERS`: what the reference page says and our CPU measurements (BENCHMARKS.md) agree with.

The choice is visible: each call emits a step `auto` (keys `chosen`, `pairs`, `reason`) before delegating, so
`moelab.inspect` shows it, followed by the chosen backend's own steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.activations import ACTIVATIONS
from ..core.steps import is_recording, record_step
from .cpu import workspace
from .grouped_mm import grouped_mm_experts
from ..core.registry import ExpertsInterface

CANDIDATES = ("eager", "batched_mm", "grouped_mm")
MODES = ("eager", "compiled")
UNITS = ("pairs", "pairs_per_expert")


@dataclass
class CrossoverTable:
    """Segments per key "device/dtype/mode" ("*" matches any device or dtype), plus where they came from.

    rules: {"cpu/float32/eager": [[upper or None, backend], ...]}; a key may end in "/E=<n>" for a layer with n
    experts (then the rule measured at the nearest number of experts, on a log scale, applies; without one, the
    key without "/E=" does). unit: what `upper` counts, "pairs" (S) or "pairs_per_expert" (S / num_experts);
    source: "default", "calibrated" or "user"; meta: free-form provenance (machine, torch version, the sweep).
    """

    rules: dict[str, list[list]]
    unit: str = "pairs"
    source: str = "user"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {list(UNITS)}, got {self.unit!r}")
        self._per_experts: dict[str, tuple[tuple[int, str], ...]] = {}
        for key, segments in self.rules.items():
            parts = key.split("/")
            if len(parts) not in (3, 4) or parts[2] not in MODES + ("*",) or (
                    len(parts) == 4 and not re.fullmatch(r"E=[1-9][0-9]*", parts[3])):
                raise ValueError(f"crossover key must be 'device/dtype/mode' or 'device/dtype/mode/E=<n>' with mode "
                                 f"in {MODES}, got {key!r}")
            if len(parts) == 4:
                base = "/".join(parts[:3])
                self._per_experts[base] = tuple(sorted(self._per_experts.get(base, ()) + ((int(parts[3][2:]), key),)))
            if not segments or segments[-1][0] is not None:
                raise ValueError(f"the last segment of {key!r} must be [None, backend] (it covers every larger S)")
            bounds = [s[0] for s in segments[:-1]]
            if any(not isinstance(b, (int, float)) or isinstance(b, bool) for b in bounds) \
                    or bounds != sorted(set(bounds)):
                raise ValueError(f"the upper bounds of {key!r} must be increasing numbers, got {bounds}")
            for _, backend in segments:
                if backend not in CANDIDATES:
                    raise ValueError(f"auto chooses among {list(CANDIDATES)}, got {backend!r} in {key!r}")
            if parts[2] == "compiled" and any(b == "eager" for _, b in segments):
                raise ValueError(f"{key!r}: eager cannot be captured by torch.compile(fullgraph=True)")

    def lookup(self, device: str, dtype: str, mode: str, num_experts: int | None = None) -> tuple[str, list[list]]:
        """The most specific matching key and its segments (exact beats '*', device before dtype; among keys
        for several numbers of experts, the nearest to `num_experts`)."""
        for key in (f"{device}/{dtype}/{mode}", f"{device}/*/{mode}", f"*/{dtype}/{mode}", f"*/*/{mode}",
                    f"{device}/{dtype}/*", f"{device}/*/*", "*/*/*"):
            per_e = self._per_experts.get(key)
            if per_e and num_experts:
                # nearest on a log scale: the smallest ratio max(a/b, b/a)
                _, nearest = min(per_e, key=lambda ek: max(ek[0] / num_experts, num_experts / ek[0]))
                return nearest, self.rules[nearest]
            if key in self.rules:
                return key, self.rules[key]
        raise KeyError(f"no crossover rule for {device}/{dtype}/{mode}")

    def choose(self, pairs: int, dtype, device, compiled: bool = False,
               num_experts: int | None = None) -> tuple[str, str]:
        """(backend, reason) for S = `pairs` (token, expert) pairs over `num_experts` experts."""
        dtype_name = str(dtype).removeprefix("torch.")
        device_type = torch.device(device).type
        mode = "compiled" if compiled else "eager"
        key, segments = self.lookup(device_type, dtype_name, mode, num_experts)
        if self.unit == "pairs":
            x, what = pairs, f"S={pairs}"
        else:
            if not num_experts:
                raise ValueError("this crossover table counts pairs per expert: pass num_experts")
            x, what = pairs / num_experts, f"S/E={pairs}/{num_experts}"
        low = 0
        for upper, backend in segments:
            if upper is None or x <= upper:
                high = "inf" if upper is None else f"{upper:g}"
                if mode == "compiled" and backend == "eager":  # a "*" mode rule: eager cannot be captured whole
                    backend = "grouped_mm"
                return backend, f"{what} in ({low:g}, {high}] of {key} ({self.source} crossovers)"
            low = upper
        raise AssertionError("unreachable: the last segment is open")

    def to_dict(self) -> dict:
        return {"rules": self.rules, "unit": self.unit, "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "CrossoverTable":
        return cls(rules={k: [list(s) for s in v] for k, v in d["rules"].items()}, unit=d.get("unit", "pairs"),
                   source=d.get("source", "user"), meta=d.get("meta", {}))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "CrossoverTable":
        return cls.from_dict(json.loads(Path(path).read_text()))


# CPU (measured here: BENCHMARKS.md, 2 cores, AVX-512, one thread): grouped_mm, except with far fewer pairs than
# experts, where eager's loop over the few hit experts beats grouped_mm's pass over every group; compiled,
# batched_mm reads the weights by index without copying them and wins up to a few pairs per expert. The
# crossovers also depend on E, so E=8 and E=64 have their own rules (others take the nearest). Other devices:
# the reference page's advice (batched_mm for decode-sized inputs), not measured here.
DEFAULT_CROSSOVERS = CrossoverTable(
    rules={
        "cpu/*/eager": [[0.07, "eager"], [None, "grouped_mm"]],
        "cpu/float32/eager/E=8": [[0.35, "eager"], [None, "grouped_mm"]],
        "cpu/float32/eager/E=64": [[0.088, "eager"], [None, "grouped_mm"]],
        "cpu/bfloat16/eager/E=8": [[None, "grouped_mm"]],
        "cpu/bfloat16/eager/E=64": [[0.044, "eager"], [None, "grouped_mm"]],
        "cpu/*/compiled": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "cpu/float32/compiled/E=8": [[5.6, "batched_mm"], [None, "grouped_mm"]],
        "cpu/float32/compiled/E=64": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "cpu/bfloat16/compiled/E=8": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "cpu/bfloat16/compiled/E=64": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "*/*/eager": [[1, "batched_mm"], [None, "grouped_mm"]],
        "*/*/compiled": [[1, "batched_mm"], [None, "grouped_mm"]],
    },
    unit="pairs_per_expert",
    source="default",
    meta={"note": "CPU from BENCHMARKS.md (2 cores, AVX-512, 1 thread); other devices from the reference page"},
)

_override: CrossoverTable | None = None
_choices: dict = {}  # (id(table), pairs, dtype, device type, num_experts) -> (backend, reason)

# Compiled CPU inference hands grouped_mm to its uncompiled lean path once gate_up ([S, 2I]) is this big: measured
# (BENCHMARKS.md, docs/bench/compiled), the lean path wins by 4-13% at 16-64 MiB, where inductor's graph pays page
# faults on fresh buffers every call; at 8 MiB the graph's fused elementwise kernels win by 6-8%.
COMPILED_LEAN_MIN_BYTES = 16 * 2 ** 20


def machine_key() -> str:
    """A short id of this machine and software (CPU model, capability, cores, torch version) for calibrations."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ident = f"{cpu}|{torch.backends.cpu.get_cpu_capability()}|{os.cpu_count()}|{torch.__version__}"
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def calibration_path() -> Path:
    """Where this machine's calibration lives: $MOELAB_CACHE_DIR or ~/.cache/moelab, one file per machine key."""
    root = Path(os.environ.get("MOELAB_CACHE_DIR") or Path.home() / ".cache" / "moelab")
    return root / f"crossovers-{machine_key()}.json"


def _read_stored() -> CrossoverTable:
    """This machine's stored calibration, or the defaults (a broken file warns and falls back)."""
    path = calibration_path()
    try:
        return CrossoverTable.load(path) if path.exists() else DEFAULT_CROSSOVERS
    except (OSError, ValueError, KeyError, TypeError) as err:
        import warnings

        warnings.warn(f"ignoring unreadable calibration {path}: {err}; using the default crossovers")
        return DEFAULT_CROSSOVERS


def crossovers() -> CrossoverTable:
    """The table `auto` uses now (set > calibrated for this machine > default)."""
    # NOTE: no file access here: `auto` runs inside torch.compile traces, so the stored table is read eagerly
    # (at import and by `reload_crossovers`), never while tracing.
    return _override if _override is not None else _stored


def reload_crossovers() -> CrossoverTable:
    """Re-read this machine's stored calibration (after `moelab.bench.calibrate` wrote it)."""
    global _stored
    _stored = _read_stored()
    _choices.clear()
    return _stored


def set_crossovers(table: CrossoverTable | None) -> None:
    """Use `table` from now on (None: back to the stored calibration or the defaults, re-read from disk)."""
    global _override
    if table is not None and not isinstance(table, CrossoverTable):
        raise ValueError(f"table must be a CrossoverTable or None, got {type(table).__name__}")
    _override = table
    _choices.clear()
    if table is None:
        reload_crossovers()


@contextlib.contextmanager
def use_crossovers(table: CrossoverTable):
    """Within this block `auto` reads `table`."""
    global _override
    if not isinstance(table, CrossoverTable):
        raise ValueError(f"table must be a CrossoverTable, got {type(table).__name__}")
    previous, _override = _override, table
    _choices.clear()
    try:
        yield table
    finally:
        _override = previous
        _choices.clear()


_stored: CrossoverTable = _read_stored()


def choose(pairs: int, dtype, device="cpu", compiled: bool | None = None,
           num_experts: int | None = None) -> tuple[str, str]:
    """(backend, reason) that `auto` takes for S = `pairs` over `num_experts`; `compiled` defaults to "are we
    being traced"."""
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    return crossovers().choose(pairs, dtype, device, compiled, num_experts)


class _ExpertsView:
    """The three attributes grouped_mm reads, around plain tensors (inside the custom op below)."""

    def __init__(self, gate_up_proj, down_proj, act_fn):
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn


@torch.library.custom_op("moelab::grouped_mm_lean", mutates_args=())
def _grouped_mm_lean(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     gate_up_proj: torch.Tensor, down_proj: torch.Tensor, hidden_act: str) -> torch.Tensor:
    """grouped_mm's uncompiled CPU inference path, as one op a compiled graph calls (see `auto_experts`)."""
    experts = _ExpertsView(gate_up_proj, down_proj, ACTIVATIONS[hidden_act])
    with torch.no_grad():
        return grouped_mm_experts(experts, hidden_states, top_k_index, top_k_weights)


@_grouped_mm_lean.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, hidden_act):
    return torch.empty_like(hidden_states)


def _activation_name(act_fn) -> str | None:
    for name, fn in ACTIVATIONS.items():
        if fn is act_fn:
            return name
    return None


def auto_experts(experts, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H], by the backend `choose` names."""
    pairs = top_k_index.numel()  # S = T * k
    num_experts = experts.gate_up_proj.shape[0]
    if torch.compiler.is_compiling():
        chosen, reason = choose(pairs, hidden_states.dtype, hidden_states.device, True, num_experts)
    else:
        # NOTE: a decode loop asks the same question every step; the answer is cached per table.
        table = crossovers()
        key = (id(table), pairs, hidden_states.dtype, hidden_states.device.type, num_experts)
        hit = _choices.get(key)
        if hit is None:
            if len(_choices) > 4096:
                _choices.clear()
            hit = _choices[key] = table.choose(pairs, hidden_states.dtype, hidden_states.device, False, num_experts)
        chosen, reason = hit
    if is_recording():
        record_step("auto", f"auto picks {chosen} for S = {pairs} (token, expert) pairs over {num_experts} "
                    f"experts: {reason}.", chosen=chosen, pairs=pairs, reason=reason)
    itemsize = hidden_states.element_size()
    gate_up_bytes = pairs * experts.gate_up_proj.shape[1] * itemsize  # [S, 2I]
    if chosen == "grouped_mm" and torch.compiler.is_compiling() and hidden_states.device.type == "cpu" \
            and gate_up_bytes >= COMPILED_LEAN_MIN_BYTES \
            and workspace.fits([gate_up_bytes, pairs * experts.gate_up_proj.shape[2] * itemsize]):
        # NOTE: compiled, grouped_mm's graph makes fresh [S, 2I] and [S, H] buffers on every call; on CPU, once
        # they are tens of MiB, that costs a page fault per 4 KiB and the uncompiled lean path (in place, in a
        # reused workspace) is faster. So for inference at those sizes auto calls that path as one opaque op,
        # which keeps fullgraph=True; below them the graph's fused kernels win. With autograd the compiled graph
        # is used as is.
        act = _activation_name(experts.act_fn)
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad
                                                  or experts.gate_up_proj.requires_grad
                                                  or experts.down_proj.requires_grad)
        if act is not None and not needs_grad:
            return torch.ops.moelab.grouped_mm_lean(hidden_states, top_k_index, top_k_weights,
                                                    experts.gate_up_proj, experts.down_proj, act)
    return ExpertsInterface.get(chosen)(experts, hidden_states, top_k_index, top_k_weights)
