"""Evaluation: repeated sampling, unbiased pass@k, majority vote, Best-of-k, coverage fits, plots.

Modules:
  passk: estimators (pass@k, majority vote, Best-of-k) and the exponentiated power-law fit.
  plots: coverage plots written atomically as PNG.
  checkpoints: params (only) from a `python -m starjax.train` workdir.
  repeated: `run_repeated_sampling` and the `python -m starjax.eval.repeated` command line.
  soups: uniform and greedy model soups (`python -m starjax.eval.soups --star_workdir=DIR`).

`repeated`, `checkpoints` and `soups` are imported lazily (on first attribute access), so that running
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
    "uniform_soup": "starjax.eval.soups",
    "greedy_soup": "starjax.eval.soups",
    "soup_star_run": "starjax.eval.soups",
}

__all__ = [
    "best_of_k", "fit_power_law", "load_params_from_workdir", "majority_accuracy",
    "greedy_soup", "majority_vote", "pass_at_k", "pass_at_k_curve", "plot_coverage", "power_law",
    "run_repeated_sampling", "score_samples", "soup_star_run", "uniform_soup",
]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'starjax.eval' has no attribute {name!r}")
