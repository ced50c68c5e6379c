"""CommonsenseQA five-way multiple choice as a `Task` (spec sections 4.2 and 4.5).

Format (STaR): the context lists the choices with lower-case letters,

  Q: What do people use to absorb extra ink from a fountain pen?
  Answer Choices:
  (a) shirt pocket
  ...
  (e) blotter
  A:

and a completion is a one-line rationale ending "Therefore, the answer is blotter (e).". The
rationalization hint appends ` (CORRECT)` to the gold choice line.

Extraction is not STaR's "character [-3] of the first line", which breaks on any change of
punctuation or spacing. `extract_answer` looks, after the last "answer is" / "answer:" (any case),
for a parenthesised letter a-e on the same line ("... answer is blotter (e).", "answer is (B)"), or
a bare letter that is all the rest of the line ("answer: B"). Failing that, a line ending in "(x)"
or "(x)." counts ("(e)." is the direct-answer format). A completion that names two different
letters at the deciding place (the rest of the marker's line, or the lines ending in a letter) is
ambiguous and gives None: wrongly kept rationales would be
trained on, a missed one only costs a sample.

Data: HF-layout jsonl (`id`, `question`, `question_concept`, `choices` {label, text},
`answerKey`); the original layout (`question` {stem, choices [{label, text}]}) is accepted too.
Splits: "validation" (the 1221-question dev split, `dev_rand_split.jsonl`) and an optional
"train" (`train_rand_split.jsonl`, 9741 questions) that the user supplies. The official test split
has no public answers, so "test" and "dev" are aliases of "validation", as in STaR.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from starjax.data.tasks import Example, Task

ENV_DATA_DIR = "STARJAX_DATA_DIR"
HOMEPAGE = "https://github.com/jonathanherzig/commonsenseqa"
HF_DATASET = "tau/commonsense_qa"  # The HF layout; its "validation" split is dev_rand_split.
LABELS = ("a", "b", "c", "d", "e")
# File names accepted for each split, first match wins.
SPLIT_FILES: dict[str, tuple[str, ...]] = {
  "train": ("train_rand_split.jsonl", "train.jsonl"),
  "validation": ("dev_rand_split.jsonl", "validation.jsonl", "dev.jsonl"),
}
SPLIT_ALIASES = {"dev": "validation", "test": "validation"}
HINT = " (CORRECT)"

_LETTER = r"([a-eA-E])"
_MARKER_RE = re.compile(r"\banswer\s*(?:is\b|:)", re.I)
_PAREN_RE = re.compile(rf"\(\s*{_LETTER}\s*\)")
# After a marker: the rest of the line is one letter ("B", "(b).") or starts with "b)".
_BARE_RE = re.compile(rf"^\s*\(?{_LETTER}\)?\s*[.!]?\s*$|^\s*{_LETTER}\)\s")
_LINE_END_RE = re.compile(rf"\({_LETTER}\)\s*\.?\s*$")


def _unique(letters: Sequence[str]) -> str | None:
  distinct = {x.lower() for x in letters}
  return distinct.pop() if len(distinct) == 1 else None


def extract_answer(completion: str) -> str | None:
  """The chosen letter ("a".."e") in a completion; None if missing or ambiguous."""
  text = completion.split("\nQ:", 1)[0]  # Never read into a following few-shot question.
  for marker in reversed(list(_MARKER_RE.finditer(text))):
    tail = text[marker.end():].split("\n", 1)[0]
    letters = _PAREN_RE.findall(tail)
    if letters:
      return _unique(letters)
    bare = _BARE_RE.match(tail)
    if bare:
      return (bare.group(1) or bare.group(2)).lower()
  # No marker: lines ending in "(x)" decide, and every "(x)" on such a line must agree.
  line_letters = [x for line in text.splitlines() if _LINE_END_RE.search(line)
                  for x in _PAREN_RE.findall(line)]
  return _unique(line_letters) if line_letters else None


def canonical_letter(answer: str) -> str:
  """"A", "(a)", " a " -> "a"."""
  return answer.strip().strip("()").strip().lower()


def _choices(row: dict[str, Any]) -> tuple[str, list[tuple[str, str]], str]:
  """(stem, [(label, text)], concept) from the HF or the original layout."""
  question = row["question"]
  if isinstance(question, dict):  # Original layout.
    stem, raw, concept = question["stem"], question["choices"], question.get("question_concept", "")
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
      raise ValueError("question.choices must be a list of {label, text} objects")
    pairs = [(c["label"], c["text"]) for c in raw]
  else:  # HF layout.
    stem, raw, concept = question, row["choices"], row.get("question_concept", "")
    if not isinstance(raw, dict):
      raise ValueError("choices must be an object {label: [...], text: [...]}")
    labels, texts = raw["label"], raw["text"]
    if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
      raise ValueError("choices.label and choices.text must be lists of equal length")
    pairs = list(zip(labels, texts))
  if not isinstance(stem, str) or not stem.strip():
    raise ValueError("the question stem must be a non-empty string")
  if not isinstance(concept, str):
    raise ValueError("question_concept must be a string")
  return stem, pairs, concept


def parse_row(row: dict[str, Any]) -> dict[str, Any]:
  """A jsonl row -> {"id", "question", "concept", "choice_labels", "choice_texts", "answer_key"}.

  Choices are sorted by label, labels and the answer key lower-cased.

  Raises:
    ValueError, KeyError or TypeError: for a malformed row (read_jsonl reports it and goes on).
  """
  stem, pairs, concept = _choices(row)
  if not all(isinstance(label, str) and isinstance(text, str) and text.strip()
             for label, text in pairs):
    raise ValueError("choice labels and texts must be non-empty strings")
  pairs = sorted((label.strip().lower(), text.strip()) for label, text in pairs)
  labels = tuple(label for label, _ in pairs)
  if labels != LABELS:
    raise ValueError(f"expected choices labelled A-E, got {[label.upper() for label in labels]}")
  key, ex_id = row["answerKey"], row["id"]
  if not isinstance(key, str) or canonical_letter(key) not in LABELS:
    raise ValueError(f"answerKey must be one of A-E, got {key!r}")
  if not isinstance(ex_id, str) or not ex_id:
    raise ValueError("id must be a non-empty string")
  return {"id": ex_id, "question": stem.strip(), "concept": concept,
          "choice_labels": list(labels), "choice_texts": [text for _, text in pairs],
          "answer_key": canonical_letter(key)}


def example_from_record(record: dict[str, Any]) -> Example:
  """A decoded builder record (or parsed jsonl row plus index) -> Example."""
  return Example(id=record["id"], question=record["question"], answer=record["answer_key"],
                 meta={"labels": tuple(record["choice_labels"]),
                       "choices": tuple(record["choice_texts"]),
                       "concept": record["concept"], "index": int(record["index"])})


# Few-shot exemplars: (question, choices a-e, answer letter, rationale). Written for starjax, not
# taken from CommonsenseQA or the STaR prompt files; a test checks that each rationale extracts to
# its answer and that no question occurs in the CommonsenseQA files.
EXEMPLARS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
  ("Where would you keep a carton of milk so that it stays cold overnight?",
   ("pantry", "refrigerator", "oven", "mailbox", "garage shelf"), "b",
   "Milk spoils when it gets warm, and a refrigerator is the appliance made to keep food cold. "
   "Therefore, the answer is refrigerator (b)."),
  ("On a hot afternoon a gardener saw that the leaves of her tomato plants were drooping. What did "
   "the plants most likely need?",
   ("paint", "music", "water", "sand", "a ladder"), "c",
   "Leaves droop on a hot day when a plant loses more water than its roots can take up. "
   "Therefore, the answer is water (c)."),
  ("What does a person usually do right after hearing a very funny joke?",
   ("laugh", "sneeze", "fall asleep", "shiver", "file taxes"), "a",
   "A funny joke amuses the listener, and amused people laugh. "
   "Therefore, the answer is laugh (a)."),
  ("The team captain raised the trophy over his head while the crowd cheered. How did he most "
   "likely feel?",
   ("bored", "proud", "hungry", "lost", "ashamed"), "b",
   "Raising a trophy before a cheering crowd means his team won, and people feel proud of a "
   "victory they worked for. Therefore, the answer is proud (b)."),
  ("Sam wanted to get to the far side of a wide river, but there was no bridge. What could he use "
   "instead?",
   ("umbrella", "ladder", "bicycle", "boat", "blanket"), "d",
   "Without a bridge the river has to be crossed on the water, and a boat floats and carries "
   "people across water. Therefore, the answer is boat (d)."),
  ("What do you need to open a locked front door from the outside?",
   ("spoon", "pillow", "candle", "stamp", "key"), "e",
   "A lock opens only with the key that fits it, so you need that key to open the locked door. "
   "Therefore, the answer is key (e)."),
  ("To listen to music on a crowded train without bothering the other passengers, what should you "
   "wear?",
   ("headphones", "gloves", "sunglasses", "a scarf", "boots"), "a",
   "Headphones play the sound into your own ears only, so the other passengers do not hear it. "
   "Therefore, the answer is headphones (a)."),
)


def _resolve_split(split: str) -> str:
  split = SPLIT_ALIASES.get(split, split)
  if split not in SPLIT_FILES:
    raise ValueError(f"commonsense_qa has splits {list(SPLIT_FILES)} (and aliases "
                     f"{SPLIT_ALIASES}), not {split!r}.")
  return split


class CommonsenseQATask(Task):
  """CommonsenseQA with STaR's prompt format, the ` (CORRECT)` hint and robust extraction.

  Args:
    data_dir: folder with the split files named in `SPLIT_FILES` (dev at least; train is optional
      and must be supplied by the user). Default: `$STARJAX_DATA_DIR/commonsenseqa`. Not needed
      when the TFDS dataset is already prepared.
    tfds_dir: where the TFDS dataset is prepared (default `$STARJAX_TFDS_DIR` or
      `~/tensorflow_datasets`).
    use_tfds: load through the TFDS builder; with False the jsonl files are parsed directly.
    n_few_shot: how many of the `EXEMPLARS` `few_shot` uses (0 for none).
  """

  name = "commonsense_qa"
  stop = ("\n\nQ:", "\nQ:", "\n\n")

  def __init__(self, data_dir: str | os.PathLike[str] | None = None, *,
               tfds_dir: str | os.PathLike[str] | None = None, use_tfds: bool = True,
               n_few_shot: int = len(EXEMPLARS), train_from_dev: int = 0):
    """See the class docstring; `train_from_dev` > 0 is a pipeline check without the train file:
    "train" becomes that many seeded-random dev questions and "validation" the disjoint rest."""
    if not 0 <= n_few_shot <= len(EXEMPLARS):
      raise ValueError(f"n_few_shot must be in [0, {len(EXEMPLARS)}], got {n_few_shot}")
    if train_from_dev < 0:
      raise ValueError(f"train_from_dev must be >= 0, got {train_from_dev}")
    self.train_from_dev = train_from_dev
    if data_dir is None and os.environ.get(ENV_DATA_DIR):
      data_dir = Path(os.environ[ENV_DATA_DIR]) / "commonsenseqa"
    self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
    self.tfds_dir = tfds_dir
    self.use_tfds = use_tfds
    self.n_few_shot = n_few_shot
    self._cache: dict[str, list[Example]] = {}

  def _missing_split_error(self, split: str) -> FileNotFoundError:
    where = "no data_dir was given" if self.data_dir is None else f"{self.data_dir} has none"
    return FileNotFoundError(
      f"CommonsenseQA {split!r} needs one of {list(SPLIT_FILES[split])} (HF-layout jsonl), but "
      f"{where}. Pass data_dir= or set ${ENV_DATA_DIR} to a folder holding commonsenseqa/; "
      f"the data is available from {HOMEPAGE} or the Hugging Face dataset {HF_DATASET}.")

  def load(self, split: str) -> list[Example]:
    split = _resolve_split(split)
    if self.train_from_dev and split in ("train", "validation"):
      dev = self._load_split("validation")
      if self.train_from_dev >= len(dev):
        raise ValueError(f"train_from_dev={self.train_from_dev} leaves no validation questions "
                         f"(dev has {len(dev)}).")
      order = np.random.default_rng(0).permutation(len(dev))
      take = set(order[:self.train_from_dev].tolist())
      return [ex for i, ex in enumerate(dev) if (i in take) == (split == "train")]
    return self._load_split(split)

  def _load_split(self, split: str) -> list[Example]:
    if split not in self._cache:
      self._cache[split] = self._load_tfds(split) if self.use_tfds else self._load_jsonl(split)
    return list(self._cache[split])

  def _load_tfds(self, split: str) -> list[Example]:
    from starjax.data import builders  # pylint: disable=g-import-not-at-top

    if self.data_dir is None and not builders.is_prepared(builders.CommonsenseQA,
                                                          tfds_dir=self.tfds_dir):
      raise self._missing_split_error(split)
    builder = builders.prepare(builders.CommonsenseQA, manual_dir=self.data_dir,
                               tfds_dir=self.tfds_dir)
    if split not in builder.info.splits:
      raise self._missing_split_error(split)
    return [example_from_record(r) for r in builders.load_split(builder, split)]

  def _load_jsonl(self, split: str) -> list[Example]:
    from starjax.data import jsonl  # pylint: disable=g-import-not-at-top

    path = (None if self.data_dir is None else
            jsonl.find_split_files(self.data_dir, SPLIT_FILES).get(split))
    if path is None:
      raise self._missing_split_error(split)
    rows, _ = jsonl.read_jsonl(path, parse_row)
    return [example_from_record({"index": r.line - 1, **r.value}) for r in rows]

  def _lines(self, ex: Example, hint: bool) -> str:
    gold = self.canonical(ex.answer)
    lines = [f"Q: {ex.question}", "Answer Choices:"]
    for label, text in zip(ex.meta["labels"], ex.meta["choices"], strict=True):
      mark = HINT if hint and label == gold else ""
      lines.append(f"({label}) {text}{mark}")
    lines.append("A:")
    return "\n".join(lines)

  def hint_leaked(self, ex: Example, completion: str) -> bool:
    return HINT.strip().lower() in completion.lower()

  def prompt(self, ex: Example) -> str:
    return self._lines(ex, hint=False)

  def prompt_with_hint(self, ex: Example) -> str:
    return self._lines(ex, hint=True)

  def canonical(self, answer: str) -> str:
    return canonical_letter(answer)

  def extract_answer(self, completion: str) -> str | None:
    return extract_answer(completion)

  def few_shot(self, *, hint: bool = False) -> str:
    parts = []
    for question, choices, answer, rationale in EXEMPLARS[:self.n_few_shot]:
      ex = Example(id="", question=question, answer=answer,
                   meta={"labels": LABELS, "choices": choices})
      parts.append(f"{self._lines(ex, hint)} {rationale}\n\n")
    return "".join(parts)

  def direct_completion(self, ex: Example) -> str:
    """The answer alone (`A: (e).`), for the direct fine-tuning baseline."""
    return f" ({self.canonical(ex.answer)})."
