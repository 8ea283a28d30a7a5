"""The crossovers `auto` chooses by: the `CrossoverTable`, the defaults, and the calibration stored per machine.

A table holds, for each (device type, dtype, mode), a list of segments `[(upper, backend), ..., (None, backend)]`;
the first segment whose `upper` is None or >= x wins, where x is S itself (`unit="pairs"`) or S / num_experts,
the pairs per expert (`unit="pairs_per_expert"`). Per expert is the default: whether the weights of E experts
are read once (grouped_mm) or once per pair (batched_mm), and whether grouped_mm's per-group overhead pays off,
depend on S relative to E, so one crossover then fits E=8 and E=64 alike. capacity is chosen only for calls where
nothing drops (no `dropped` mask).

The mode of a call (`MODES`):
- "compiled" while `torch.compile` traces, with or without gradients (then eager and dropless capacity, which
  cannot be captured with `fullgraph=True`, are never chosen);
- "backward" for an uncompiled call that needs gradients (`moelab.backends.autograd.needs_autograd`: grad
  enabled and an input or an expert weight requires grad; not the module's `training` flag), measured as
  forward + backward, since a training step pays for both;
- "eager" for any other call (inference, `torch.no_grad()`).
A key with mode "*" is read only where no key of the call's own mode matches its device and dtype. A table with
no rule for a "backward" call (no ".../backward" nor "*" mode key matching its device and dtype: a hand-made table, or a
calibration stored without `backward=True`) uses `DEFAULT_CROSSOVERS`' backward rules, never its own forward
rules (forward-only timings say little about a training step), and the reason says so.

Where the table `auto` reads comes from, first hit wins:
1. `set_crossovers(table)` / `with use_crossovers(table): ...` (e.g. one made by hand, or a test's);
2. the calibration stored for this machine by `moelab.bench.calibrate()` (see `calibration_path()`);
3. `DEFAULT_CROSSOVERS`: what the reference page says and our CPU measurements (BENCHMARKS.md) agree with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.machine import cpu_model

REFERENCE_BACKENDS = ("eager", "batched_mm", "grouped_mm")  # the three of the reference (transformers) page
# the backends `auto` chooses among: the three, and capacity, which wins some small bf16 calls where nothing drops
# (measured: BENCHMARKS.md); block_aligned never won a call on a CPU, so it is not a candidate
AUTO_CANDIDATES = REFERENCE_BACKENDS + ("capacity",)
# NOTE: dropless capacity sizes its buffer by the largest group, a data-dependent shape torch.compile cannot
# capture whole, and with drops its cost follows the capacity factor, not the crossovers measured dropless
NOT_COMPILED = ("eager", "capacity")  # never chosen while torch.compile traces
# eager: a call without autograd; compiled: traced by torch.compile; backward: an uncompiled call that needs
# gradients. Every candidate has a backward (tests/test_backward.py), so no backend is barred from "backward".
MODES = ("eager", "compiled", "backward")
UNITS = ("pairs", "pairs_per_expert")


def call_mode(compiled: bool, backward: bool) -> str:
    """The mode whose rules a call reads: "compiled" while traced (with or without gradients), else "backward"
    for a call that needs gradients, else "eager"."""
    return "compiled" if compiled else "backward" if backward else "eager"


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
        if not isinstance(self.rules, dict):
            raise ValueError(f"rules must be a dict of 'device/dtype/mode' -> segments, got "
                             f"{type(self.rules).__name__}")
        self._per_experts: dict[str, tuple[tuple[int, str], ...]] = {}
        for key, segments in self.rules.items():
            parts = key.split("/") if isinstance(key, str) else []
            if len(parts) not in (3, 4) or parts[2] not in MODES + ("*",) or (
                    len(parts) == 4 and not re.fullmatch(r"E=[1-9][0-9]*", parts[3])):
                raise ValueError(f"crossover key must be 'device/dtype/mode' or 'device/dtype/mode/E=<n>' with mode "
                                 f"in {MODES}, got {key!r}")
            if len(parts) == 4:
                base = "/".join(parts[:3])
                self._per_experts[base] = tuple(sorted(self._per_experts.get(base, ()) + ((int(parts[3][2:]), key),)))
            if not isinstance(segments, (list, tuple)) or not all(
                    isinstance(s, (list, tuple)) and len(s) == 2 for s in segments):
                raise ValueError(f"the segments of {key!r} must be [upper, backend] pairs, got {segments!r}")
            if not segments or segments[-1][0] is not None:
                raise ValueError(f"the last segment of {key!r} must be [None, backend] (it covers every larger S)")
            bounds = [s[0] for s in segments[:-1]]
            if any(not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or b < 0
                   for b in bounds) or bounds != sorted(set(bounds)):
                raise ValueError(f"the upper bounds of {key!r} must be increasing finite numbers >= 0, got {bounds}")
            for _, backend in segments:
                if backend not in AUTO_CANDIDATES:
                    raise ValueError(f"auto chooses among {list(AUTO_CANDIDATES)}, got {backend!r} in {key!r}")
            uncapturable = [b for _, b in segments if b in NOT_COMPILED]
            if parts[2] == "compiled" and uncapturable:
                raise ValueError(f"{key!r}: {uncapturable[0]} cannot be captured by torch.compile(fullgraph=True)")

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
               num_experts: int | None = None, drops: bool = False, backward: bool = False) -> tuple[str, str]:
        """(backend, reason) for S = `pairs` (token, expert) pairs over `num_experts` experts.

        drops: whether the call gets a dropped mask (a capacity factor); capacity is then never chosen (its
        crossovers were measured dropless), nor eager or capacity while compiled: grouped_mm runs instead.
        backward: the call needs gradients; then the "backward" rules apply, unless compiled (the "compiled" ones
        do). Without a backward rule of its own the table defers to `DEFAULT_CROSSOVERS` (module docstring).
        """
        dtype_name = str(dtype).removeprefix("torch.")
        device_type = torch.device(device).type
        mode = call_mode(compiled, backward)
        try:
            key, segments = self.lookup(device_type, dtype_name, mode, num_experts)
        except KeyError:
            if mode != "backward" or self is DEFAULT_CROSSOVERS:
                raise
            # NOTE: not this table's forward rules: forward-only crossovers are not a training step's
            backend, reason = DEFAULT_CROSSOVERS.choose(pairs, dtype, device, False, num_experts, drops, True)
            return backend, f"{reason}; the {self.source} table has no backward rule for {device_type}/{dtype_name}"
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
                reason = f"{what} in ({low:g}, {high}] of {key} ({self.source} crossovers)"
                if mode == "compiled" and backend in NOT_COMPILED:  # a "*" mode rule: not captured whole
                    backend, reason = "grouped_mm", f"{reason}; {backend} cannot be compiled whole"
                elif drops and backend == "capacity":
                    backend, reason = "grouped_mm", f"{reason}; capacity only where nothing drops"
                return backend, reason
            low = upper
        raise AssertionError("unreachable: the last segment is open")

    def to_dict(self) -> dict:
        return {"rules": self.rules, "unit": self.unit, "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> CrossoverTable:
        """The table `to_dict` wrote; ValueError naming what is wrong in anything else."""
        if not isinstance(d, dict) or not isinstance(d.get("rules"), dict):
            raise ValueError("a crossover table is a JSON object with a 'rules' object")
        for name, kind in (("unit", str), ("source", str), ("meta", dict)):
            if name in d and not isinstance(d[name], kind):
                raise ValueError(f"'{name}' must be a {kind.__name__}, got {type(d[name]).__name__}")
        for key, segments in d["rules"].items():
            if not isinstance(segments, list) or not all(isinstance(s, list) for s in segments):
                raise ValueError(f"the segments of {key!r} must be a list of [upper, backend] lists")
        return cls(rules={k: [list(s) for s in v] for k, v in d["rules"].items()}, unit=d.get("unit", "pairs"),
                   source=d.get("source", "user"), meta=d.get("meta", {}))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> CrossoverTable:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# CPU (measured here: BENCHMARKS.md, 2 cores, AVX-512, one thread): grouped_mm, except with far fewer pairs than
# experts, where eager's loop over the few hit experts beats grouped_mm's pass over every group; compiled,
# batched_mm reads the weights by index without copying them and wins up to a few pairs per expert. The
# crossovers also depend on E, so E=8 and E=64 have their own rules (others take the nearest). Other devices:
# the reference page's advice (batched_mm for decode-sized inputs), not measured here. capacity (dropless) beats
# the three only in bfloat16 at E=8 with a few pairs per expert (by 6-14%: H=1024, I=512, AVX-512 BF16, one
# thread; `python -m moelab bench --tokens 1,4,16,64,256 --experts 8,64 --top-k 2,8 --backends
# eager,batched_mm,grouped_mm,capacity`, fitted by `moelab.bench.crossovers_from_sweep`).
# Backward (calls that need gradients, timed forward + backward), measured on a 2-core AMD EPYC (lscpu: "AMD
# EPYC", family 26 model 2; AVX-512 with avx512_bf16, no AMX), one thread, process clock, H=512, I=256:
# `python -m moelab calibrate --tokens 1,4,16,64,256 --experts 8,64 --top-k 2,8 --hidden 512 --intermediate 256
# --dtype float32,bfloat16 --backward yes --threads 1 --min-run-time 0.05` (the per-E rules it fitted). Indicative:
# another job kept the other core busy (load ~1), and at S/E <= 0.5 the four backends lie within a few % and the
# winner flips between runs; two runs agreed on these rules wherever a margin was over 5%. float32: grouped_mm at
# every S/E (eager up to 1.9x slower, capacity up to 3x, batched_mm up to 88x at S/E=256, where it scatters S
# weight-sized gradients). bfloat16: grouped_mm up to a few pairs per expert, then capacity (grouped_mm 4-53%
# slower there). Other devices: the forward advice of the reference page, not measured.
DEFAULT_CROSSOVERS = CrossoverTable(
    rules={
        "cpu/*/eager": [[0.07, "eager"], [None, "grouped_mm"]],
        "cpu/float32/eager/E=8": [[0.35, "eager"], [None, "grouped_mm"]],
        "cpu/float32/eager/E=64": [[0.088, "eager"], [None, "grouped_mm"]],
        "cpu/bfloat16/eager/E=8": [[2, "grouped_mm"], [8, "capacity"], [None, "grouped_mm"]],
        "cpu/bfloat16/eager/E=64": [[0.044, "eager"], [None, "grouped_mm"]],
        "cpu/*/compiled": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "cpu/float32/compiled/E=8": [[5.6, "batched_mm"], [None, "grouped_mm"]],
        "cpu/float32/compiled/E=64": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "cpu/bfloat16/compiled/E=8": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "cpu/bfloat16/compiled/E=64": [[2.8, "batched_mm"], [None, "grouped_mm"]],
        "cpu/*/backward": [[None, "grouped_mm"]],
        "cpu/float32/backward/E=8": [[None, "grouped_mm"]],
        "cpu/float32/backward/E=64": [[None, "grouped_mm"]],
        "cpu/bfloat16/backward/E=8": [[0.5, "grouped_mm"], [None, "capacity"]],
        "cpu/bfloat16/backward/E=64": [[4, "grouped_mm"], [None, "capacity"]],
        "*/*/eager": [[1, "batched_mm"], [None, "grouped_mm"]],
        "*/*/compiled": [[1, "batched_mm"], [None, "grouped_mm"]],
        "*/*/backward": [[1, "batched_mm"], [None, "grouped_mm"]],  # not measured: the forward advice
    },
    unit="pairs_per_expert",
    source="default",
    meta={"note": "CPU from BENCHMARKS.md (2 cores, AVX-512, 1 thread), backward from a calibrate --backward run "
                  "(see the comment above); other devices from the reference page"},
)


# ---------------------------------------------------------------------------------------------------- the store


def machine_key() -> str:
    """A short id of this machine and software (CPU model, capability, cores, torch version) for calibrations."""
    ident = f"{cpu_model()}|{torch.backends.cpu.get_cpu_capability()}|{os.cpu_count()}|{torch.__version__}"
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def calibration_path() -> Path:
    """Where this machine's calibration lives: $MOELAB_CACHE_DIR or ~/.cache/moelab, one file per machine key."""
    root = Path(os.environ.get("MOELAB_CACHE_DIR") or Path.home() / ".cache" / "moelab")
    return root / f"crossovers-{machine_key()}.json"


def _read_stored() -> CrossoverTable:
    """This machine's stored calibration, or the defaults: a file that cannot be read or is not a table warns and
    falls back, since it is read when `moelab` is imported and must never break that."""
    try:
        path = calibration_path()
        if not path.exists():
            return DEFAULT_CROSSOVERS
        table = CrossoverTable.load(path)
    except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: no home directory to find the cache in
        warnings.warn(f"ignoring the stored auto calibration ({err}); using the default crossovers", stacklevel=2)
        return DEFAULT_CROSSOVERS
    return table


_override: CrossoverTable | None = None
# NOTE: read now (at import) and by `reload_crossovers`, never while `auto` chooses: that runs inside
# torch.compile traces, where file access would be traced or break the graph.
_stored: CrossoverTable = _read_stored()


def crossovers() -> CrossoverTable:
    """The table `auto` uses now (set > calibrated for this machine > default)."""
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
