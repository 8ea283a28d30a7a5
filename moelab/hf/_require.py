"""The one place `moelab.hf` imports transformers: lazily, with an error that says how to install the extra."""

from __future__ import annotations

import importlib
import sys

INSTALL_HINT = 'pip install -e ".[hf]"  (or: pip install "moelab[hf]"), which installs transformers>=5'
MIN_MAJOR = 5


def require_transformers():
    """Import and return `transformers`; ImportError naming the `hf` extra if it is missing or too old."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as error:
        raise ImportError(f"moelab.hf needs Hugging Face transformers, which is not installed. Install moelab's "
                          f"`hf` extra: {INSTALL_HINT}") from error
    major = int(str(getattr(transformers, "__version__", "0")).split(".")[0] or 0)
    if major < MIN_MAJOR:
        raise ImportError(f"moelab.hf needs transformers>={MIN_MAJOR} (its experts backends and ExpertsInterface), "
                          f"found {transformers.__version__}. Upgrade with: {INSTALL_HINT}")
    return transformers


def transformers_loaded() -> bool:
    """True when transformers is already imported: a model can only be a transformers model then (no import)."""
    return sys.modules.get("transformers") is not None


def experts_registry():
    """transformers' `ExpertsInterface` class and its shared instance `ALL_EXPERTS_FUNCTIONS` (what dispatch reads)."""
    require_transformers()
    moe = importlib.import_module("transformers.integrations.moe")
    return moe.ExpertsInterface, moe.ALL_EXPERTS_FUNCTIONS
