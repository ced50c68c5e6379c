"""Training corpora for `python -m starjax.train`: task name -> (train, eval) examples.

Each builder takes the tokenizer plus keyword arguments from the config's `data` section (checked
against the builder's signature, so a misspelt key is an error) and returns tokenized
`batching.Example`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from starjax.data import arithmetic, arithmetic_task
from starjax.train.batching import Example


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: list[Example]
  eval: list[Example]


def _encode_example(tok, prompt: str, completion: str, completion_only: bool) -> Example:
  p = tok.encode(prompt, add_bos=True)
  c = tok.encode(completion, add_eos=True)
  mask = [0 if completion_only else 1] * len(p) + [1] * len(c)
  return Example(p + c, mask)


def arithmetic_corpus(tok, *, digits: Sequence[int] = (1, 2, 3),
                      n_train_per_digit: int = 2000, n_eval_per_digit: int = 50,
                      rationale_fraction: float = 1.0, completion_only: bool = False,
                      seed: int = 0) -> Corpus:
  """n-digit addition with scratchpads (or direct answers for 1 - rationale_fraction of them)."""
  splits = arithmetic.make_splits(seed, digits=tuple(digits), n_train_per_digit=n_train_per_digit,
                                  n_test_per_digit=n_eval_per_digit, ood_digits=())
  rng = np.random.default_rng(seed)

  def encode(problems):
    use_rationale = rng.random(len(problems)) < rationale_fraction
    completions = [arithmetic.scratchpad(p) if r else arithmetic.direct_answer(p)
                   for p, r in zip(problems, use_rationale)]
    return [_encode_example(tok, arithmetic.prompt(p), c, completion_only)
            for p, c in zip(problems, completions)]

  return Corpus(train=encode(splits["train"]), eval=encode(splits["test"]))


def text_files_corpus(tok, *, train_files: Sequence[str], eval_files: Sequence[str] = (),
                      eval_fraction: float = 0.05, seed: int = 0) -> Corpus:
  """Plain text files; each blank-line-separated paragraph is one example."""
  def read(files):
    docs = []
    for f in files:
      path = Path(f)
      if not path.is_file():
        raise FileNotFoundError(f"data.train_files/eval_files: no such file {path}")
      docs += [d.strip() + "\n" for d in path.read_text().split("\n\n") if d.strip()]
    return docs

  train_docs = read(train_files)
  eval_docs = read(eval_files)
  if not eval_docs:
    order = np.random.default_rng(seed).permutation(len(train_docs))
    n_eval = max(1, int(len(train_docs) * eval_fraction))
    eval_docs = [train_docs[i] for i in order[:n_eval]]
    train_docs = [train_docs[i] for i in order[n_eval:]]
  def enc(doc: str) -> Example:
    ids = tok.encode(doc, add_bos=True, add_eos=True)
    return Example(ids, [1] * len(ids))

  return Corpus(train=[enc(d) for d in train_docs], eval=[enc(d) for d in eval_docs])


def gsm8k_text_corpus(tok, *, data_dir: str | None = None, n_train: int | None = None,
                      n_eval: int | None = 200) -> Corpus:
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

  return Corpus(train=docs("train", n_train), eval=docs("test", n_eval))


def arithmetic_seed_corpus(tok, *, rationale_digits: Sequence[int] = (1, 2),
                           n_rationale_per_digit: int = 300, hint_fraction: float = 0.3,
                           answer_digits: Sequence[int] = (1, 2, 3, 4, 5),
                           n_answer_per_digit: int = 300, n_test_per_digit: int = 100,
                           rationale_widths: Sequence[int] = (),
                           scaffold_digits: Sequence[int] = (), n_scaffold_per_digit: int = 0,
                           seed: int = 0) -> Corpus:
  """The seed set of the STaR arithmetic demo (the analogue of the paper's few-shot prompt).

  Scratchpad rationales only for `rationale_digits`; a `hint_fraction` of them also appear with
  the answer as a hint after "Target:" (like the paper's answer-key prompts, so the model can
  rationalize); answer-only problems for every digit count in `answer_digits`. Problems come from
  the train side of `arithmetic.make_splits(seed, ..., n_test_per_digit)`, so they never overlap
  the STaR task's test split when it uses the same seed and test size. Loss on completions only.
  The eval side holds scratchpads for every answer digit count (a held-out probe).

  `rationale_widths` writes each seed rationale with its operands zero-padded to a width drawn
  uniformly from those widths that fit it ("0 2 9 + 0 5 7" for 29 + 57 at width 3). The scratchpad
  then has the layout of a wider problem but only the arithmetic of a 1-2 digit one: every column
  beyond the problem's own digits adds 0 + 0 + carry. A model trained from scratch on 1-2 digit
  scratchpads alone never writes a correct wider one (it has seen the layout at two widths only),
  so STaR would have nothing to bootstrap from; a pretrained LM brings such format knowledge.

  `scaffold_digits` adds `scaffold_example`s for those digit counts: scratchpads whose layout and
  copies are trained but whose arithmetic (each line's new sum digit and carry) is masked from the
  loss and comes from a different problem. They teach how a wider scratchpad is laid out
  (copy the operands, drop one digit of each per line), the format knowledge a pretrained LM
  brings, and nothing about adding those digits.
  """
  task = arithmetic_task.ArithmeticTask(digits=(1,), n_train_per_digit=1, n_test_per_digit=1)
  digits = sorted(set(rationale_digits) | set(answer_digits))
  n_train = n_rationale_per_digit + n_answer_per_digit
  splits = arithmetic.make_splits(seed, digits=digits, n_train_per_digit=n_train,
                                  n_test_per_digit=n_test_per_digit, ood_digits=())
  rng = np.random.default_rng([seed, 7])
  by_digit: dict[int, list] = {}
  for p in splits["train"]:
    by_digit.setdefault(p.digits, []).append(p)
  train = []
  for d, problems in by_digit.items():
    problems = [problems[i] for i in rng.permutation(len(problems))]
    n_rat = min(n_rationale_per_digit, len(problems)) if d in rationale_digits else 0
    for p in problems[:n_rat]:
      hinted = rng.random() < hint_fraction
      fits = [w for w in rationale_widths if w >= p.digits]
      width = int(rng.choice(fits)) if fits else None
      prompt = (arithmetic.prompt_with_hint(p, width) if hinted else arithmetic.prompt(p, width))
      scratch = arithmetic.scratchpad(p, width)
      train.append(_encode_example(tok, prompt + arithmetic_task.SCRATCH,
                                   scratch[len(arithmetic_task.SCRATCH):], True))
    if d in answer_digits:
      for p in problems[n_rat:n_rat + n_answer_per_digit]:
        train.append(_encode_example(tok, arithmetic.prompt(p), arithmetic.direct_answer(p), True))
  scaffold_rng = np.random.default_rng([seed, 11])
  for d in scaffold_digits:
    drawn = arithmetic.sample_problems(scaffold_rng, d, 2 * n_scaffold_per_digit,
                                       exclude=set(splits["test"]))
    for p, q in zip(drawn[::2], drawn[1::2]):
      train.append(scaffold_example(tok, p, q))
  order = rng.permutation(len(train))
  evals = [_encode_example(tok, task.prompt(ex), task.reference_completion(ex), True)
           for ex in map(arithmetic_task.to_example,
                         splits["test"][:: max(1, len(splits["test"]) // 64)])]
  return Corpus(train=[train[i] for i in order], eval=evals)


def scaffold_segments(p: arithmetic.Problem, other: arithmetic.Problem) -> list[tuple[str, bool]]:
  """p's prompt and scratchpad with `other`'s arithmetic, as (text, trained) pieces.

  The sum states come from `other` (same digit count), so the text holds no correct sum of p's
  digits. Trained: everything a copy or the format determines, i.e. the operand lines
  ("4 5 + 7 8 , "), the sum digits carried over from the line above, "C: ", the result and answer
  lines (copies of the final state), tags and line breaks. Not trained: the prompt and the two
  outcomes of an addition on each line, the new sum digit and the carry.
  """
  if p.digits != other.digits:
    raise ValueError(f"{p} and {other} have different digit counts")
  mine, theirs = arithmetic.scratch_lines(p), arithmetic.scratch_lines(other)
  pieces = [(arithmetic.prompt(p) + arithmetic_task.SCRATCH, False), (mine[0] + "\n", True)]
  for own, their in zip(mine[1:-1], theirs[1:-1]):
    head = own[:own.index(", ") + 2]  # "{a rest} + {b rest} , " or ", " on the final line.
    tail = their[len(head):]  # "{new digit} {digits so far} C: {carry}"
    pieces += [(head, True), (tail[0], False), (tail[1:-1], True), (tail[-1], False), ("\n", True)]
  pieces += [(f"{theirs[-1]}\n{arithmetic.SCRATCH_CLOSE}\n"
              f"{arithmetic.format_number(other.answer)}\n", True)]
  return pieces


def scaffold_example(tok, p: arithmetic.Problem, other: arithmetic.Problem) -> Example:
  """`scaffold_segments` tokenized piece by piece (exact for the byte tokenizer), BOS + EOS."""
  tokens, mask = [tok.bos_id], [0]
  for text, trained in scaffold_segments(p, other):
    ids = tok.encode(text)
    tokens += ids
    mask += [int(trained)] * len(ids)
  return Example(tokens + [tok.eos_id], mask + [1])


BUILDERS: dict[str, Callable[..., Corpus]] = {
    "arithmetic": arithmetic_corpus,
    "arithmetic_seed": arithmetic_seed_corpus,
    "text_files": text_files_corpus,
    "gsm8k_text": gsm8k_text_corpus,
}
