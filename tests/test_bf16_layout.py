"""bfloat16 on CPUs without bfloat16 instructions: the operand layouts every backend hands its matmuls, and the note
the environment, the report, `python -m moelab compare` and the explorer give where bfloat16 is emulated.

The layout fact, measured with torch 2.13 (one thread, C = A @ B, A [512, 512], B [512, 1024], bfloat16). Without
oneDNN (what an AVX2-only CPU gets: torch's own loops; here forced with `torch.backends.mkldnn.flags(enabled=False)`):
A row-major with B = W.t() (W [out, in] contiguous, the nn.Linear layout) 24.6 GFLOP/s; A = X.t() with B row-major
48.5; but both row-major (B stored [in, out]) 2.0 and both column-major 2.7: an operand pair of the same order takes
a loop ~10x slower. float32 runs 110 GFLOP/s in every layout, and so does oneDNN's bf16 (490, AVX512_BF16 here).
torch.bmm and F.grouped_mm show the same pattern (1.9 and 2.0 GFLOP/s for both row-major against 23.6 and 23.8).
So the checks below flag a bfloat16 matmul whose two operands have the same order, as ATen's CPU matmul reads them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import moelab
from conftest import make_moe
from moelab import bench
from moelab.backends import force_fallback
from moelab.core import machine

aten = torch.ops.aten
# the matmuls a CPU kernel receives, and where their A and B are among the arguments (linear and matmul are
# composite: they reach the dispatcher as these)
OPERANDS = {aten.mm: (0, 1), aten.bmm: (0, 1), aten.addmm: (1, 2), aten.baddbmm: (1, 2), aten.addbmm: (1, 2)}
if hasattr(aten, "_grouped_mm"):
    OPERANDS[aten._grouped_mm] = (0, 1)
# auto runs one of the others, which are checked themselves
BACKENDS = [name for name in moelab.ExpertsInterface.names() if name != "auto"]


def order(t: torch.Tensor) -> str:
    """'row' or 'col': how ATen's CPU matmul (addmm_impl_cpu_) reads the last two dims of `t`. It tries row-major
    first; an operand that is neither it copies contiguous, i.e. row-major."""
    rows, cols = t.shape[-2:]
    row_stride, col_stride = t.stride()[-2:]
    if col_stride == 1 and row_stride >= max(1, cols):
        return "row"
    if row_stride == 1 and col_stride >= max(1, rows):
        return "col"
    return "row"


@dataclass
class Call:
    op: str
    phase: str  # "forward" or "backward"
    a: tuple  # (shape, strides) of A and of B
    b: tuple
    dtype: torch.dtype
    slow: bool  # A and B of the same order: the slow loop without oneDNN
    b_is_stored_weight: bool  # B is a parameter's memory read as stored, [out, in] row-major
    inside: str | None  # the custom op it ran in

    def __str__(self):
        return f"{self.phase} {self.op}{' in ' + self.inside if self.inside else ''}: A {self.a} @ B {self.b}"


class MatmulRecorder(TorchDispatchMode):
    """Records every matmul the dispatcher hands a kernel, with its operands' layouts, forward and backward."""

    def __init__(self, parameters=()):
        super().__init__()
        self.calls: list[Call] = []
        self.phase = "forward"
        self._storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._inside: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in OPERANDS:
            i, j = OPERANDS[func.overloadpacket]
            a, b = args[i], args[j]
            self.calls.append(Call(
                str(func), self.phase, (tuple(a.shape), a.stride()), (tuple(b.shape), b.stride()), b.dtype,
                slow=order(a) == order(b),
                b_is_stored_weight=b.untyped_storage().data_ptr() in self._storages and order(b) == "row",
                inside=self._inside[-1] if self._inside else None))
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:
            # NOTE: a custom op's kernel runs with this mode off, its own torch.mm calls unseen: run its Python
            # body under the mode instead (the same computation)
            self._inside.append(func._schema.name)
            try:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            finally:
                self._inside.pop()
        assert func.namespace != "moelab", f"cannot look inside {func}: not a torch.library.custom_op"
        return func(*args, **kwargs)


def record(backend: str, grad: bool, fallback: bool, backward: bool = False) -> list[Call]:
    """The matmuls of one bfloat16 SparseMoE call (router included), and of its backward if asked."""
    moe = make_moe(16, 32, 4, 2, dtype=torch.bfloat16, backend=backend)
    x = torch.randn(12, 16).to(torch.bfloat16).requires_grad_(grad)
    recorder = MatmulRecorder(moe.parameters())
    with recorder, force_fallback(fallback), (contextlib.nullcontext() if grad else torch.no_grad()):
        out = moe(x)
        if backward:
            recorder.phase = "backward"
            out.float().sum().backward()
    return recorder.calls


# ------------------------------------------------------------------------------------------------ the detector

def test_the_detector_flags_the_measured_slow_layouts_and_sees_through_linear():
    x, w_in_out, w_out_in = torch.randn(8, 16), torch.randn(16, 24), torch.randn(24, 16)
    x, w_in_out, w_out_in = (t.to(torch.bfloat16) for t in (x, w_in_out, w_out_in))
    recorder = MatmulRecorder([w_out_in])
    with recorder:
        torch.mm(x, w_in_out)  # both row-major: 2.0 GFLOP/s without oneDNN
        F.linear(x, w_out_in)  # the nn.Linear layout, B = W.t(): 24.6
        torch.mm(x.t().contiguous().t(), w_in_out)  # A column-major, B row-major: 48.5
        torch.mm(x.t().contiguous().t(), w_out_in.t())  # both column-major: 2.7
        torch.mm(torch.randn(8, 24).to(torch.bfloat16), w_out_in)  # grad @ W, as autograd's linear backward does
    assert [c.slow for c in recorder.calls] == [True, False, False, True, True]
    assert [c.b_is_stored_weight for c in recorder.calls] == [False, False, False, False, True]
    assert order(w_in_out[:, :1]) == "row" and order(w_out_in.t()[:1]) == "col"  # one column, one row: by stride


def test_the_recorder_sees_the_matmuls_inside_moelab_custom_ops():
    calls = record("grouped_mm", grad=True, fallback=True, backward=True)
    inside = {c.inside for c in calls}
    assert {"moelab::grouped_linear_fallback", "moelab::grouped_linear_weight_grad"} <= inside
    assert any(c.op == "aten.mm.out" for c in calls if c.inside)  # the loop's torch.mm(out=...)


# ------------------------------------------------------------------------------------------------ the backends

@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backend_forward_hands_a_bf16_matmul_the_slow_layout(backend, grad, fallback):
    calls = record(backend, grad, fallback)
    assert len(calls) >= 3  # the router and the two projections: the layer's matmuls were seen
    assert all(c.dtype == torch.bfloat16 for c in calls)
    slow = [str(c) for c in calls if c.slow]
    assert not slow, f"{backend} hands these bf16 matmuls operands of the same order (~10x slower without oneDNN)"


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_hits_the_slow_layout_only_in_grad_times_the_stored_weight(backend, fallback):
    # NOTE: the input gradient of y = x @ W.t() is grad @ W, W read as stored ([out, in] row-major) next to a
    # row-major grad: both row-major. torch's own linear backward (mm_mat1_backward) does this, so every backend
    # and the router inherit it; a custom backward could hand grad column-major instead (48 vs 2 GFLOP/s without
    # oneDNN, for a copy of grad). Any other slow layout in the backward is a regression.
    calls = [c for c in record(backend, grad=True, fallback=fallback, backward=True) if c.phase == "backward"]
    assert len(calls) >= 2  # the router's weight gradient and input gradient at least
    others = [str(c) for c in calls if c.slow and not c.b_is_stored_weight]
    assert not others, f"{backend}'s backward hands these bf16 matmuls operands of the same order"


# ------------------------------------------------------------------------------------------------ the note

def _cpu(monkeypatch, flags, onednn=False):
    """Pretend this CPU has `flags` (None: no /proc/cpuinfo) and whether torch uses oneDNN for bf16."""
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(flags or ()))
    monkeypatch.setattr(machine, "onednn_bf16", lambda: onednn)


def test_native_bf16_reads_the_instruction_flags(monkeypatch):
    _cpu(monkeypatch, {"avx2", "fma", "avx512f"})
    assert machine.native_bf16() is False and "no native bf16" in machine.cpu_description()
    for flag in ("avx512_bf16", "amx_bf16", "bf16"):  # x86's two, ARM's one
        _cpu(monkeypatch, {"avx2", flag})
        assert machine.native_bf16() is True and ", native bf16," in machine.cpu_description()
    _cpu(monkeypatch, None)
    assert machine.native_bf16() is None and "bf16 support unknown" in machine.cpu_description()


def test_bf16_note_only_for_bfloat16_on_a_cpu_without_it(monkeypatch):
    _cpu(monkeypatch, {"avx2", "fma"}, onednn=False)
    note = machine.bf16_note("bfloat16")
    assert note == machine.bf16_note(torch.bfloat16) and note.startswith("bfloat16 is emulated on this CPU")
    assert "[in, out]" in note and "4-9x slower than float32" in note  # torch's own loops: the layout matters
    assert machine.bf16_note("float32") is None and machine.bf16_note(torch.float16) is None
    _cpu(monkeypatch, {"avx2", "avx512f"}, onednn=True)  # AVX-512 without BF16: oneDNN, layout-blind
    assert "oneDNN" in machine.bf16_note("bfloat16") and "[in, out]" not in machine.bf16_note("bfloat16")
    _cpu(monkeypatch, {"avx2", "avx512_bf16"})
    assert machine.bf16_note("bfloat16") is None
    _cpu(monkeypatch, None)  # unknown flags: nothing claimed
    assert machine.bf16_note("bfloat16") is None
    with pytest.raises(ValueError, match="dtype must be"):
        machine.bf16_note("int8")


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's, on setting the flags
def test_onednn_bf16_is_what_torch_reports():
    expected = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert machine.onednn_bf16() is bool(expected)
    with torch.backends.mkldnn.flags(enabled=False):  # the switch the microbenchmark above used
        assert machine.onednn_bf16() is False


def test_the_environment_records_emulated_bf16(monkeypatch):
    _cpu(monkeypatch, {"avx2", "fma", "sse4_2", "ht"}, onednn=False)
    env = bench.environment()
    assert env["native_bf16"] is False and env["onednn_bf16"] is False
    assert env["cpu_flags"] == ["avx2", "fma", "sse4_2"] and "no native bf16" in env["cpu_description"]
    _cpu(monkeypatch, None)
    assert bench.environment()["native_bf16"] is None


@pytest.fixture(scope="module")
def bf16_sweep():
    """A tiny bfloat16 sweep with everything the report reads (transformers, the GEMM bounds)."""
    pytest.importorskip("transformers")
    return bench.sweep(tokens=[4], num_experts=[4], top_k=[2], hidden_size=[16], intermediate_size=[32],
                              dtypes=["bfloat16"], transformers=True, gemm_bound=True, min_run_time=0.01,
                              measure_memory=False, progress=False)


@pytest.mark.parametrize("onednn", [False, True, None], ids=["own_loops", "onednn", "not_recorded"])
def test_the_report_says_bf16_was_emulated_next_to_its_tables(bf16_sweep, onednn):
    from moelab.bench.report import markdown

    table = bf16_sweep.copy()
    table.attrs["environment"] = dict(bf16_sweep.attrs["environment"], native_bf16=False, onednn_bf16=onednn)
    text = markdown(table, None, {}, min_pairs=0)
    caveat = f"> **bfloat16 rows below were emulated.** {machine.bf16_emulation_note(onednn)}"
    assert f"({table.attrs['environment']['cpu_capability']}, no native bf16: bfloat16 emulated)" in text
    # under the machine line and under every numbered section with bf16 rows
    assert text.count(caveat) == 5
    for heading in ("## 1. moelab vs transformers", "## 2. The dense limit", "## 3. `auto`", "## 4. The reference"):
        section = text[text.index(heading):]
        assert section.split("\n", 3)[2] == caveat
    native = dict(table.attrs["environment"], native_bf16=True)
    for env in (native, {k: v for k, v in native.items() if k not in ("native_bf16", "onednn_bf16")}):
        table.attrs["environment"] = env  # native, or a record from before native_bf16 was kept
        assert "emulated" not in markdown(table, None, {}, min_pairs=0)
    table.attrs["environment"] = dict(native, native_bf16=False)  # a float32 sweep: the machine line only
    assert "rows below were emulated" not in markdown(table.assign(dtype="float32"), None, {}, min_pairs=0)


def test_compare_backends_carries_the_note(monkeypatch):
    cfg = moelab.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    _cpu(monkeypatch, {"avx2"}, onednn=False)
    table = bench.compare_backends(cfg, num_tokens=4, dtype="bfloat16", backends=["eager"], min_run_time=0.01)
    assert table.attrs["bf16_note"] == machine.bf16_note("bfloat16") is not None
    table = bench.compare_backends(cfg, num_tokens=4, dtype="float32", backends=["eager"], min_run_time=0.01)
    assert table.attrs["bf16_note"] is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compare_cli_prints_the_note_where_bf16_is_emulated(monkeypatch, capsys, dtype):
    from moelab.cli import main

    _cpu(monkeypatch, {"avx2", "fma"}, onednn=False)
    assert main(["compare", "--tokens", "4", "--hidden", "16", "--intermediate", "8", "--experts", "4",
                 "--top-k", "2", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert "max_abs_diff_to_eager" in out  # the table printed
    assert (machine.bf16_emulation_note(False) in out) is (dtype == "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_cli_prints_the_note_where_bf16_is_emulated(monkeypatch, capsys, tmp_path, dtype):
    from moelab.cli import main

    _cpu(monkeypatch, {"avx2", "fma"}, onednn=False)
    assert main(["bench", "--tokens", "4", "--hidden", "16", "--intermediate", "8", "--experts", "4", "--top-k", "2",
                 "--dtype", dtype, "--backends", "eager", "--min-run-time", "0.01", "--no-memory", "--no-plots",
                 "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "median time per call" in out  # the table printed
    assert (machine.bf16_emulation_note(False) in out) is (dtype == "bfloat16")


def test_the_explorer_shows_the_note_while_bfloat16_is_selected(monkeypatch):
    from moelab.widgets import BackendExplorer

    _cpu(monkeypatch, {"avx2", "fma"}, onednn=False)
    ex = BackendExplorer(runner=lambda **kw: None, backends=("eager",))  # a runner that is never called here
    assert ex.note is None and ex.note_html.value == ""
    ex.set(dtype="bfloat16")
    assert ex.note == machine.bf16_note("bfloat16") and "bfloat16 is emulated" in ex.note_html.value
    assert ex.note_html in ex.widget.children[0].children  # shown under the controls
    ex.set(dtype="float32")
    assert ex.note is None and ex.note_html.value == ""
    _cpu(monkeypatch, {"avx2", "avx512_bf16"})
    ex.set(dtype="bfloat16")
    assert ex.note is None and ex.note_html.value == ""
