"""GSM8K grade-school math word problems as a `Task` (spec sections 4.2 and 5).

Format (STaR): the context is `Q: {question}\\nA:` and a completion is a GSM8K-style worked
solution, with calculator annotations `<<a=b>>`, that ends with the line `#### N`:

  Q: A school trip has 4 buses with 45 seats each. ...
  A: The buses have 4 * 45 = <<4*45=180>>180 seats.
  ...
  #### 4

Rationalization hint: ` (N)` after the question, N being only the final number. The STaR
reference inserts the whole `answer` field of the jsonl row instead, i.e. the complete gold
solution, which leaks the rationale into the rationalization prompt; we give the number only.

Answer extraction follows the Large Language Monkeys checker: the first match of
`#### (-?[$0-9.,]+)` (we also accept no space or several spaces after `####`), with ',' and '$'
removed and a trailing '.' dropped. Numbers are compared in canonical form, so "72.0", "72.",
"$72" and "72" are the same answer, and "1,080" equals "1080".

Data: the jsonl files of openai/grade-school-math (`train.jsonl`, 7473 problems, and `test.jsonl`,
1319 problems; STaR's "dev" is this test split). They are not downloaded automatically: put them
in a folder (see `URLS`) and pass it as `data_dir`, or set `STARJAX_DATA_DIR` to a folder holding
`gsm8k/`.
"""

from __future__ import annotations

import decimal
import os
import re
from pathlib import Path
from typing import Any

from starjax.data.tasks import Example, Task

ENV_DATA_DIR = "STARJAX_DATA_DIR"
SPLITS = ("train", "test")
SPLIT_ALIASES = {"dev": "test"}  # STaR reports GSM8K "dev" accuracy on the test split.

# Where the data comes from (MIT license), for users who can download it.
HOMEPAGE = "https://github.com/openai/grade-school-math"
URL_PREFIX = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
              "grade_school_math/data/")
URLS = {split: f"{URL_PREFIX}{split}.jsonl" for split in SPLITS}

_ANSWER_RE = re.compile(r"####[ \t]*(-?[$0-9.,]+)")


def canonical_number(text: str) -> str | None:
  """`text` as a canonical decimal string ("1,080" -> "1080", "72.0" -> "72"); None if no number.

  Commas and '$' are removed and one trailing '.' is dropped, as in the LLMonkeys checker; the
  rest must be a plain decimal number (optional minus sign, digits, at most one point).
  """
  s = text.strip().replace(",", "").replace("$", "")
  s = s.removesuffix(".")
  if not re.fullmatch(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", s):
    return None
  value = decimal.Decimal(s)
  if value == value.to_integral_value():
    return str(int(value))  # Also turns "-0" into "0".
  return format(value.normalize(), "f")


def extract_answer(completion: str) -> str | None:
  """The canonical number after the first `####` in `completion`; None if there is none."""
  m = _ANSWER_RE.search(completion)
  return None if m is None else canonical_number(m.group(1))


def split_solution(answer_field: str) -> tuple[str, str]:
  """Splits a gold GSM8K `answer` field into (rationale, canonical final number).

  Raises:
    ValueError: unless the field ends with exactly one `#### N` line, N a number.
  """
  count = answer_field.count("####")
  if count != 1:
    raise ValueError("answer has no '#### N' line" if count == 0 else
                     f"answer has {count} '####' markers, expected one")
  rationale, final = answer_field.split("####")
  final = final.strip()
  if "\n" in final:
    raise ValueError("answer has text after its '#### N' line")
  number = canonical_number(final)
  if number is None:
    raise ValueError(f"the final answer {final!r} is not a number")
  return rationale.rstrip(), number


def parse_row(row: dict[str, Any]) -> dict[str, str]:
  """A jsonl row {"question", "answer"} -> {"question", "answer", "rationale"}.

  Raises:
    ValueError or KeyError: for a malformed row (read_jsonl reports it and goes on).
  """
  question, answer = row["question"], row["answer"]
  if not isinstance(question, str) or not isinstance(answer, str):
    raise ValueError("fields 'question' and 'answer' must be strings")
  if not question.strip():
    raise ValueError("empty question")
  rationale, number = split_solution(answer)
  return {"question": question.strip(), "answer": number, "rationale": rationale}


def format_completion(rationale: str, answer: str) -> str:
  """The completion that follows "A:": the worked solution and the `#### N` line."""
  return f" {rationale.strip()}\n#### {answer}"


# Few-shot exemplars: (question, rationale, answer). Written for starjax, not taken from GSM8K or
# the STaR prompt files; a test checks that each rationale extracts to its answer, that every
# <<a=b>> annotation is right, and that no question occurs in the GSM8K files.
EXEMPLARS: tuple[tuple[str, str, str], ...] = (
  ("A bakery packs muffins in boxes of 6. On Monday it baked 150 muffins and sold 17 boxes. How "
   "many muffins were left unsold?",
   "The bakery sold 17 * 6 = <<17*6=102>>102 muffins.\n"
   "So 150 - 102 = <<150-102=48>>48 muffins were left unsold.",
   "48"),
  ("Priya reads 12 pages of her book on each weekday and 30 pages on each day of the weekend. How "
   "many pages does she read in 3 weeks?",
   "On the 5 weekdays Priya reads 5 * 12 = <<5*12=60>>60 pages.\n"
   "On the 2 weekend days she reads 2 * 30 = <<2*30=60>>60 pages.\n"
   "Each week she reads 60 + 60 = <<60+60=120>>120 pages.\n"
   "In 3 weeks she reads 3 * 120 = <<3*120=360>>360 pages.",
   "360"),
  ("A garden hose pours 8 liters of water per minute into a 240-liter tank that already holds 40 "
   "liters. How many minutes does it take to fill the tank?",
   "The tank still needs 240 - 40 = <<240-40=200>>200 liters.\n"
   "At 8 liters per minute this takes 200 / 8 = <<200/8=25>>25 minutes.",
   "25"),
  ("Marco buys 3 notebooks for $4 each and a backpack that costs 5 times as much as one notebook. "
   "He pays with a $40 bill. How much change does he get?",
   "The notebooks cost 3 * $4 = $<<3*4=12>>12.\n"
   "The backpack costs 5 * $4 = $<<5*4=20>>20.\n"
   "Marco spends $12 + $20 = $<<12+20=32>>32 in all.\n"
   "His change is $40 - $32 = $<<40-32=8>>8.",
   "8"),
  ("A school trip uses 4 buses with 45 seats each. If 162 students and 14 teachers go on the trip, "
   "how many seats are left empty?",
   "The buses have 4 * 45 = <<4*45=180>>180 seats.\n"
   "There are 162 + 14 = <<162+14=176>>176 people on the trip.\n"
   "So 180 - 176 = <<180-176=4>>4 seats are left empty.",
   "4"),
  ("A jacket costs $80 and is on sale for 25% off. Tom also uses a $6 coupon on the sale price. "
   "How much does Tom pay for the jacket?",
   "The discount is 25/100 * $80 = $<<25/100*80=20>>20.\n"
   "The sale price is $80 - $20 = $<<80-20=60>>60.\n"
   "With the coupon Tom pays $60 - $6 = $<<60-6=54>>54.",
   "54"),
)


def _resolve_split(split: str) -> str:
  split = SPLIT_ALIASES.get(split, split)
  if split not in SPLITS:
    raise ValueError(f"gsm8k has splits {list(SPLITS)} (and aliases {SPLIT_ALIASES}), "
                     f"not {split!r}.")
  return split


def example_from_record(record: dict[str, Any], split: str) -> Example:
  """A decoded builder record (or parsed jsonl row plus index) -> Example."""
  index = int(record["index"])
  return Example(id=f"gsm8k-{split}-{index}", question=record["question"],
                 answer=record["answer"], rationale=record["rationale"],
                 meta={"index": index, "split": split})


class Gsm8kTask(Task):
  """GSM8K with STaR's prompt format, a number-only hint and the LLMonkeys checker.

  Args:
    data_dir: folder with `train.jsonl` and `test.jsonl` (see `URLS`). Default:
      `$STARJAX_DATA_DIR/gsm8k`. Not needed when the TFDS dataset is already prepared.
    tfds_dir: where the TFDS dataset is prepared (default `$STARJAX_TFDS_DIR` or
      `~/tensorflow_datasets`).
    use_tfds: load through the TFDS builder (prepared once as array_record, read with grain). With
      False the jsonl files are parsed directly, which skips importing TFDS; both give the same
      examples in the same order.
    n_few_shot: how many of the `EXEMPLARS` `few_shot` uses (0 for none).
  """

  name = "gsm8k"
  stop = ("\n\nQ:", "\nQ:")

  def __init__(self, data_dir: str | os.PathLike[str] | None = None, *,
               tfds_dir: str | os.PathLike[str] | None = None, use_tfds: bool = True,
               n_few_shot: int = len(EXEMPLARS)):
    if not 0 <= n_few_shot <= len(EXEMPLARS):
      raise ValueError(f"n_few_shot must be in [0, {len(EXEMPLARS)}], got {n_few_shot}")
    if data_dir is None and os.environ.get(ENV_DATA_DIR):
      data_dir = Path(os.environ[ENV_DATA_DIR]) / "gsm8k"
    self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
    self.tfds_dir = tfds_dir
    self.use_tfds = use_tfds
    self.n_few_shot = n_few_shot
    self._cache: dict[str, list[Example]] = {}

  def _missing_data_error(self) -> FileNotFoundError:
    return FileNotFoundError(
      "GSM8K needs its jsonl files: pass data_dir= (a folder with train.jsonl and test.jsonl) or "
      f"set ${ENV_DATA_DIR} to a folder holding gsm8k/. Download them from {URLS['train']} and "
      f"{URLS['test']} (MIT license, {HOMEPAGE}).")

  def load(self, split: str) -> list[Example]:
    split = _resolve_split(split)
    if split not in self._cache:
      self._cache[split] = self._load_tfds(split) if self.use_tfds else self._load_jsonl(split)
    return list(self._cache[split])

  def _load_tfds(self, split: str) -> list[Example]:
    from starjax.data import builders  # pylint: disable=g-import-not-at-top

    if self.data_dir is None and not builders.is_prepared(builders.Gsm8k, tfds_dir=self.tfds_dir):
      raise self._missing_data_error()
    builder = builders.prepare(builders.Gsm8k, manual_dir=self.data_dir, tfds_dir=self.tfds_dir)
    return [example_from_record(r, split) for r in builders.load_split(builder, split)]

  def _load_jsonl(self, split: str) -> list[Example]:
    from starjax.data import jsonl  # pylint: disable=g-import-not-at-top

    if self.data_dir is None:
      raise self._missing_data_error()
    rows, _ = jsonl.read_jsonl(self.data_dir / f"{split}.jsonl", parse_row)
    return [example_from_record({"index": r.line - 1, **r.value}, split) for r in rows]

  def prompt(self, ex: Example) -> str:
    return f"Q: {ex.question}\nA:"

  def prompt_with_hint(self, ex: Example) -> str:
    return f"Q: {ex.question} ({self.canonical(ex.answer)})\nA:"

  def canonical(self, answer: str) -> str:
    number = canonical_number(answer)
    return answer.strip() if number is None else number

  def extract_answer(self, completion: str) -> str | None:
    return extract_answer(completion)

  def few_shot(self, *, hint: bool = False) -> str:
    parts = []
    for question, rationale, answer in EXEMPLARS[:self.n_few_shot]:
      ex = Example(id="", question=question, answer=answer)
      context = self.prompt_with_hint(ex) if hint else self.prompt(ex)
      parts.append(f"{context}{format_completion(rationale, answer)}\n\n")
    return "".join(parts)

  def reference_completion(self, ex: Example) -> str | None:
    if ex.rationale is None:
      return None
    return format_completion(ex.rationale, self.canonical(ex.answer))

  def direct_completion(self, ex: Example) -> str:
    """The answer alone, for the direct (no rationale) fine-tuning baseline."""
    return f" #### {self.canonical(ex.answer)}"
