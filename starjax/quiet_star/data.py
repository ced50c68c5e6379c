"""Quiet-STaR training text: a corpus's documents as one token stream, cut into windows of L.

Quiet-STaR scores a thought at every position, so rows hold contiguous text with no padding and no
segment boundaries: the documents of a `starjax.data.corpora` corpus (GSM8K solutions, user text
files, ...) are concatenated in order, each keeping its BOS/EOS, and the stream is cut into
non-overlapping windows of `seq_len` tokens (the tail shorter than a window is dropped). Batches
come from `starjax.train.loop.RowSource`, so the windows of step s depend only on (seed, s).

The warm-up phase (a `starjax.train` run) and the Quiet-STaR phase read the same corpora, e.g.
"gsm8k_text" (GSM8K worked solutions as plain text) from `starjax.data.corpora.BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from starjax.train.batching import Example


def token_stream(examples: Sequence[Example]) -> np.ndarray:
  """All examples' tokens, concatenated in order (int32)."""
  if not examples:
    return np.zeros((0,), np.int32)
  return np.concatenate([np.asarray(ex.tokens, np.int32) for ex in examples])


def make_windows(examples: Sequence[Example], seq_len: int, max_windows: int | None = None
                 ) -> np.ndarray:
  """Non-overlapping windows (N, seq_len) of the concatenated token stream.

  Raises:
    ValueError: the text holds fewer than `seq_len` tokens.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}.")
  stream = token_stream(examples)
  n = len(stream) // seq_len
  if n == 0:
    raise ValueError(f"The corpus has {len(stream)} tokens, fewer than one window of {seq_len}.")
  if max_windows is not None:
    n = min(n, max_windows)
  return stream[:n * seq_len].reshape(n, seq_len)


def window_rows(windows: np.ndarray) -> dict[str, np.ndarray]:
  """Rows for `RowSource` ("inputs" is the key it counts): tokens, validity and global ids.

  The ids are the window indices; the thought sampler folds them into the step's key, so a
  window's thoughts depend on (seed, step, window) only.
  """
  return {"inputs": np.asarray(windows, np.int32), "mask": np.ones(windows.shape, bool),
          "example_ids": np.arange(len(windows), dtype=np.int32)}


def as_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """RowSource rows -> the Quiet-STaR batch {"tokens", "mask", "example_ids"}."""
  return {"tokens": rows["inputs"], "mask": rows["mask"], "example_ids": rows["example_ids"]}
