"""moelab.training: how an MoE learns, a trainer small enough to read in one sitting, and the analyses of its runs.

- `config`: `TrainingConfig`, the knobs of a run, and the guard on its size (MAX_TOKENS, MAX_BATCH_TOKENS);
- `schedule`: `warmup_cosine`, linear warmup then cosine decay, as a torch LambdaLR;
- `trainer`: `Trainer`, AdamW with gradient accumulation and clipping, the expert-bias update, validation,
  checkpoints that resume bit for bit;
- `history`: the columns of the history, one row per optimizer step, as a pandas DataFrame;
- `analysis`: routing statistics over tensors and histories (balance, specialisation, token-id routing);
- `plots`: pictures of them;
- `collapse`: `tilt_router`, router collapse by construction; `probe`: `route_batches`, held-out routing;
- `recipes`: `balancing_run`, `specialisation_run`, the seeded runs of the notebooks and tests.

Imports `moelab.models`, `moelab.data`, `moelab.layer`, `moelab.memory` and `moelab.core` (it sits between
`parallel`, whose ExpertParallelTrainer subclasses `Trainer`, and `models` in pyproject.toml's import-linter
layers).
"""

from .analysis import *  # noqa: F403 (the names in analysis.__all__)
from .analysis import __all__ as _analysis_all
from .config import MAX_BATCH_TOKENS, MAX_TOKENS, TrainingConfig
from .history import BASE_COLUMNS
from .plots import *  # noqa: F403
from .plots import __all__ as _plots_all
from .schedule import warmup_cosine, warmup_cosine_factor
from .trainer import Trainer
from .collapse import tilt_router
from .probe import RoutingSample, route_batches
from .recipes import METHODS, Run, balancing_run, specialisation_run, tiny_moe_lm

__all__ = ["Trainer", "TrainingConfig", "MAX_TOKENS", "MAX_BATCH_TOKENS", "warmup_cosine", "warmup_cosine_factor",
           "BASE_COLUMNS", "tilt_router", "RoutingSample", "route_batches", "METHODS", "Run", "balancing_run",
           "specialisation_run", "tiny_moe_lm", *_analysis_all, *_plots_all]
