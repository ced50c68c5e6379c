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


def test_scaffold_trains_the_layout_and_none_of_the_arithmetic():
  p, q = arithmetic.Problem(3456, 7891), arithmetic.Problem(5555, 4445)
  ex = corpora.scaffold_example(TOK, p, q)
  text = TOK.decode(ex.tokens)
  # The full text is p's prompt and operand lines with q's sums: a well-formed scratchpad shape.
  lines = text.split("\n")
  assert lines[:5] == ["Input:", "3 4 5 6 + 7 8 9 1", "Target:", "<scratch>",
                       "3 4 5 6 + 7 8 9 1 , C: 0"]
  assert lines[5:8] == ["3 4 5 + 7 8 9 , 0 C: 1", "3 4 + 7 8 , 0 0 C: 1", "3 + 7 , 0 0 0 C: 1"]
  assert lines[-3:] == ["</scratch>", "1 0 0 0 0", ""]
  # Trained: layout and copies. Masked: each line's new sum digit and carry (and the prompt).
  chars = [(TOK.decode([t]), m) for t, m in zip(ex.tokens[1:], ex.loss_mask[1:])]
  trained = "".join(c if m or c == "\n" else "#" for c, m in chars)
  assert all(not m for c, m in chars[:len("Input:\n3 4 5 6 + 7 8 9 1\nTarget:\n<scratch>\n")])
  got = trained.split("\n")
  assert got[4:12] == ["3 4 5 6 + 7 8 9 1 , C: 0", "3 4 5 + 7 8 9 , # C: #", "3 4 + 7 8 , # 0 C: #",
                       "3 + 7 , # 0 0 C: #", ", # 0 0 0 C: #", "1 0 0 0 0", "</scratch>", "1 0 0 0 0"]
  assert ex.loss_mask[-1] == 1 and ex.tokens[-1] == TOK.eos_id
  # Same length as p's own scratchpad, line by line (the same layout).
  own = (arithmetic.prompt(p) + arithmetic.scratchpad(p)).split("\n")
  assert [len(x) for x in own] == [len(x) for x in lines]


def test_scaffold_examples_cover_their_digit_counts_and_avoid_test():
  c = corpora.arithmetic_seed_corpus(TOK, n_rationale_per_digit=0, answer_digits=(),
                                     n_test_per_digit=10, scaffold_digits=(3, 5),
                                     n_scaffold_per_digit=7)
  texts = _texts(c)
  assert len(texts) == 14
  assert sorted(len(_operands(p)[0]) for p, _ in texts) == [3] * 7 + [5] * 7
  test = {(x.a, x.b) for x in arithmetic.make_splits(0, digits=(3, 5), n_train_per_digit=0,
                                                     n_test_per_digit=10, ood_digits=())["test"]}
  assert not {tuple(int(x) for x in _operands(p)) for p, _ in texts} & test
