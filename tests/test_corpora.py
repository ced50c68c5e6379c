"""Tests for starjax.data.corpora: the seed set of the STaR arithmetic demo."""

from __future__ import annotations

from starjax import tokenizers
from starjax.data import arithmetic, arithmetic_task, corpora

TOK = tokenizers.load_tokenizer("byte")


def _texts(corpus):
  return [(TOK.decode([t for t, m in zip(e.tokens, e.loss_mask) if not m]),
           TOK.decode([t for t, m in zip(e.tokens, e.loss_mask) if m])) for e in corpus.train]


def _operands(prompt: str) -> tuple[str, str]:
  line = prompt.split("Input:\n", 1)[1].split("\n", 1)[0]
  a, b = line.split(" + ")
  return a.replace(" ", ""), b.replace(" ", "")


def test_seed_rationales_only_for_seed_digits_and_disjoint_from_test():
  c = corpora.arithmetic_seed_corpus(TOK, n_rationale_per_digit=30, n_answer_per_digit=10,
                                     n_test_per_digit=40, rationale_widths=(1, 2, 3, 4, 5))
  task = arithmetic_task.ArithmeticTask(digits=(1, 2, 3, 4, 5), n_train_per_digit=10,
                                        n_test_per_digit=40, seed=0)
  test_ids = {ex.id for ex in task.load("test")}
  widths, n_answer = set(), 0
  for prompt, completion in _texts(c):
    a, b = _operands(prompt)
    problem = arithmetic.Problem(int(a), int(b))
    assert f"{problem.a}+{problem.b}" not in test_ids
    if completion.startswith("<scratch>") or "<scratch>" in prompt:
      assert problem.digits <= 2, prompt  # Rationales only for 1-2 digit problems ...
      widths.add(len(a))  # ... written at every width (zero-padded).
      assert arithmetic.extract_answer("<scratch>\n" + completion) == problem.answer
      # The answer line is never padded.
      assert completion.rsplit("</scratch>\n", 1)[1] == arithmetic.direct_answer(problem)
    else:
      n_answer += 1
      assert completion == arithmetic.direct_answer(problem)
  assert widths == {1, 2, 3, 4, 5}
  assert n_answer == 10 * 5


def test_seed_without_widths_is_unpadded():
  c = corpora.arithmetic_seed_corpus(TOK, n_rationale_per_digit=20, n_answer_per_digit=0,
                                     answer_digits=(), n_test_per_digit=10)
  for prompt, _ in _texts(c):
    a, b = _operands(prompt)
    assert not a.startswith("0") or a == "0"
    assert len(a) <= 2
