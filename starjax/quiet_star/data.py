"""Quiet-STaR training text: a corpus's documents as one token stream, cut into windows of L.

Quiet-STaR scores a thought at every position, so rows hold contiguous text with no padding and no
segment boundaries: the documents of a `starjax.data.corpora` corpus (GSM8K solutions, user text
files, ...) are concatenated in order, each keeping its BOS/EOS, and the stream is cut into
non-overlapping windows of `seq_len` tokens (the tail shorter than a window is dropped). Batches
come from `starjax.train.loop.RowSource`, so the windows of step s depend only on (seed, s).

Importing this module also registers the corpus "gsm8k_text" (GSM8K worked solutions as plain
text) in `starjax.data.corpora.BUILDERS`, so the warm-up phase (a `starjax.train` run) and the
Quiet-STaR phase read the same documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from starjax.data import corpora
from starjax.train.batching import Example


def gsm8k_text_corpus(tok, *, data_dir: str | None = None, n_train: int | None = None,
                      n_eval: int | None = 200) -> corpora.Corpus:
  """GSM8K worked solutions as plain text, one example (document) per problem.

  A document is the GSM8K task's prompt and gold completion, `Q: {question}\nA: {solution}\n
  #### N\n`, with BOS and EOS and loss on every token. Train documents are the first `n_train`
  problems of the train split (all if None), eval documents the first `n_eval` of the test split.
  `data_dir` (a folder with train.jsonl and test.jsonl) defaults to `$STARJAX_DATA_DIR/gsm8k`.
  """
  from starjax.data import gsm8k  # pylint: disable=g-import-not-at-top

  task = gsm8k.Gsm8kTask(data_dir, use_tfds=False)

  def docs(split: str, n: int | None) -> list[Example]:
    out = []
    for ex in task.load(split)[:n]:
      ids = tok.encode(task.prompt(ex) + task.reference_completion(ex) + "\n", add_bos=True,
                       add_eos=True)
      out.append(Example(ids, [1] * len(ids)))
    return out

  return corpora.Corpus(train=docs("train", n_train), eval=docs("test", n_eval))


corpora.BUILDERS.setdefault("gsm8k_text", gsm8k_text_corpus)


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
