"""Plots of repeated-sampling results, written atomically as PNG files (no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from starjax import utils_io as fileio
from starjax.eval import passk


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
  """Writes `fig` as PNG atomically (temporary file in the same directory, then rename)."""
  FigureCanvasAgg(fig)  # Attach an Agg canvas: no pyplot, no global backend switch.
  with fileio.atomic_writer(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  return Path(path)


def plot_coverage(path: str | os.PathLike, ks: Sequence[int] | np.ndarray,
                  coverage: Sequence[float] | np.ndarray, *,
                  fit: tuple[float, float] | None = None, majority: float | None = None,
                  title: str | None = None) -> Path:
  """Coverage (pass@k) against k on a log-x axis, with the power-law fit and majority vote.

  Args:
    path: output PNG path.
    ks: sample budgets.
    coverage: pass@k for each k.
    fit: (a, b) of c(k) = exp(a k^b), drawn as a dashed curve over the range of ks.
    majority: majority-vote accuracy with all samples, drawn as a horizontal line.
    title: figure title.

  Returns:
    The written path.
  """
  ks = np.asarray(ks, np.float64)
  coverage = np.asarray(coverage, np.float64)
  if ks.ndim != 1 or ks.shape != coverage.shape or ks.size == 0:
    raise ValueError(f"ks {ks.shape} and coverage {coverage.shape} must be 1-D, equal, non-empty.")
  fig = Figure(figsize=(6.0, 4.0))
  ax = fig.add_subplot()
  ax.plot(ks, coverage, "o-" if ks.size <= 64 else "-", ms=3, lw=1.5, label="coverage (pass@k)")
  top = float(np.nanmax(coverage))
  if fit is not None:
    grid = np.geomspace(ks.min(), max(ks.max(), ks.min() * 1.01), 200)
    a, b = fit
    curve = passk.power_law(grid, a, b)
    ax.plot(grid, curve, "--", lw=1.2, label=f"fit exp({a:.3g}·k^{b:.3g})")
    top = max(top, float(np.nanmax(curve)))
  if majority is not None:
    ax.axhline(majority, color="tab:red", ls=":", lw=1.2, label=f"majority vote = {majority:.3f}")
    top = max(top, majority)
  if ks.max() > ks.min():
    ax.set_xscale("log", base=2)
  ax.set_xlabel("samples k")
  ax.set_ylabel("coverage")
  ax.set_ylim(0.0, min(1.02, 1.15 * top + 0.02))  # Zoomed when coverage stays low.
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return save_figure(fig, path)
