"""Metrics logging: JSON lines (for scripts and plots) plus TensorBoard (for browsing).

Files under the workdir:

* ``metrics.jsonl``: one ``{"step": step, **metrics}`` object per ``write`` call.
* ``samples.jsonl``: one ``{"step": step, "tag": tag, "text": text}`` object per ``write_text``.
* ``tb/``: tensorboardX event files with the same scalars and texts.

Non-finite floats (NaN, +-inf) are written to JSON as ``null`` so every line stays strict JSON
(``json.loads`` in any language); TensorBoard still receives the raw value.

On resume, ``truncate_after(step)`` drops lines logged after the restored checkpoint so re-run
steps are not duplicated; it rewrites through a temporary file and ``os.replace``, so a crash
leaves either the old or the new file, never a half-written one. Only process 0 writes; on
other processes every method is a no-op, so values must already be host values or replicated
arrays (gather others first with ``starjax.parallel.multihost.to_host``, on every process).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"

log = logging.getLogger(__name__)


def _to_json_scalar(name: str, value: Any) -> int | float | bool | str | None:
  """Converts a scalar metric to a JSON-safe Python value (non-finite floats -> None)."""
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, int):
    return value
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"Metric {name!r} must be a scalar, got shape {arr.shape}.")
  item = arr.reshape(()).item()
  if isinstance(item, bool):
    return item
  if isinstance(item, int):
    return item
  item = float(item)
  return item if math.isfinite(item) else None


def _parse_lines(path: Path) -> tuple[list[dict], int]:
  """Parses a JSON-lines file; returns (records, number of unparsable lines skipped)."""
  records, bad = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        bad += 1  # Typically a partial last line from a crash.
        continue
      if isinstance(record, dict):
        records.append(record)
      else:
        bad += 1
  return records, bad


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Reads a JSON-lines metrics file (or ``path/metrics.jsonl`` for a workdir).

  Blank and unparsable lines (e.g. a partial line left by a crash) are skipped.
  """
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  return _parse_lines(path)[0]


class MetricsWriter:
  """Appends scalar metrics and text samples to JSON lines and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    """Creates ``workdir`` if needed; existing log files are appended to, never cleared.

    Args:
      workdir: Run directory holding ``metrics.jsonl``, ``samples.jsonl`` and ``tb/``.
      enabled: If False (or on processes other than 0) every method is a no-op.
    """
    self._workdir = Path(workdir)
    self._active = enabled and jax.process_index() == 0
    self._files: dict[str, Any] = {}
    self._tb = None  # Opened lazily so a resume's truncate_after can set purge_step first.
    self._purge_step: int | None = None
    if self._active:
      self._workdir.mkdir(parents=True, exist_ok=True)

  @property
  def active(self) -> bool:
    """Whether this writer actually writes (enabled and process 0)."""
    return self._active

  @property
  def metrics_path(self) -> Path:
    return self._workdir / METRICS_FILE

  @property
  def samples_path(self) -> Path:
    return self._workdir / SAMPLES_FILE

  def _tensorboard(self) -> Any:
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(
          logdir=str(self._workdir / TB_DIR), purge_step=self._purge_step, flush_secs=30
      )
      self._purge_step = None
    return self._tb

  def _append(self, name: str, record: dict) -> None:
    f = self._files.get(name)
    if f is None:
      f = self._files[name] = open(self._workdir / name, "a", encoding="utf-8")
    f.write(json.dumps(record, allow_nan=False) + "\n")
    f.flush()

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs one line ``{"step": step, **metrics}`` and the numeric scalars to TensorBoard.

    Values may be Python numbers or 0-d / size-1 numpy or jax arrays.
    """
    if not self._active:
      return
    step = int(step)
    record: dict[str, Any] = {"step": step}
    for name, value in metrics.items():
      if name == "step":
        raise ValueError("'step' is reserved for the step number; rename the metric.")
      record[name] = _to_json_scalar(name, value)
    self._append(METRICS_FILE, record)
    tb = self._tensorboard()
    for name, value in metrics.items():
      if value is None or isinstance(value, str):
        continue
      tb.add_scalar(name, float(np.asarray(value).reshape(())), step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Logs a text sample (e.g. a generated rationale) to ``samples.jsonl`` and TensorBoard."""
    if not self._active:
      return
    step = int(step)
    self._append(SAMPLES_FILE, {"step": step, "tag": tag, "text": text})
    self._tensorboard().add_text(tag, text, step)

  def flush(self) -> None:
    """Flushes TensorBoard events (JSON lines are flushed on every write)."""
    if self._tb is not None:
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops logged lines with step > ``step`` (call after restoring a checkpoint at ``step``).

    Each file is rewritten to a temporary file in the same directory and swapped in with
    ``os.replace``; if anything fails the original file is left untouched and the error is
    raised. Unparsable lines (e.g. a partial line from a crash) are dropped too. The next
    TensorBoard event file is opened with ``purge_step=step + 1`` so the viewer discards the
    stale events as well.
    """
    if not self._active:
      return
    step = int(step)
    self._close_files()
    for name in (METRICS_FILE, SAMPLES_FILE):
      path = self._workdir / name
      if path.exists():
        self._rewrite_keeping(path, step)
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._purge_step = step + 1

  @staticmethod
  def _rewrite_keeping(path: Path, step: int) -> None:
    records, bad = _parse_lines(path)
    kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
    if bad == 0 and len(kept) == len(records):
      return  # Nothing to drop: leave the file alone.
    if bad:
      log.warning("Dropping %d unparsable line(s) from %s.", bad, path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
          f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise

  def _close_files(self) -> None:
    for f in self._files.values():
      f.close()
    self._files = {}

  def close(self) -> None:
    """Flushes and closes all files. Idempotent."""
    self._close_files()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
