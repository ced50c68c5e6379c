"""Digit-index ("Abacus") embeddings: each digit's place within its number, from the tokens alone.

After McLeish et al. 2024 ("Transformers Can Do Arithmetic with the Right Embeddings"). A digit
token gets index i when it is the i-th digit of its number, counted from the left; every other
token gets 0. A number is a run of digit tokens, optionally separated by separator tokens (the
spaces of "4 5 6"); any other token ends it. The model adds a learned embedding of the index to
the token embedding, so "the digit of the previous line with my index" is a content match that
does not depend on how wide the numbers are, which absolute or rotary positions cannot give a
small model trained only on narrow numbers.

Unlike McLeish et al., who write numbers least significant digit first, the index here counts
from the left (the STaR scratchpad writes numbers most significant first, and the index must be
known when a digit is generated), so equal indices line up equal place values only between
numbers of equal width, which is the case of the demo's operands.

Training adds a random offset per example to every nonzero index (`ModelConfig.digit_offset`),
so indices beyond the widths seen in training are still trained; inference uses offset 0.

The index depends on earlier tokens only, so it is computed causally: over a whole sequence by
cumulative sums (`digit_index`), and token by token from a per-row run length (`digit_step`),
which is what the sampler carries through its decode loop.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from starjax.models.config import ModelConfig

Array = Any  # jax or numpy arrays: the same functions serve the device and the host pipeline.


def _is(tokens: Array, ids: tuple[int, ...], xp: Any) -> Array:
  if not ids:
    return xp.zeros(tokens.shape, bool)
  return xp.isin(tokens, xp.asarray(ids, dtype=tokens.dtype))


def digit_index(cfg: ModelConfig, tokens: Array, offset: Array | int = 0,
                segment_ids: Array | None = None) -> tuple[Array, Array]:
  """Digit indices of a token sequence, and each row's run length after its last token.

  Args:
    cfg: the model config (its `digit_ids` and `digit_separator_ids`).
    tokens: int (..., T) token ids (numpy or jax).
    offset: added to every nonzero index; broadcastable to `tokens` (e.g. one value per example).
    segment_ids: optional (..., T) ids of packed examples; a change of segment ends a number.

  Returns:
    (index (..., T) int32 with 0 for non-digits, run length (...,) int32 after the last token).
  """
  xp = np if isinstance(tokens, np.ndarray) else jnp
  is_digit = _is(tokens, cfg.digit_ids, xp)
  ends = ~is_digit & ~_is(tokens, cfg.digit_separator_ids, xp)
  first = None
  if segment_ids is not None:  # A packed example's first token starts afresh.
    first = xp.concatenate([xp.zeros(segment_ids.shape[:-1] + (1,), bool),
                            segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    ends = ends | first
  count = xp.cumsum(is_digit.astype(np.int32), axis=-1)
  # Run length = digits so far minus the digit count at the last token that ended a number.
  at_end = xp.where(ends, count, 0)
  if first is not None:  # The run restarts *before* a segment's first token, which may be a digit.
    at_end = xp.where(first, count - is_digit.astype(np.int32), at_end)
  last_end = (np.maximum.accumulate(at_end, axis=-1) if xp is np
              else jax.lax.cummax(at_end, axis=at_end.ndim - 1))
  run = count - last_end
  index = xp.where(is_digit, run + xp.asarray(offset, np.int32), 0)
  return index.astype(np.int32), run[..., -1].astype(np.int32)


def digit_step(cfg: ModelConfig, tokens: Array, run: Array) -> tuple[Array, Array]:
  """One token per row: (index, new run length) from the run length before it (jax arrays)."""
  is_digit = _is(tokens, cfg.digit_ids, jnp)
  is_sep = _is(tokens, cfg.digit_separator_ids, jnp)
  new_run = jnp.where(is_digit, run + 1, jnp.where(is_sep, run, 0)).astype(jnp.int32)
  return jnp.where(is_digit, new_run, 0).astype(jnp.int32), new_run


def example_offsets(segment_ids: np.ndarray, rng: np.random.Generator, max_offset: int
                    ) -> np.ndarray:
  """A random offset in [0, max_offset] per packed example (per segment of each row), (B, T)."""
  shape = segment_ids.shape[:-1] + (segment_ids.shape[-1] + 1,)  # Segment ids < T + 1.
  draws = rng.integers(0, max_offset + 1, size=shape)
  return np.take_along_axis(draws, segment_ids.astype(np.int64), axis=-1).astype(np.int32)
