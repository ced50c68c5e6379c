"""The task interface STaR, repeated sampling and evaluation are written against.

A task knows how to turn an example into a prompt (with or without the answer as a hint), how to
pull the final answer out of a generated completion, and how to check it. Few-shot exemplars are
part of the task so that prompts used for generation and the hint-free text saved for fine-tuning
are built by one piece of code.

STaR saves `prompt(ex) + completion` for a kept rationale, also when the completion was produced
from `prompt_with_hint(ex)`: the saved text never contains the hint by construction.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Example:
  """One task example.

  Attributes:
    id: stable identifier (used for PRNG streams and bookkeeping across iterations).
    question: the problem, in the task's own words (no "Q:" prefix).
    answer: the gold final answer as a canonical string.
    rationale: a gold rationale when the dataset has one (GSM8K); STaR never trains on it.
    meta: task specific fields (choices for multiple choice, digit count for arithmetic).
  """

  id: str
  question: str
  answer: str
  rationale: str | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task(abc.ABC):
  """A reasoning task: prompts, answer extraction and checking."""

  name: str = "task"
  # Strings that end a generated completion (e.g. the start of the next few-shot question).
  stop: tuple[str, ...] = ("\n\n",)

  @abc.abstractmethod
  def load(self, split: str) -> list[Example]:
    """The examples of `split` ("train", "test", ...)."""

  @abc.abstractmethod
  def prompt(self, ex: Example) -> str:
    """The context the model continues, without few-shot exemplars or hint."""

  @abc.abstractmethod
  def prompt_with_hint(self, ex: Example) -> str:
    """`prompt` with the gold answer given as a hint (STaR rationalization)."""

  @abc.abstractmethod
  def extract_answer(self, completion: str) -> str | None:
    """The final answer in a completion, canonicalised; None if there is none."""

  def canonical(self, answer: str) -> str:
    """Canonical form of a gold or extracted answer (override for numbers, letters...)."""
    return answer.strip()

  def is_correct(self, ex: Example, completion: str) -> bool:
    got = self.extract_answer(completion)
    return got is not None and got == self.canonical(ex.answer)

  def few_shot(self, *, hint: bool = False) -> str:
    """Exemplars prepended to generation prompts ('' when the model needs none)."""
    del hint
    return ""

  def hint_leaked(self, ex: Example, completion: str) -> bool:
    """Whether a completion generated with the hint repeats the hint's own text."""
    del ex, completion
    return False

  def group(self, ex: Example) -> str:
    """Bucket for per-group metrics (digit count for arithmetic, '' for one group)."""
    del ex
    return ""

  def reference_completion(self, ex: Example) -> str | None:
    """A gold completion in the task's rationale format, when one is known."""
    del ex
    return None


def accuracy_by_group(task: Task, examples: Sequence[Example],
                      completions: Sequence[str]) -> dict[str, float]:
  """Fraction correct per `task.group`, plus "all"."""
  totals: dict[str, list[int]] = {}
  for ex, c in zip(examples, completions, strict=True):
    ok = int(task.is_correct(ex, c))
    for g in (task.group(ex), "all"):
      totals.setdefault(g, [0, 0])
      totals[g][0] += ok
      totals[g][1] += 1
  return {g: hits / n for g, (hits, n) in sorted(totals.items())}
