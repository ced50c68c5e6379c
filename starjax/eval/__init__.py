"""Evaluation: repeated sampling, unbiased pass@k, majority vote, Best-of-k, coverage fits, plots.

Modules:
  passk: estimators (pass@k, majority vote, Best-of-k) and the exponentiated power-law fit.
  plots: coverage plots written atomically as PNG.
  checkpoints: params (only) from a `python -m starjax.train` workdir.
  repeated: `run_repeated_sampling` and the `python -m starjax.eval.repeated` command line.

`repeated` and `checkpoints` are imported lazily (on first attribute access), so that running
`python -m starjax.eval.repeated` does not import the module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

from starjax.eval.passk import (
    best_of_k,
    fit_power_law,
    majority_accuracy,
    majority_vote,
    pass_at_k,
    pass_at_k_curve,
    power_law,
)
from starjax.eval.plots import plot_coverage

_LAZY = {
    "run_repeated_sampling": "starjax.eval.repeated",
    "score_samples": "starjax.eval.repeated",
    "load_params_from_workdir": "starjax.eval.checkpoints",
}

__all__ = [
    "best_of_k", "fit_power_law", "load_params_from_workdir", "majority_accuracy",
    "majority_vote", "pass_at_k", "pass_at_k_curve", "plot_coverage", "power_law",
    "run_repeated_sampling", "score_samples",
]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'starjax.eval' has no attribute {name!r}")
