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
import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..steps import record_step
from .registry import ExpertsInterface

CANDIDATES = ("eager", "batched_mm", "grouped_mm")
MODES = ("eager", "compiled")
UNITS = ("pairs", "pairs_per_expert")


@dataclass
class CrossoverTable:
    """Segments per key "device/dtype/mode" ("*" matches any device or dtype), plus where they came from.

    rules: {"cpu/float32/eager": [[upper or None, backend], ...]}; unit: what `upper` counts, "pairs" (S) or
    "pairs_per_expert" (S / num_experts); source: "default", "calibrated" or "user"; meta: free-form provenance
    (machine, torch version, the sweep that measured it).
    """

    rules: dict[str, list[list]]
    unit: str = "pairs"
    source: str = "user"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {list(UNITS)}, got {self.unit!r}")
        for key, segments in self.rules.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[2] not in MODES + ("*",):
                raise ValueError(f"crossover key must be 'device/dtype/mode' with mode in {MODES}, got {key!r}")
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

    def lookup(self, device: str, dtype: str, mode: str) -> tuple[str, list[list]]:
        """The most specific matching key and its segments (exact beats '*', device before dtype)."""
        for key in (f"{device}/{dtype}/{mode}", f"{device}/*/{mode}", f"*/{dtype}/{mode}", f"*/*/{mode}",
                    f"{device}/{dtype}/*", f"{device}/*/*", f"*/*/*"):
            if key in self.rules:
                return key, self.rules[key]
        raise KeyError(f"no crossover rule for {device}/{dtype}/{mode}")

    def choose(self, pairs: int, dtype, device, compiled: bool = False,
               num_experts: int | None = None) -> tuple[str, str]:
        """(backend, reason) for S = `pairs` (token, expert) pairs over `num_experts` experts."""
        dtype_name = str(dtype).removeprefix("torch.")
        device_type = torch.device(device).type
        mode = "compiled" if compiled else "eager"
        key, segments = self.lookup(device_type, dtype_name, mode)
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
        return dataclasses.asdict(self)

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


# CPU (measured, BENCHMARKS.md, 2-core AVX-512): grouped_mm, except with far fewer pairs than experts, where
# eager's loop over the few hit experts beats grouped_mm's pass over every group; compiled batched_mm reads the
# weights by index without copying them and wins up to a few pairs per expert. Other devices: the reference's
# advice (batched_mm for decode-sized inputs), not measured here.
DEFAULT_CROSSOVERS = CrossoverTable(
    rules={
        "cpu/*/eager": [[0.07, "eager"], [None, "grouped_mm"]],
        "cpu/float32/compiled": [[5.5, "batched_mm"], [None, "grouped_mm"]],
        "cpu/*/compiled": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "*/*/eager": [[1, "batched_mm"], [None, "grouped_mm"]],
        "*/*/compiled": [[1, "batched_mm"], [None, "grouped_mm"]],
    },
    unit="pairs_per_expert",
    source="default",
    meta={"note": "CPU from BENCHMARKS.md (2 cores, AVX-512, 1 thread); other devices from the reference page"},
)

_override: CrossoverTable | None = None


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
    return _stored


def set_crossovers(table: CrossoverTable | None) -> None:
    """Use `table` from now on (None: back to the stored calibration or the defaults, re-read from disk)."""
    global _override
    if table is not None and not isinstance(table, CrossoverTable):
        raise ValueError(f"table must be a CrossoverTable or None, got {type(table).__name__}")
    _override = table
    if table is None:
        reload_crossovers()


@contextlib.contextmanager
def use_crossovers(table: CrossoverTable):
    """Within this block `auto` reads `table`."""
    global _override
    if not isinstance(table, CrossoverTable):
        raise ValueError(f"table must be a CrossoverTable, got {type(table).__name__}")
    previous, _override = _override, table
    try:
        yield table
    finally:
        _override = previous


_stored: CrossoverTable = _read_stored()


def choose(pairs: int, dtype, device="cpu", compiled: bool | None = None,
           num_experts: int | None = None) -> tuple[str, str]:
    """(backend, reason) that `auto` takes for S = `pairs` over `num_experts`; `compiled` defaults to "are we
    being traced"."""
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    return crossovers().choose(pairs, dtype, device, compiled, num_experts)


def auto_experts(experts, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H], by the backend `choose` names."""
    pairs = top_k_index.numel()  # S = T * k
    num_experts = experts.gate_up_proj.shape[0]
    chosen, reason = choose(pairs, hidden_states.dtype, hidden_states.device, num_experts=num_experts)
    record_step("auto", f"auto picks {chosen} for S = {pairs} (token, expert) pairs over {num_experts} experts: "
                f"{reason}.", chosen=chosen, pairs=pairs, reason=reason)
    return ExpertsInterface.get(chosen)(experts, hidden_states, top_k_index, top_k_weights)
