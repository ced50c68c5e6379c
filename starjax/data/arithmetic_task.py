"""n-digit addition as a `Task` (the scratchpad format lives in `arithmetic`)."""

from __future__ import annotations

from collections.abc import Sequence

from starjax.data import arithmetic
from starjax.data.tasks import Example, Task


def _problem(ex: Example) -> arithmetic.Problem:
  return arithmetic.Problem(ex.meta["a"], ex.meta["b"])


def to_example(p: arithmetic.Problem) -> Example:
  return Example(id=f"{p.a}+{p.b}", question=f"{p.a} + {p.b}", answer=str(p.answer),
                 meta={"a": p.a, "b": p.b, "digits": p.digits})


SCRATCH = arithmetic.SCRATCH_OPEN + "\n"


class ArithmeticTask(Task):
  """Addition with a scratchpad; train and test problems are disjoint; OOD digit counts for eval.

  The model learns the format from training data, not from in-context exemplars, so `few_shot`
  is empty: with a model trained from scratch the seed set plays the role of the paper's
  few-shot prompt. Prompts end with "<scratch>\n", which asks for a rationale the way the
  paper's scratchpad exemplars do; answer-only examples (seed set) use the bare prompt.
  """

  name = "arithmetic"
  stop = ("\n\n", "\nInput:")

  def __init__(self, *, digits: Sequence[int] = (1, 2, 3, 4, 5), n_train_per_digit: int = 2000,
               n_test_per_digit: int = 100, ood_digits: Sequence[int] = (6, 7, 8), seed: int = 0):
    self._splits = arithmetic.make_splits(seed, digits=tuple(digits),
                                          n_train_per_digit=n_train_per_digit,
                                          n_test_per_digit=n_test_per_digit,
                                          ood_digits=tuple(ood_digits))

  def load(self, split: str) -> list[Example]:
    if split not in self._splits:
      raise ValueError(f"arithmetic has splits {sorted(self._splits)}, not {split!r}.")
    return [to_example(p) for p in self._splits[split]]

  def prompt(self, ex: Example) -> str:
    return arithmetic.prompt(_problem(ex)) + SCRATCH

  def prompt_with_hint(self, ex: Example) -> str:
    return arithmetic.prompt_with_hint(_problem(ex)) + SCRATCH

  def canonical(self, answer: str) -> str:
    return answer.strip()

  def extract_answer(self, completion: str) -> str | None:
    value = arithmetic.extract_answer(SCRATCH + completion)
    return None if value is None else str(value)

  def group(self, ex: Example) -> str:
    return str(ex.meta["digits"])

  def reference_completion(self, ex: Example) -> str:
    return arithmetic.scratchpad(_problem(ex))[len(SCRATCH):]

  def direct_completion(self, ex: Example) -> str:
    return arithmetic.direct_answer(_problem(ex))
