"""The architecture as a contract: the layers (import-linter), no cycles, no private names shared across modules,
no imports hidden in functions, and the frozen public API."""

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moelab"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
SUBPACKAGES = ("core", "data", "backends", "layer", "memory", "inspection", "models", "training", "hf", "bench",
               "widgets")
# third-party modules a function may import lazily: optional (transformers) or needed only on one path
LAZY_THIRD_PARTY = ("transformers", "psutil", "tqdm")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]  # the package the module's relative imports start from (an __init__'s own package)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names."""
    if not node.level:
        return node.module or ""
    base = _package_of(path)
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _run_lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_lint_imports_keeps_the_layer_contract():
    result = _run_lint_imports(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("change, broken", [
    # a lower layer importing a higher one breaks the layers contract
    (("core/dtypes.py", "from ..layer import moe  # noqa\n"), "moelab's layers"),
    # two modules of one package importing each other break the cycle contract
    (("inspection/render.py", "from . import trace  # noqa\n"), "no import cycle"),
])
def test_the_contract_fails_on_a_wrong_import(tmp_path, change, broken):
    shutil.copytree(PACKAGE, tmp_path / "moelab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    module, line = change
    target = tmp_path / "moelab" / module
    text = target.read_text(encoding="utf-8")
    head, _, body = text.partition("from __future__ import annotations\n")
    target.write_text(head + "from __future__ import annotations\n" + line + body if body else line + text,
                      encoding="utf-8")
    result = _run_lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(path, node).split(".")[0] == "moelab":
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
    assert not offenders, "\n".join(offenders)


def test_no_moelab_import_hides_in_a_function_and_no_module_imports_the_root():
    offenders = []
    for path, tree in _modules():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    target = _resolve(path, node)
                    lazy_ok = node.level == 0 and target.split(".")[0] in LAZY_THIRD_PARTY
                    if target.split(".")[0] == "moelab" or not lazy_ok and node.level:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} in "
                                         f"{func.name}()")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] == "moelab":
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} in "
                                             f"{func.name}()")
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "moelab" for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports the root package")
            if isinstance(node, ast.ImportFrom) and _resolve(path, node) == "moelab":
                names = [a.name for a in node.names if a.name not in SUBPACKAGES]
                if names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names} from the root package")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_says_what_lives_there_and_what_it_may_import(package):
    module = importlib.import_module(f"moelab.{package}")
    doc = module.__doc__ or ""
    assert doc.startswith(f"moelab.{package}") or package in doc.split("\n")[0], doc[:80]
    assert "import" in doc.lower(), f"moelab.{package}'s docstring does not say what it may import"


# The frozen public API: every name users' notebooks may rely on. A name leaves this list only by a decision.
PUBLIC = {
    "moelab": [
        "Experts", "ExpertsInterface", "GenerateOutput", "KVCache", "MoEConfig", "MoEForCausalLM", "MoEModelConfig",
        "MoEVisionConfig", "MultiBackboneConfig", "MultiBackboneForCausalLM", "RMSNorm", "RouterOutput",
        "SparseMoE", "Stage", "TopKRouter", "Trace", "current_stage", "decode_backends", "generation_stage",
        "inspect", "load_balancing_loss", "load_pretrained", "memory", "record_step", "stage_label",
        "synthetic_pixel_values", "GlobalLoad", "router_z_loss", "data", "training",
    ],
    "moelab.layer": ["Experts", "GlobalLoad", "RouterOutput", "SharedExpert", "SparseMoE", "TopKRouter",
                     "drop_by_position", "drop_by_probs", "drop_pairs", "expert_capacity", "load_balancing_loss",
                     "router_z_loss", "skewed_routing"],
    "moelab.data": ["Batch", "ByteTokenizer", "MAX_TOKENS", "PlantedTopics", "TextCorpus", "TokenDataset",
                    "planted_topics", "text_corpus"],
    "moelab.training": [
        "MAX_BATCH_TOKENS", "MAX_TOKENS", "METHODS", "RoutingSample", "Run", "Trainer", "TrainingConfig",
        "balancing_run", "bias_array", "drop_rate_by_position", "expert_by_position", "expert_by_token",
        "load_array", "max_mean_load", "metric_by_layer", "mutual_information", "normalized_mutual_information",
        "plot_balance_curves", "plot_drop_rate_vs_capacity", "plot_expert_by_position", "plot_expert_by_token",
        "plot_load_over_training", "plot_specialisation", "route_batches", "routing_stats", "specialisation_matrix",
        "specialisation_run", "tilt_router", "tiny_moe_lm", "token_id_routing_consistency", "warmup_cosine",
    ],
    "moelab.memory": [
        "BACKENDS", "Intermediate", "MODELLED_BACKENDS", "MemoryEstimate", "MemoryMeasurement", "StepMemory",
        "analytic", "compare", "format_bytes", "measure", "peak_bytes", "plot_duplication", "plot_memory",
        "waste_table", "format_waste",
    ],
    "moelab.bench": [
        "COLUMNS", "DEFAULT_BACKENDS", "DEFAULT_GRID", "available_memory", "calibrate", "compare_backends",
        "crossover_points", "crossovers_from_sweep", "environment", "load", "plot_memory", "plot_speedup_map",
        "plot_time", "resolve_budget", "save", "summary", "sweep", "useful_flops", "layout_sweep",
        "plot_layout_sweep", "fastest_layouts",
    ],
    "moelab.hf": [
        "FAMILIES", "HFMoELayer", "INSTALL_HINT", "compare_with_transformers", "copy_weights", "family_of",
        "find_moe_layers", "from_transformers", "inspect_each_backend", "is_transformers_model",
        "moe_config_from_block", "moelab_backends", "parity_table", "plot_tokens_per_expert_by_layer",
        "registered_name", "require_transformers", "steps_side_by_side", "tiny_model", "to_transformers",
        "tokens_per_expert_by_layer", "transformers_backends", "transformers_config", "transformers_experts",
    ],
    "moelab.widgets": [
        "BackendExplorer", "DEFAULT_BUDGET_BYTES", "TraceStepper", "TrainingExplorer", "crossovers", "estimate_peak_bytes", "guard",
        "local_sweep", "probed_peak_bytes", "quiet_stderr", "seq_len_points",
    ],
    "moelab.inspection": ["Call", "InspectionWarning", "Step", "StepCallback", "Trace", "inspect", "register_adapter"],
    "moelab.backends": ["ExpertsInterface", "eager_experts", "batched_mm_experts", "grouped_mm_experts", "auto_experts",
                        "CrossoverTable", "DEFAULT_CROSSOVERS", "force_fallback", "grouped_linear", "matmul_path",
                        "release_workspace", "use_workspace", "workspace_bytes"],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_the_public_api_imports(module_name):
    module = importlib.import_module(module_name)
    missing = [name for name in PUBLIC[module_name] if not hasattr(module, name)]
    assert not missing, f"{module_name} lost {missing}"
    exported = getattr(module, "__all__", None)
    if exported is not None and module_name != "moelab.backends":
        assert sorted(set(PUBLIC[module_name]) - set(exported)) == [], f"{module_name}.__all__ dropped names"
    for name in PUBLIC[module_name]:
        assert getattr(module, name) is not None
