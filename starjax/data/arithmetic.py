"""n-digit addition with a scratchpad: the STaR arithmetic task (spec section 4.2).

One example is a prompt followed by a completion:

  Input:
  2 9 + 5 7
  Target:
  <scratch>
  2 9 + 5 7 , C: 0
  2 + 5 , 6 C: 1
  , 8 6 C: 0
  0 8 6
  </scratch>
  8 6

Numbers are written digit by digit, separated by single spaces. Inside the scratchpad, the first
line repeats the operands with the starting carry. Then comes one line per digit pair, right to
left, skipping the rightmost pair. Each of these lines shows the operands that are still to be
added (each one's digits left of the pairs already done) and the state *before* the next pair is
added: the sum digits so far, each followed by a space, and the carry. So a line is the previous
line with the last digit of each operand dropped, and the digit pair to add next always sits at
the end of each operand (the layout of Nye et al. 2021 that STaR's `gen_sums.py` writes):

  4 5 6 + 7 8 9 , C: 0
  4 5 + 7 8 , 5 C: 1
  4 + 7 , 4 5 C: 1
  , 2 4 5 C: 1
  1 2 4 5

The line `, {digits} C: {carry}` gives the state after the last pair, and `{carry} {digits}` is
the full result with its carry digit. This last line is the rationalization hint.

Conventions that this module fixes (the reference `gen_sums.py` leaves them open):

* A completion ends with exactly one "\\n". Examples are joined with `EXAMPLE_SEPARATOR` ("\\n"), so
  consecutive examples are separated by a blank line, as in the reference ("{sum}\\n\\n").
* Unequal operand lengths: the operand line shows both numbers unpadded. In the step lines, the
  shorter operand is left-padded with zeros to the longer one's length, so both remaining parts
  have the same length. For example, 99 + 1 has the step line `9 + 0 , 0 C: 1`, and 5 + 123 has
  `0 0 + 1 2 , 8 C: 0`. The reference samples equal lengths only, and so does `sample_problems`.
* 1-digit problems have no step lines: operand line, `, {digit} C: {carry}`, `{carry} {digit}`.
* Operands with d digits are drawn from [10^(d-1), 10^d), so 1-digit operands are 1..9 (81
  problems). Problems are ordered pairs: 2 + 5 and 5 + 2 are different problems.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

SCRATCH_OPEN = "<scratch>"
SCRATCH_CLOSE = "</scratch>"
EXAMPLE_SEPARATOR = "\n"  # Joins full examples; each already ends with "\n".

_NUMBER_RE = re.compile(r"[0-9](?:[ \t]*[0-9])*")
_DIGITS = r"[0-9](?: [0-9])*"
_HEADER_RE = re.compile(rf"({_DIGITS}) \+ ({_DIGITS}) , C: ([0-9])")
_STEP_RE = re.compile(rf"({_DIGITS}) \+ ({_DIGITS}) , ((?:[0-9] )*)C: ([0-9])")
_FINAL_RE = re.compile(r", ((?:[0-9] )*)C: ([0-9])")
# A hint is a digits-only line right after "Target:" and before the completion, which is either a
# scratchpad or a (digits-only) direct answer.
_HINT_RE = re.compile(r"^Target:\n[ 0-9]*[0-9][ 0-9]*\n(?=<scratch>$|[ 0-9]*[0-9][ 0-9]*$)", re.M)


@dataclasses.dataclass(frozen=True)
class Problem:
  """An addition problem a + b of non-negative integers."""

  a: int
  b: int

  def __post_init__(self):
    for name in ("a", "b"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Problem.{name} must be an int, got {value!r}")
      if value < 0:
        raise ValueError(f"Problem.{name} must be non-negative, got {value}")
      object.__setattr__(self, name, int(value))  # Normalise numpy ints.

  @property
  def answer(self) -> int:
    return self.a + self.b

  @property
  def digits(self) -> int:
    """Digit count of the longer operand."""
    return max(len(str(self.a)), len(str(self.b)))


@dataclasses.dataclass(frozen=True)
class Step:
  """One middle scratchpad line: the operand digits still to add and the state before them."""

  a_digits: tuple[int, ...]  # What is left of the first operand (zero-padded), most significant first.
  b_digits: tuple[int, ...]
  sum_digits: tuple[int, ...]  # Sum digits so far, most significant first.
  carry: int

  @property
  def pair(self) -> tuple[int, int]:
    """The digit pair this line adds next: the last remaining digit of each operand."""
    return self.a_digits[-1], self.b_digits[-1]


@dataclasses.dataclass(frozen=True)
class Scratchpad:
  """A parsed, verified scratchpad.

  Attributes:
    a: first operand, from the operand line.
    b: second operand.
    steps: the middle lines, in order (right to left over the digit pairs).
    sum_digits: final sum digits without the carry digit, most significant first.
    carry: final carry.
    answer: the number on the line after `</scratch>`, or None if that line is absent.
  """

  a: int
  b: int
  steps: tuple[Step, ...]
  sum_digits: tuple[int, ...]
  carry: int
  answer: int | None

  @property
  def total(self) -> int:
    """The sum that the scratchpad computes (carry digit included)."""
    return int("".join(str(d) for d in (self.carry, *self.sum_digits)))


# --------------------------------------------------------------------------------------------------
# Numbers.


def format_number(n: int) -> str:
  """Writes a non-negative integer digit by digit: 86 -> "8 6"."""
  n = int(n)
  if n < 0:
    raise ValueError(f"negative numbers are not supported: {n}")
  return " ".join(str(n))


def parse_number(s: str) -> int | None:
  """Parses digits separated by any amount of spaces or tabs ("8 6", " 8  6 ", "86").

  Returns None for anything else: empty text, signs, letters, punctuation.
  """
  s = s.strip()
  if not _NUMBER_RE.fullmatch(s):
    return None
  return int(re.sub(r"[ \t]", "", s))


def _digit_list(n: int) -> list[int]:
  return [int(c) for c in str(n)]


def _spaced(digits: Iterable[int]) -> str:
  return " ".join(str(d) for d in digits)


def _running(digits: Iterable[int]) -> str:
  """Sum digits as they appear before "C:" in the reference: each followed by a space."""
  return "".join(f"{d} " for d in digits)


# --------------------------------------------------------------------------------------------------
# Formatting.


def _width(p: Problem, width: int | None) -> int:
  if width is None:
    return p.digits
  if width < p.digits:
    raise ValueError(f"width={width} is narrower than {p.a} + {p.b} ({p.digits} digits)")
  return width


def _padded(n: int, width: int | None) -> str:
  """`format_number` with leading zeros up to `width` digits: (86, 3) -> "0 8 6"."""
  return format_number(n) if width is None else " ".join(str(n).zfill(width))


def scratch_lines(p: Problem, width: int | None = None) -> list[str]:
  """The lines strictly between `<scratch>` and `</scratch>` (operands zero-padded to `width`)."""
  n = _width(p, width)
  a_pad = [0] * (n - len(str(p.a))) + _digit_list(p.a)
  b_pad = [0] * (n - len(str(p.b))) + _digit_list(p.b)
  lines = [f"{_padded(p.a, width)} + {_padded(p.b, width)} , C: 0"]
  carry = 0
  sum_digits: list[int] = []
  for k in range(n):  # k-th pair from the right.
    i = n - 1 - k
    if k > 0:
      lines.append(f"{_spaced(a_pad[:i + 1])} + {_spaced(b_pad[:i + 1])} , "
                   f"{_running(sum_digits)}C: {carry}")
    s = a_pad[i] + b_pad[i] + carry
    carry = s // 10
    sum_digits.insert(0, s % 10)
  lines.append(f", {_running(sum_digits)}C: {carry}")
  lines.append(" ".join(str(d) for d in [carry, *sum_digits]))
  return lines


def prompt(p: Problem, width: int | None = None) -> str:
  """The text the model is given: "Input:\\n{a} + {b}\\nTarget:\\n".

  `width` writes both operands with leading zeros to that many digits (a seed-data augmentation:
  the layout of a wider scratchpad with the arithmetic of a narrow problem); the answer line is
  never padded.
  """
  _width(p, width)
  return f"Input:\n{_padded(p.a, width)} + {_padded(p.b, width)}\nTarget:\n"


def scratchpad(p: Problem, width: int | None = None) -> str:
  """The rationale + answer completion: "<scratch>\\n...\\n</scratch>\\n{sum}\\n"."""
  body = "\n".join(scratch_lines(p, width))
  return f"{SCRATCH_OPEN}\n{body}\n{SCRATCH_CLOSE}\n{format_number(p.answer)}\n"


def direct_answer(p: Problem) -> str:
  """The answer-only completion: "{sum}\\n"."""
  return f"{format_number(p.answer)}\n"


def example(p: Problem, *, rationale: bool = True) -> str:
  """A full example: prompt + scratchpad (or prompt + direct answer)."""
  return prompt(p) + (scratchpad(p) if rationale else direct_answer(p))


def hint(p: Problem, width: int | None = None) -> str:
  """The rationalization hint: the last scratch line, "{carry} {digits}" (e.g. "0 8 6")."""
  return scratch_lines(p, width)[-1]


def prompt_with_hint(p: Problem, width: int | None = None) -> str:
  """The rationalization prompt: the hint line inserted right after "Target:"."""
  return f"{prompt(p, width)}{hint(p, width)}\n"


def strip_hint(text: str) -> str:
  """Removes rationalization hints from prompt + completion text (one or many examples).

  A hint is a digits-only line right after a "Target:" line that is followed by a `<scratch>` line
  or by a digits-only answer line. So `strip_hint(prompt_with_hint(p) + c) == prompt(p) + c` for any
  completion `c` that starts with a scratchpad or a direct answer, and unhinted text is returned
  unchanged. A bare hinted prompt with no completion is ambiguous with a direct-answer example
  ("Target:\\n1 9 8\\n") and is left as is.
  """
  return _HINT_RE.sub("Target:\n", text)


# --------------------------------------------------------------------------------------------------
# Parsing and checking.


def extract_answer(completion: str) -> int | None:
  """The predicted sum in a completion (the text generated after the prompt).

  With a scratchpad, this is the number on the line right after the first `</scratch>`. Text after
  that line is ignored. Without any scratch tag, it is the number on the first line (a direct
  answer). Returns None for malformed output: an opened but unclosed scratchpad (truncated), a
  missing or empty answer line, or an answer line that is not a digits-and-spaces number (letters,
  a sign, trailing words).
  """
  if SCRATCH_CLOSE in completion:
    after = completion.split(SCRATCH_CLOSE, 1)[1].lstrip(" \t")
    if not after.startswith("\n"):
      return None
    line = after[1:].split("\n", 1)[0]
  elif SCRATCH_OPEN in completion:
    return None
  else:
    line = completion.split("\n", 1)[0]
  return parse_number(line)


def is_correct(p: Problem, completion: str) -> bool:
  """Whether the completion's extracted answer equals a + b."""
  return extract_answer(completion) == p.answer


def _add(pair: tuple[int, int], digits: tuple[int, ...], carry: int) -> tuple[tuple[int, ...], int]:
  s = pair[0] + pair[1] + carry
  return (s % 10, *digits), s // 10


def _split_digits(running: str) -> tuple[int, ...]:
  return tuple(int(c) for c in running.split())


def parse_scratchpad(text: str) -> Scratchpad:
  """Parses a generated scratchpad and checks that every line follows from the previous one.

  Args:
    text: a completion ("<scratch>\\n...\\n</scratch>\\n{sum}\\n") or a full example. The first
      `<scratch>` line is parsed. If an "Input:" block precedes it, its operand line must match
      the scratchpad's. The answer line after `</scratch>` is optional, but if present it must be
      a number equal to the computed sum.

  Returns:
    The parsed `Scratchpad`.

  Raises:
    ValueError: on a missing tag or line, a line with the wrong shape, or a state that does not
      follow from the previous line. The message quotes the offending line.
  """
  lines = text.split("\n")
  try:
    start = lines.index(SCRATCH_OPEN)
  except ValueError:
    raise ValueError(f"no {SCRATCH_OPEN!r} line") from None
  try:
    end = lines.index(SCRATCH_CLOSE, start + 1)
  except ValueError:
    raise ValueError(f"no {SCRATCH_CLOSE!r} line after {SCRATCH_OPEN!r}") from None
  body = lines[start + 1 : end]
  if not body:
    raise ValueError("empty scratchpad")

  header = body[0]
  m = _HEADER_RE.fullmatch(header)
  if m is None:
    raise ValueError(f"bad operand line: {header!r}")
  if m.group(3) != "0":
    raise ValueError(f"initial carry must be 0 in operand line {header!r}")
  a_digits, b_digits = _split_digits(m.group(1)), _split_digits(m.group(2))
  for name, ds in (("first", a_digits), ("second", b_digits)):
    if len(ds) > 1 and ds[0] == 0:
      raise ValueError(f"{name} operand has a leading zero: {header!r}")
  a = int("".join(map(str, a_digits)))
  b = int("".join(map(str, b_digits)))
  n = max(len(a_digits), len(b_digits))
  a_pad = (0,) * (n - len(a_digits)) + a_digits
  b_pad = (0,) * (n - len(b_digits)) + b_digits

  # The operand line of a preceding "Input:" block, if any, must agree.
  inputs = [i for i in range(start) if lines[i] == "Input:"]
  if inputs and inputs[-1] + 1 < start:
    operand_line = lines[inputs[-1] + 1]
    if operand_line != f"{m.group(1)} + {m.group(2)}":
      raise ValueError(f"operand line {operand_line!r} does not match scratchpad {header!r}")

  def line_at(idx: int, what: str) -> str:
    if idx >= len(body):
      raise ValueError(f"missing {what} before {SCRATCH_CLOSE!r}")
    return body[idx]

  digits: tuple[int, ...] = ()
  carry = 0
  pair = (a_pad[n - 1], b_pad[n - 1])
  steps = []
  for k in range(1, n):
    line = line_at(k, f"step line {k} of {n - 1}")
    sm = _STEP_RE.fullmatch(line)
    if sm is None:
      raise ValueError(f"bad step line: {line!r}")
    got = (_split_digits(sm.group(3)), int(sm.group(4)))
    want = _add(pair, digits, carry)
    if got != want:
      raise ValueError(f"state does not follow from the previous line: {line!r}, expected {want}")
    rest = (_split_digits(sm.group(1)), _split_digits(sm.group(2)))
    if rest != (a_pad[: n - k], b_pad[: n - k]):
      raise ValueError(f"remaining operand digits do not match the operands: {line!r}")
    digits, carry = got
    steps.append(Step(rest[0], rest[1], digits, carry))
    pair = steps[-1].pair

  line = line_at(n, "final state line")
  fm = _FINAL_RE.fullmatch(line)
  if fm is None:
    raise ValueError(f"bad final state line: {line!r}")
  got = (_split_digits(fm.group(1)), int(fm.group(2)))
  want = _add(pair, digits, carry)
  if got != want:
    raise ValueError(f"state does not follow from the previous line: {line!r}, expected {want}")
  digits, carry = got

  line = line_at(n + 1, "result line")
  if line != " ".join(str(d) for d in (carry, *digits)):
    raise ValueError(f"result line does not match the final state: {line!r}")
  if len(body) > n + 2:
    raise ValueError(f"unexpected line before {SCRATCH_CLOSE!r}: {body[n + 2]!r}")

  result = Scratchpad(a, b, tuple(steps), digits, carry, answer=None)
  answer_line = lines[end + 1] if end + 1 < len(lines) else ""
  if answer_line:
    answer = parse_number(answer_line)
    if answer is None:
      raise ValueError(f"bad answer line: {answer_line!r}")
    if answer != result.total:
      raise ValueError(f"answer line {answer_line!r} does not match the scratchpad sum")
    result = dataclasses.replace(result, answer=answer)
  return result


# --------------------------------------------------------------------------------------------------
# Data sets.


def _operand_range(digits: int) -> tuple[int, int]:
  """[lo, hi) of d-digit operands, as in the reference: 1-digit operands are 1..9."""
  if digits < 1:
    raise ValueError(f"digits must be >= 1, got {digits}")
  return 10 ** (digits - 1), 10**digits


def _as_pair(item: Problem | tuple[int, int]) -> tuple[int, int]:
  if isinstance(item, Problem):
    return item.a, item.b
  a, b = item
  return int(a), int(b)


def _draw_pairs(rng: np.random.Generator, digits: int, size: int) -> list[tuple[int, int]]:
  """`size` uniform (a, b) pairs of d-digit operands (with repetition)."""
  lo, hi = _operand_range(digits)
  if digits <= 18:  # Fits in int64.
    draws = rng.integers(lo, hi, size=(size, 2))
    return [(int(x), int(y)) for x, y in draws]
  # Digit by digit: the leading digit in 1..9, the others in 0..9, is uniform on [lo, hi).
  lead = rng.integers(1, 10, size=(size, 2))
  rest = rng.integers(0, 10, size=(size, 2, digits - 1))
  return [
    tuple(int(str(lead[i, j]) + "".join(map(str, rest[i, j]))) for j in range(2))
    for i in range(size)
  ]


def sample_problems(
  rng: np.random.Generator,
  digits: int,
  n: int,
  *,
  exclude: set[Problem] | set[tuple[int, int]] | None = None,
) -> list[Problem]:
  """Samples `n` distinct problems with two d-digit operands, uniformly without replacement.

  Args:
    rng: numpy generator; the result is a deterministic function of its state.
    digits: operand digit count d; operands are uniform on [10^(d-1), 10^d).
    n: number of problems.
    exclude: problems (or (a, b) pairs) that must not be returned.

  Returns:
    `n` distinct problems in sampling order.

  Raises:
    ValueError: if fewer than `n` problems are available.
  """
  if n < 0:
    raise ValueError(f"n must be non-negative, got {n}")
  lo, hi = _operand_range(digits)
  excluded = {_as_pair(x) for x in exclude} if exclude else set()
  n_excluded = sum(1 for a, b in excluded if lo <= a < hi and lo <= b < hi)
  capacity = (hi - lo) ** 2 - n_excluded
  if n > capacity:
    raise ValueError(f"asked for {n} {digits}-digit problems, only {capacity} are available")

  if capacity <= 4 * n:  # Dense: enumerate (cheap, since capacity is small) and shuffle.
    pool = [(a, b) for a in range(lo, hi) for b in range(lo, hi) if (a, b) not in excluded]
    order = rng.permutation(len(pool))[:n]
    return [Problem(*pool[i]) for i in order]

  chosen: dict[tuple[int, int], None] = {}  # Insertion-ordered set.
  while len(chosen) < n:
    for pair in _draw_pairs(rng, digits, max(2 * (n - len(chosen)), 16)):
      if pair not in excluded and pair not in chosen:
        chosen[pair] = None
        if len(chosen) == n:
          break
  return [Problem(a, b) for a, b in chosen]


def split_sizes(digits: int, n_train: int, n_test: int) -> tuple[int, int]:
  """Train/test sizes for one digit count, capped so that disjoint splits exist.

  If n_train + n_test exceeds the number of d-digit problems (only 81 for d = 1), the test split
  keeps its size up to half of the problems and train gets what is left, up to n_train. With the
  defaults of `make_splits` (2000/100), d = 1 gives 41 train and 40 test problems.
  """
  lo, hi = _operand_range(digits)
  capacity = (hi - lo) ** 2
  if n_train + n_test <= capacity:
    return n_train, n_test
  test = min(n_test, capacity // 2)
  return min(n_train, capacity - test), test


def make_splits(
  seed: int,
  digits: Sequence[int] = (1, 2, 3, 4, 5),
  n_train_per_digit: int = 2000,
  n_test_per_digit: int = 100,
  ood_digits: Sequence[int] = (6, 7, 8),
) -> dict[str, list[Problem]]:
  """Train, in-distribution test and out-of-distribution test problems.

  Each (digit count, split) pair draws from its own stream, `np.random.default_rng([seed, d, k])`.
  So a test set depends only on `seed` and its own size, and not on the train size. Train is
  sampled after test and excludes it, so the two share no (a, b) pair. Sizes are capped by
  `split_sizes` where a digit count has too few problems. Lists are grouped by digit count, in the
  order given; shuffle before training.

  Returns:
    {"train": ..., "test": ..., "ood_test": ...}. "ood_test" has `n_test_per_digit` problems
    (capped at the available count) for each of `ood_digits`.
  """
  if set(digits) & set(ood_digits):
    raise ValueError(f"digits {digits} and ood_digits {ood_digits} overlap")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  splits: dict[str, list[Problem]] = {"train": [], "test": [], "ood_test": []}
  for d in digits:
    n_train, n_test = split_sizes(d, n_train_per_digit, n_test_per_digit)
    test = sample_problems(np.random.default_rng([seed, d, 0]), d, n_test)
    train = sample_problems(np.random.default_rng([seed, d, 1]), d, n_train, exclude=set(test))
    splits["test"] += test
    splits["train"] += train
  for d in ood_digits:
    _, n_ood = split_sizes(d, 0, n_test_per_digit)
    splits["ood_test"] += sample_problems(np.random.default_rng([seed, d, 2]), d, n_ood)
  return splits


def corpus_text(
  problems: Sequence[Problem], *, rationale_fraction: float, rng: np.random.Generator
) -> list[str]:
  """Full examples (prompt + completion) for pretraining or fine-tuning text.

  Exactly round(rationale_fraction * len(problems)) examples, chosen at random, get a scratchpad;
  the others get a direct answer. Join the examples with `EXAMPLE_SEPARATOR`.
  """
  if not 0.0 <= rationale_fraction <= 1.0:
    raise ValueError(f"rationale_fraction must be in [0, 1], got {rationale_fraction}")
  n_rationale = round(rationale_fraction * len(problems))
  with_rationale = np.zeros(len(problems), dtype=bool)
  with_rationale[rng.permutation(len(problems))[:n_rationale]] = True
  return [example(p, rationale=bool(r)) for p, r in zip(problems, with_rationale, strict=True)]
