"""Tests for starjax.data.arithmetic (spec 4.2 Arithmetic; 4.6 tests 1-3)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from starjax.data import arithmetic as ar
from starjax.data.arithmetic import Problem

SPEC_29_57 = (
  "Input:\n"
  "2 9 + 5 7\n"
  "Target:\n"
  "<scratch>\n"
  "2 9 + 5 7 , C: 0\n"
  "2 + 5 , 6 C: 1\n"
  ", 8 6 C: 0\n"
  "0 8 6\n"
  "</scratch>\n"
  "8 6\n"
)


def _reference_scratch(a: int, b: int) -> str:
  """Independent rendering of the reference layout for equal-length operands."""
  assert len(str(a)) == len(str(b))
  pairs = list(zip(str(a), str(b), strict=True))[::-1]
  out = [f"{' '.join(str(a))} + {' '.join(str(b))} , C: 0"]
  carry, so_far = 0, ""
  for k, (x, y) in enumerate(pairs):
    if k:  # What is left of each operand: its first len - k digits.
      rest_a, rest_b = " ".join(str(a)[:-k]), " ".join(str(b)[:-k])
      out.append(f"{rest_a} + {rest_b} , {so_far}C: {carry}")
    s = int(x) + int(y) + carry
    carry, so_far = int(s >= 10), f"{s % 10} {so_far}"
  out.append(f", {so_far}C: {carry}")
  out.append(f"{carry} {so_far}".strip())
  body = "\n".join(out)
  return f"<scratch>\n{body}\n</scratch>\n{' '.join(str(a + b))}\n"


# --------------------------------------------------------------------------------------------------
# Formatting.


def test_spec_example_exact():
  p = Problem(29, 57)
  assert ar.prompt(p) + ar.scratchpad(p) == SPEC_29_57
  assert ar.example(p) == SPEC_29_57
  assert ar.prompt(p) == "Input:\n2 9 + 5 7\nTarget:\n"
  assert ar.direct_answer(p) == "8 6\n"
  assert ar.hint(p) == "0 8 6"


def test_one_digit_has_no_step_lines():
  p = Problem(5, 7)
  assert ar.scratchpad(p) == "<scratch>\n5 + 7 , C: 0\n, 2 C: 1\n1 2\n</scratch>\n1 2\n"
  assert ar.parse_scratchpad(ar.scratchpad(p)).steps == ()


def test_unequal_lengths_pad_missing_digits_with_zero():
  assert ar.scratchpad(Problem(99, 1)) == (
    "<scratch>\n9 9 + 1 , C: 0\n9 + 0 , 0 C: 1\n, 0 0 C: 1\n1 0 0\n</scratch>\n1 0 0\n"
  )
  assert ar.scratchpad(Problem(1, 23)) == (
    "<scratch>\n1 + 2 3 , C: 0\n0 + 2 , 4 C: 0\n, 2 4 C: 0\n0 2 4\n</scratch>\n2 4\n"
  )
  assert ar.scratchpad(Problem(5, 123)) == (
    "<scratch>\n5 + 1 2 3 , C: 0\n0 0 + 1 2 , 8 C: 0\n0 + 1 , 2 8 C: 0\n, 1 2 8 C: 0\n"
    "0 1 2 8\n</scratch>\n1 2 8\n"
  )
  assert ar.parse_scratchpad(ar.scratchpad(Problem(5, 123))).total == 128


def test_step_lines_drop_one_digit_of_each_operand_per_line():
  lines = ar.scratchpad(Problem(4567, 1289)).split("\n")[1:6]
  assert lines == ["4 5 6 7 + 1 2 8 9 , C: 0", "4 5 6 + 1 2 8 , 6 C: 1", "4 5 + 1 2 , 5 6 C: 1",
                   "4 + 1 , 8 5 6 C: 0", ", 5 8 5 6 C: 0"]


def test_zero_padded_width_is_a_wider_layout_with_the_same_arithmetic():
  p = Problem(29, 57)
  padded = ar.scratchpad(p, width=4)
  assert padded == ("<scratch>\n0 0 2 9 + 0 0 5 7 , C: 0\n0 0 2 + 0 0 5 , 6 C: 1\n"
                    "0 0 + 0 0 , 8 6 C: 0\n0 + 0 , 0 8 6 C: 0\n, 0 0 8 6 C: 0\n0 0 0 8 6\n"
                    "</scratch>\n8 6\n")
  assert ar.prompt(p, width=4) == "Input:\n0 0 2 9 + 0 0 5 7\nTarget:\n"
  assert ar.hint(p, width=4) == "0 0 0 8 6"
  assert ar.extract_answer(padded) == 86
  # Line for line as long as the scratchpad of a genuine 4-digit problem.
  wide = ar.scratchpad(Problem(1029, 2057)).split("\n")
  assert [len(x) for x in padded.split("\n")[1:6]] == [len(x) for x in wide[1:6]]
  assert ar.scratchpad(p, width=2) == ar.scratchpad(p)  # Its own width: unchanged.
  with pytest.raises(ValueError, match="narrower"):
    ar.scratchpad(Problem(123, 4), width=2)


def test_problem_properties_and_validation():
  p = Problem(np.int64(123), 4)
  assert type(p.a) is int and p.answer == 127 and p.digits == 3
  assert Problem(0, 0).digits == 1
  with pytest.raises(ValueError):
    Problem(-1, 2)
  with pytest.raises(TypeError):
    Problem(1.5, 2)


def test_format_and_parse_number():
  assert ar.format_number(86) == "8 6"
  assert ar.format_number(0) == "0"
  assert ar.parse_number("8 6") == 86
  assert ar.parse_number("  8   6 \n") == 86
  assert ar.parse_number("86") == 86
  for bad in ["", "   ", "-8 6", "8 x", "8,6", "8 6 .", "+8"]:
    assert ar.parse_number(bad) is None, bad
  with pytest.raises(ValueError):
    ar.format_number(-3)


def test_examples_join_with_blank_line():
  text = ar.EXAMPLE_SEPARATOR.join([ar.example(Problem(1, 2)), ar.example(Problem(3, 4))])
  assert "</scratch>\n3\n\nInput:\n3 + 4\n" in text


# --------------------------------------------------------------------------------------------------
# Round trip (spec 4.6 test 1).


def _problems_for(d: int) -> list[Problem]:
  rng = np.random.default_rng(d)
  lo, hi = 10 ** (d - 1), 10**d
  ps = ar.sample_problems(rng, d, 20)
  ps += [
    Problem(hi - 1, hi - 1),  # Every pair carries.
    Problem(lo, lo),  # No carries.
    Problem(hi - 1, 1),  # Unequal lengths, carry ripples through.
    Problem(1, hi - 1),
    Problem(lo, 0),
    Problem(int("5" * d), int("4" * d)),  # All nines, no carry.
    Problem(int("5" * d), int("5" * d)),  # Every pair carries, starting from 5 + 5.
  ]
  return ps


@pytest.mark.parametrize("d", range(1, 11))
def test_scratchpad_round_trip(d):
  for p in _problems_for(d):
    completion = ar.scratchpad(p)
    for text in (completion, ar.prompt(p) + completion):
      parsed = ar.parse_scratchpad(text)
      assert (parsed.a, parsed.b) == (p.a, p.b)
      assert parsed.total == p.a + p.b
      assert parsed.answer == p.a + p.b
      assert len(parsed.steps) == p.digits - 1
      assert parsed.carry == int(p.a + p.b >= 10**p.digits)
    assert ar.extract_answer(completion) == p.a + p.b
    assert ar.is_correct(p, completion)
    assert not ar.is_correct(Problem(p.a, p.b + 1), completion)
    assert completion.split("\n")[-4] == ar.hint(p)
    if len(str(p.a)) == len(str(p.b)):
      assert completion == _reference_scratch(p.a, p.b)


def test_round_trip_steps_content():
  parsed = ar.parse_scratchpad(ar.scratchpad(Problem(456, 789)))
  assert parsed.steps == (ar.Step((4, 5), (7, 8), (5,), 1), ar.Step((4,), (7,), (4, 5), 1))
  assert [s.pair for s in parsed.steps] == [(5, 8), (4, 7)]
  assert parsed.sum_digits == (2, 4, 5) and parsed.carry == 1 and parsed.total == 1245


def _replace_line(text: str, index: int, new: str) -> str:
  lines = text.split("\n")
  lines[index] = new
  return "\n".join(lines)


@pytest.mark.parametrize(
  "index,new,offending",
  [
    # Operand changed: the first step line no longer follows.
    (1, "4 5 6 + 7 8 8 , C: 0", "4 5 + 7 8 , 5 C: 1"),
    (1, "4 5 6 + 7 8 9 , C: 1", None),  # Nonzero initial carry.
    (2, "4 5 + 7 8 , 6 C: 1", None),  # Wrong digit.
    (2, "4 5 + 7 8 , 5 C: 0", None),  # Wrong carry.
    (2, "4 5 + 7 9 , 5 C: 1", None),  # Remaining digits do not match the operands.
    (2, "5 + 8 , 5 C: 1", None),  # Only the next pair, not all remaining digits.
    (2, "4 5 + 7 , 5 C: 1", None),  # Operands of different remaining lengths.
    (3, "4 + 7 , 4 5 C: 0", None),  # Wrong carry.
    (3, "4 + 7 ,  4 5 C: 1", None),  # Wrong shape (double space).
    (4, ", 2 4 5 C: 0", None),  # Final carry wrong.
    (4, ", 3 4 5 C: 1", None),  # Final digit wrong.
    (5, "0 2 4 5", None),  # Result line does not match the final state.
    (5, "1 2 4 5 6", None),
    (7, "1 2 4 6", None),  # Answer line wrong.
    (7, "1 2 4 x", None),  # Answer line malformed.
  ],
)
def test_parse_scratchpad_rejects_inconsistent_lines(index, new, offending):
  good = ar.scratchpad(Problem(456, 789))
  ar.parse_scratchpad(good)
  bad = _replace_line(good, index, new)
  with pytest.raises(ValueError, match=re.escape(repr(offending or new))):
    ar.parse_scratchpad(bad)


_GOOD_LINES = ar.scratchpad(Problem(456, 789)).split("\n")


@pytest.mark.parametrize(
  "text",
  [
    "\n".join(line for line in _GOOD_LINES if line != "<scratch>"),  # No opening tag.
    "\n".join(line for line in _GOOD_LINES if line != "</scratch>"),  # No closing tag.
    "\n".join(_GOOD_LINES[:2] + _GOOD_LINES[3:]),  # A step line is missing.
    "\n".join(_GOOD_LINES[:6] + ["1 2 4 5"] + _GOOD_LINES[6:]),  # Extra line.
    "\n".join(_GOOD_LINES[:4]),  # Truncated.
    "\n".join(_GOOD_LINES[:3] + ["</scratch>"]),  # Closed too early.
    "<scratch>\n</scratch>\n",  # Empty.
    "<scratch>\n0 1 + 2 , C: 0\n, 3 C: 0\n0 3\n</scratch>\n",  # Leading zero.
  ],
  ids=[
    "no_open",
    "no_close",
    "missing_step",
    "extra_line",
    "truncated",
    "early_close",
    "empty",
    "leading_zero",
  ],
)
def test_parse_scratchpad_rejects_structure_errors(text):
  with pytest.raises(ValueError):
    ar.parse_scratchpad(text)


def test_parse_scratchpad_checks_input_block():
  good = ar.scratchpad(Problem(456, 789))
  ar.parse_scratchpad(ar.prompt(Problem(456, 789)) + good)
  with pytest.raises(ValueError, match="operand line"):
    ar.parse_scratchpad(ar.prompt(Problem(456, 780)) + good)


def test_parse_scratchpad_without_answer_line():
  text = ar.scratchpad(Problem(29, 57)).rsplit("8 6\n", 1)[0]
  assert text.endswith("</scratch>\n")
  assert ar.parse_scratchpad(text).answer is None
  assert ar.parse_scratchpad(text).total == 86


# --------------------------------------------------------------------------------------------------
# Answer extraction (spec 4.6 test 2).

_SCRATCH = ar.scratchpad(Problem(29, 57))
_BODY = _SCRATCH.split("</scratch>")[0]


@pytest.mark.parametrize(
  "completion,expected",
  [
    (_SCRATCH, 86),
    (_SCRATCH.rstrip("\n"), 86),  # No final newline.
    (_SCRATCH + "\nInput:\n1 + 2\nTarget:\n<scratch>\n", 86),  # Trailing next example.
    (_BODY + "</scratch>\n   8 6  \nmore", 86),  # Leading and trailing spaces.
    (_BODY + "</scratch>  \n8 6\n", 86),  # Spaces after the tag.
    (_BODY + "</scratch>\n8 6 is the answer\n", None),  # Extra text on the answer line.
    (_BODY + "</scratch>\n-8 6\n", None),  # Negative sign.
    (_BODY + "</scratch>\neight six\n", None),  # Letters.
    (_BODY + "</scratch>\n8 b\n", None),
    (_BODY + "</scratch>\n", None),  # Answer line missing.
    (_BODY + "</scratch>", None),
    (_BODY + "</scratch>\n\n8 6\n", None),  # Blank answer line.
    (_BODY + "</scratch> 8 6\n", None),  # Answer on the tag line.
    (_BODY, None),  # Truncated: no </scratch>.
    ("<scratch>\n2 9 + 5 7 , C: 0\n", None),
    ("8 6\n<scratch>\n2 9 + 5 7 , C: 0\n", None),  # Opened, never closed.
    ("", None),
    ("\n", None),
    ("8 6\n", 86),  # Direct answer.
    ("8 6", 86),
    ("  8 6\n\nInput:\n", 86),
    ("8 6 because\n", None),
    ("-8 6\n", None),
    ("\n8 6\n", None),  # Direct answer must be on the first line.
  ],
)
def test_extract_answer(completion, expected):
  assert ar.extract_answer(completion) == expected


def test_is_correct():
  p = Problem(29, 57)
  assert ar.is_correct(p, ar.scratchpad(p))
  assert ar.is_correct(p, ar.direct_answer(p))
  assert not ar.is_correct(p, ar.scratchpad(Problem(29, 58)))
  assert not ar.is_correct(p, _BODY)
  assert not ar.is_correct(Problem(0, 0), "")


# --------------------------------------------------------------------------------------------------
# Hints (spec 4.6 test 3).


def _line_after_target(text: str) -> str:
  lines = text.split("\n")
  return lines[lines.index("Target:") + 1]


@pytest.mark.parametrize("a,b", [(29, 57), (5, 7), (999, 999), (99, 1), (12345, 67890)])
def test_hint_and_strip_hint(a, b):
  p = Problem(a, b)
  hinted = ar.prompt_with_hint(p)
  assert hinted == ar.prompt(p) + ar.hint(p) + "\n"
  assert _line_after_target(hinted) == ar.hint(p)
  assert ar.parse_number(ar.hint(p)) == a + b

  # A rationalized example: hinted prompt plus the (correct) generated completion.
  rationalized = hinted + ar.scratchpad(p)
  saved = ar.strip_hint(rationalized)
  assert saved == ar.prompt(p) + ar.scratchpad(p)
  assert _line_after_target(saved) == "<scratch>"
  assert ar.hint(p) not in saved.split("<scratch>")[0].split("\n")
  # Also for a hinted direct answer.
  assert ar.strip_hint(hinted + ar.direct_answer(p)) == ar.prompt(p) + ar.direct_answer(p)


def test_strip_hint_leaves_unhinted_text_unchanged_and_handles_many_examples():
  ps = [Problem(29, 57), Problem(5, 7), Problem(999, 1)]
  plain = ar.EXAMPLE_SEPARATOR.join(
    [ar.example(ps[0]), ar.example(ps[1], rationale=False), ar.example(ps[2])]
  )
  assert ar.strip_hint(plain) == plain
  hinted = ar.EXAMPLE_SEPARATOR.join(ar.prompt_with_hint(p) + ar.scratchpad(p) for p in ps)
  stripped = ar.strip_hint(hinted)
  assert stripped == ar.EXAMPLE_SEPARATOR.join(ar.example(p) for p in ps)
  lines = stripped.split("\n")
  assert all(lines[i + 1] == "<scratch>" for i, line in enumerate(lines) if line == "Target:")


# --------------------------------------------------------------------------------------------------
# Sampling and splits.


def test_sample_problems_unique_in_range_and_excludes():
  rng = np.random.default_rng(0)
  ps = ar.sample_problems(rng, 2, 500)
  assert len(ps) == len(set(ps)) == 500
  assert all(10 <= p.a < 100 and 10 <= p.b < 100 for p in ps)
  more = ar.sample_problems(np.random.default_rng(1), 2, 500, exclude=set(ps))
  assert not set(more) & set(ps)
  tuples = ar.sample_problems(np.random.default_rng(1), 2, 500, exclude={(p.a, p.b) for p in ps})
  assert tuples == more


def test_sample_problems_one_digit_exhaustive_and_capped():
  ps = ar.sample_problems(np.random.default_rng(0), 1, 81)
  assert set(ps) == {Problem(a, b) for a in range(1, 10) for b in range(1, 10)}
  with pytest.raises(ValueError):
    ar.sample_problems(np.random.default_rng(0), 1, 82)
  rest = ar.sample_problems(np.random.default_rng(0), 1, 71, exclude=set(ps[:10]))
  assert set(rest) == set(ps[10:])
  with pytest.raises(ValueError):
    ar.sample_problems(np.random.default_rng(0), 1, 72, exclude=set(ps[:10]))


def test_sample_problems_long_operands():
  ps = ar.sample_problems(np.random.default_rng(0), 25, 5)
  assert all(len(str(p.a)) == len(str(p.b)) == 25 for p in ps)
  assert len(set(ps)) == 5


def test_sample_problems_is_roughly_uniform():
  ps = ar.sample_problems(np.random.default_rng(0), 3, 20000)
  leading = np.bincount([int(str(p.a)[0]) for p in ps], minlength=10)
  assert leading[0] == 0
  assert leading[1:].min() > 0.8 * 20000 / 9


def _pairs(ps):
  return {(p.a, p.b) for p in ps}


def test_make_splits_disjoint_counts_deterministic():
  kw = dict(digits=(1, 2, 3), n_train_per_digit=300, n_test_per_digit=50, ood_digits=(6, 7))
  s = ar.make_splits(0, **kw)
  assert set(s) == {"train", "test", "ood_test"}
  by_digits = {k: np.bincount([p.digits for p in v], minlength=9).tolist() for k, v in s.items()}
  # 1 digit: 81 problems < 300 + 50, so test keeps 40 (half) and train gets 41.
  assert by_digits["train"][1:4] == [41, 300, 300]
  assert by_digits["test"][1:4] == [40, 50, 50]
  assert by_digits["ood_test"][6:8] == [50, 50] and sum(by_digits["ood_test"]) == 100
  for k, v in s.items():
    assert len(_pairs(v)) == len(v), k  # No duplicates within a split.
  assert not _pairs(s["train"]) & _pairs(s["test"])
  assert not (_pairs(s["train"]) | _pairs(s["test"])) & _pairs(s["ood_test"])
  # All 81 one-digit problems are used once.
  assert len(_pairs(p for p in s["train"] + s["test"] if p.digits == 1)) == 81

  assert ar.make_splits(0, **kw) == s
  other = ar.make_splits(1, **kw)
  for k in ("train", "test", "ood_test"):
    assert other[k] != s[k], k
  # The test split does not depend on the train size.
  assert ar.make_splits(0, **{**kw, "n_train_per_digit": 100})["test"] == s["test"]


def test_make_splits_defaults_and_validation():
  s = ar.make_splits(3)
  assert len(s["train"]) == 41 + 4 * 2000
  assert len(s["test"]) == 40 + 4 * 100
  assert len(s["ood_test"]) == 300
  assert not _pairs(s["train"]) & _pairs(s["test"])
  assert ar.split_sizes(2, 2000, 100) == (2000, 100)
  assert ar.split_sizes(1, 10, 5) == (10, 5)
  assert ar.split_sizes(1, 2000, 100) == (41, 40)
  with pytest.raises(ValueError):
    ar.make_splits(0, digits=(1, 6), ood_digits=(6,))


def test_corpus_text():
  ps = ar.sample_problems(np.random.default_rng(0), 3, 40)
  texts = ar.corpus_text(ps, rationale_fraction=0.25, rng=np.random.default_rng(0))
  assert len(texts) == 40
  n_scratch = 0
  for p, t in zip(ps, texts, strict=True):
    assert t.startswith(ar.prompt(p))
    completion = t[len(ar.prompt(p)) :]
    assert completion in (ar.scratchpad(p), ar.direct_answer(p))
    assert ar.is_correct(p, completion)
    n_scratch += completion == ar.scratchpad(p)
  assert n_scratch == 10
  rng = np.random.default_rng(0)
  assert all("<scratch>" in t for t in ar.corpus_text(ps, rationale_fraction=1.0, rng=rng))
  assert not any("<scratch>" in t for t in ar.corpus_text(ps, rationale_fraction=0.0, rng=rng))
  with pytest.raises(ValueError):
    ar.corpus_text(ps, rationale_fraction=1.5, rng=np.random.default_rng(0))
