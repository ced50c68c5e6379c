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


def test_scratch_layout_keeps_the_layout_and_drops_all_arithmetic():
  for p in [arithmetic.Problem(345, 678), arithmetic.Problem(3, 8), arithmetic.Problem(99999, 1)]:
    layout = corpora.scratch_layout(p).split("\n")
    scratch = arithmetic.scratchpad(p).split("\n")[1:]  # Without "<scratch>".
    body = scratch[:scratch.index("</scratch>")]
    assert layout[len(body)] == "</layout>"
    assert layout[0] == body[0]  # The operand line is a copy.
    for got, want in zip(layout[1:len(body) - 1], body[1:-1]):
      assert len(got) == len(want)  # Same layout, character for character ...
      assert got.split(",")[0] == want.split(",")[0]  # ... the same digit pair ...
      assert not any(ch.isdigit() for ch in got.split(",")[-1])  # ... and no sum or carry.
    assert layout[len(body) - 1] == " ".join("_" * len(body[-1].split()))  # "{carry} {sum}".


def test_layout_examples_cover_their_digit_counts():
  c = corpora.arithmetic_seed_corpus(TOK, n_rationale_per_digit=0, answer_digits=(),
                                     n_test_per_digit=10, layout_digits=(3, 5),
                                     n_layout_per_digit=7)
  texts = _texts(c)
  assert len(texts) == 14
  assert sorted(len(_operands(p)[0]) for p, _ in texts) == [3] * 7 + [5] * 7
  assert all(p.endswith("<layout>\n") and c.endswith("</layout>\n") for p, c in texts)
