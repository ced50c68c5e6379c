"""Turning (tokens, loss mask) examples into padded or packed training rows.

An `Example` is a token list and a same-length 0/1 list marking the tokens the model should learn
to produce (the completion). Row arrays follow next-token prediction: `inputs = seq[:-1]`,
`targets = seq[1:]`, and `loss_mask` is the completion mask of the target token, so prompt tokens
are never predicted.

Padded rows hold one example each. Packed rows concatenate examples; `segment_ids` (1, 2, ...;
0 = padding) keep attention inside each example and `positions` restart at 0 for each one, or
come from a `position_fn` (task-coupled positions, `starjax.models.positions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: Sequence[int]
  loss_mask: Sequence[int]

  def __post_init__(self):
    if len(self.tokens) != len(self.loss_mask):
      raise ValueError(f"tokens ({len(self.tokens)}) and loss_mask ({len(self.loss_mask)}) "
                       "differ in length.")


def fits(ex: Example, seq_len: int) -> bool:
  """Whether the whole example (all its targets, EOS included) fits in one row of seq_len."""
  return len(ex.tokens) - 1 <= seq_len


def completion_example(prompt: Sequence[int], completion: Sequence[int]) -> Example:
  """An example whose loss covers exactly the completion tokens."""
  return Example(list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion))


PositionFn = Callable[[Sequence[Sequence[int]]], Sequence[np.ndarray]]


def _row_arrays(ex: Example, seq_len: int, positions: np.ndarray | None = None
                ) -> dict[str, np.ndarray] | None:
  toks = np.asarray(ex.tokens, np.int32)
  mask = np.asarray(ex.loss_mask, np.float32)
  if len(toks) < 2:
    return None
  n = min(len(toks) - 1, seq_len)
  pos = np.arange(n, dtype=np.int32) if positions is None else np.asarray(positions[:n], np.int32)
  return {"inputs": toks[:n], "targets": toks[1:n + 1], "positions": pos,
          "loss_mask": mask[1:n + 1]}


def _parts(examples: Sequence[Example], seq_len: int, position_fn: PositionFn | None
           ) -> list[dict[str, np.ndarray] | None]:
  positions = (position_fn([ex.tokens for ex in examples]) if position_fn is not None and examples
               else [None] * len(examples))
  return [_row_arrays(ex, seq_len, pos) for ex, pos in zip(examples, positions)]


def _empty_rows(n_rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  return {
      "inputs": np.full((n_rows, seq_len), pad_id, np.int32),
      "targets": np.full((n_rows, seq_len), pad_id, np.int32),
      "positions": np.full((n_rows, seq_len), -1, np.int32),
      "segment_ids": np.zeros((n_rows, seq_len), np.int32),
      "loss_mask": np.zeros((n_rows, seq_len), np.float32),
  }


def pad_rows(examples: Sequence[Example], seq_len: int, pad_id: int, *,
             truncate: bool = True, position_fn: PositionFn | None = None
             ) -> dict[str, np.ndarray]:
  """One example per row, right-padded (padding: position -1, segment 0, mask 0)."""
  for i, ex in enumerate(examples):
    if not truncate and len(ex.tokens) - 1 > seq_len:
      raise ValueError(f"Example {i} has {len(ex.tokens)} tokens; rows hold {seq_len + 1}.")
  parts = [p for p in _parts(examples, seq_len, position_fn) if p is not None]
  rows = _empty_rows(len(parts), seq_len, pad_id)
  for r, p in enumerate(parts):
    n = len(p["inputs"])
    for k, v in p.items():
      rows[k][r, :n] = v
    rows["segment_ids"][r, :n] = 1
  return rows


def pack_rows(examples: Sequence[Example], seq_len: int, pad_id: int, *,
              position_fn: PositionFn | None = None) -> dict[str, np.ndarray]:
  """Greedy first-fit packing in the given order; over-long examples are truncated."""
  parts = [p for p in _parts(examples, seq_len, position_fn) if p is not None]
  layout: list[list[int]] = []
  fill: list[int] = []
  for i, p in enumerate(parts):
    n = len(p["inputs"])
    if fill and fill[-1] + n <= seq_len:
      layout[-1].append(i)
      fill[-1] += n
    else:
      layout.append([i])
      fill.append(n)
  rows = _empty_rows(len(layout), seq_len, pad_id)
  for r, members in enumerate(layout):
    at = 0
    for seg, i in enumerate(members, start=1):
      p = parts[i]
      n = len(p["inputs"])
      for k, v in p.items():
        rows[k][r, at:at + n] = v
      rows["segment_ids"][r, at:at + n] = seg
      at += n
  return rows


def jitter_positions(positions: np.ndarray, rng: np.random.Generator, skip_prob: float
                     ) -> np.ndarray:
  """Randomised positions (after Ruoss et al. 2023): each token skips one position id with
  probability `skip_prob`, i.e. advances by 2 instead of 1.

  Every example still starts at 0 (a 0 in `positions` marks an example's start, as `make_rows`
  writes them) and padding stays -1. The distance between a token and one k tokens back then
  varies from example to example, so a model cannot find the token to copy by a fixed offset
  (what stops a small model from copying numbers wider than those it was trained on), while the
  contiguous positions used at inference stay common locally.
  """
  if skip_prob <= 0:
    return positions
  steps = 1 + (rng.random(positions.shape) < skip_prob)
  cum = np.cumsum(steps, axis=-1)
  cols = np.broadcast_to(np.arange(positions.shape[-1]), positions.shape)
  start = np.maximum.accumulate(np.where(positions == 0, cols, 0), axis=-1)
  out = cum - np.take_along_axis(cum, start, axis=-1)
  return np.where(positions < 0, positions, out).astype(positions.dtype)


def make_rows(examples: Sequence[Example], seq_len: int, pad_id: int, *, pack: bool,
              position_fn: PositionFn | None = None) -> dict[str, np.ndarray]:
  """Packed or padded rows; `position_fn` maps the examples' token lists to their positions."""
  if pack:
    return pack_rows(examples, seq_len, pad_id, position_fn=position_fn)
  return pad_rows(examples, seq_len, pad_id, position_fn=position_fn)
