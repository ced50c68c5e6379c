"""Tests for the GSM8K and CommonsenseQA tasks, jsonl reading, the TFDS builders and the registry.

Spec 4.2 (formats), 4.5 (number-only GSM hint, robust CSQA extraction), 4.6 test 2 (extractors on
canonical and malformed strings), 5 (LLMonkeys GSM8K checker). No test may use the network: an
autouse fixture makes every connection attempt fail loudly.
"""

from __future__ import annotations

import ast
import json
import logging
import operator
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from starjax import configs
from starjax.data import commonsense_qa as csqa
from starjax.data import gsm8k, jsonl, registry
from starjax.data.tasks import Example

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
GSM8K_DIR = SHARED_DATA / "gsm8k"
CSQA_DIR = SHARED_DATA / "commonsenseqa"
needs_gsm8k = pytest.mark.skipif(not (GSM8K_DIR / "test.jsonl").is_file(),
                                 reason="shared GSM8K data not found")
needs_csqa = pytest.mark.skipif(not (CSQA_DIR / "dev_rand_split.jsonl").is_file(),
                                reason="shared CommonsenseQA data not found")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any attempt to reach the network raises, and fails the test even if the error is caught."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise AssertionError(f"network access attempted: {args!r}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(urllib.request, "urlopen", refuse)
  yield
  assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(autouse=True)
def no_env_dirs(monkeypatch):
  monkeypatch.delenv("STARJAX_DATA_DIR", raising=False)
  monkeypatch.delenv("STARJAX_TFDS_DIR", raising=False)


def _head(src: Path, dst: Path, n: int) -> None:
  """Writes the first n lines of src to dst."""
  with open(src, encoding="utf-8") as f:
    lines = [next(f) for _ in range(n)]
  dst.write_text("".join(lines), encoding="utf-8")


def _norm(text: str) -> str:
  return " ".join(text.lower().split())


# --------------------------------------------------------------------------------------------------
# GSM8K answers.


@pytest.mark.parametrize("text, expected", [
  ("72", "72"), ("72.0", "72"), ("72.", "72"), ("$72", "72"), ("1,080", "1080"),
  ("-5", "-5"), ("-0", "0"), ("0.50", "0.5"), (".5", "0.5"), ("007", "7"), (" 3 ", "3"),
  ("", None), ("$", None), (".", None), ("1.2.3", None), ("abc", None), ("5x", None), ("--5", None),
])
def test_canonical_number(text, expected):
  assert gsm8k.canonical_number(text) == expected


@pytest.mark.parametrize("completion, expected", [
  (" She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
  (" ...\n#### 1,080", "1080"),
  (" ...\n#### $18.", "18"),
  (" ...\n#### 72.0\n\nQ: next", "72"),
  (" ...\n#### -3", "-3"),
  (" ...\n####18", "18"),  # Missing space: still read.
  (" ...\n#### 5\n#### 6", "5"),  # The first '####' decides.
  (" The answer is 7.", None),  # No '####'.
  (" ...\n#### seven", None),
  (" ...\n#### $", None),
  (" ...\n#### 1.2.3", None),
  ("", None),
])
def test_gsm8k_extract(completion, expected):
  assert gsm8k.extract_answer(completion) == expected


def test_gsm8k_is_correct_compares_canonical_numbers():
  task = gsm8k.Gsm8kTask()
  ex = Example(id="x", question="q", answer="1,080")
  assert task.is_correct(ex, " ...\n#### 1080.0")
  assert task.is_correct(ex, " ...\n#### $1,080")
  assert not task.is_correct(ex, " ...\n#### 1081")
  assert not task.is_correct(ex, " 1080")


@pytest.mark.parametrize("field, expected", [
  ("Step <<1+1=2>>2.\n#### 2", ("Step <<1+1=2>>2.", "2")),
  ("A.\nB.\n#### 1,000\n", ("A.\nB.", "1000")),
])
def test_split_solution(field, expected):
  assert gsm8k.split_solution(field) == expected


@pytest.mark.parametrize("field, message", [
  ("no marker", "no '#### N'"), ("a\n#### 1\n#### 2", "2 '####'"),
  ("a\n#### x", "not a number"), ("a\n#### 3\nmore", "text after"),
])
def test_split_solution_rejects(field, message):
  with pytest.raises(ValueError, match=message):
    gsm8k.split_solution(field)


def test_gsm8k_prompts_and_number_only_hint():
  task = gsm8k.Gsm8kTask()
  solution = "It costs 2 * 3 = <<2*3=6>>6 dollars."
  ex = Example(id="x", question="A pen costs $2. How much do 3 pens cost?", answer="6",
               rationale=solution)
  assert task.prompt(ex) == "Q: A pen costs $2. How much do 3 pens cost?\nA:"
  assert task.prompt_with_hint(ex) == "Q: A pen costs $2. How much do 3 pens cost? (6)\nA:"
  assert "6" not in task.prompt(ex)
  # The reference's bug was to put the whole solution in the hint: we give the number only.
  assert solution not in task.prompt_with_hint(ex) and "<<" not in task.prompt_with_hint(ex)
  assert task.reference_completion(ex) == f" {solution}\n#### 6"
  assert task.is_correct(ex, task.reference_completion(ex))
  assert task.is_correct(ex, task.direct_completion(ex))
  assert all(s in task.stop for s in ("\n\nQ:", "\nQ:"))


def _calc(expr: str) -> float:
  """Evaluates + - * / arithmetic on numbers (the GSM8K calculator annotations)."""
  ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
         ast.Div: operator.truediv}

  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
      return ops[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -ev(node.operand)
    raise ValueError(f"unsupported expression {expr!r}")

  return ev(ast.parse(expr, mode="eval"))


@pytest.mark.parametrize("question, rationale, answer", gsm8k.EXEMPLARS)
def test_gsm8k_exemplar_is_correct(question, rationale, answer):
  task = gsm8k.Gsm8kTask()
  ex = Example(id="x", question=question, answer=answer)
  completion = gsm8k.format_completion(rationale, answer)
  assert task.is_correct(ex, completion)
  annotations = re.findall(r"<<([^=<>]+)=([^<>]+)>>", rationale)
  assert annotations and len(annotations) == rationale.count("<<")
  for expr, value in annotations:
    assert _calc(expr) == pytest.approx(float(value)), (expr, value)
    assert f">>{value}" in rationale  # The annotated result is also written out.
  # The last computed value is the answer.
  assert gsm8k.canonical_number(annotations[-1][1]) == answer


def test_gsm8k_few_shot_text():
  task = gsm8k.Gsm8kTask()
  assert 4 <= len(gsm8k.EXEMPLARS) <= 6
  for hint in (False, True):
    text = task.few_shot(hint=hint)
    blocks = text.split("\n\n")
    assert blocks[-1] == "" and len(blocks) == len(gsm8k.EXEMPLARS) + 1
    for block, (question, _, answer) in zip(blocks, gsm8k.EXEMPLARS):
      context, completion = block.split("\nA:", 1)
      assert context == f"Q: {question}" + (f" ({answer})" if hint else "")
      assert gsm8k.extract_answer(completion) == answer
  assert gsm8k.Gsm8kTask(n_few_shot=2).few_shot().count("Q: ") == 2
  assert gsm8k.Gsm8kTask(n_few_shot=0).few_shot() == ""
  with pytest.raises(ValueError, match="n_few_shot"):
    gsm8k.Gsm8kTask(n_few_shot=99)


@needs_gsm8k
def test_gsm8k_exemplars_are_not_from_gsm8k():
  questions = []
  for split in ("train", "test"):
    rows, errors = jsonl.read_jsonl(GSM8K_DIR / f"{split}.jsonl")
    assert not errors
    questions += [_norm(r.value["question"]) for r in rows]
  corpus = "\n".join(questions)
  for question, _, _ in gsm8k.EXEMPLARS:
    assert _norm(question) not in corpus
    assert _norm(question)[:60] not in corpus


def test_gsm8k_missing_data_is_a_clear_error(tmp_path):
  task = gsm8k.Gsm8kTask(tfds_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="STARJAX_DATA_DIR.*grade-school-math"):
    task.load("test")
  with pytest.raises(FileNotFoundError, match="data_dir"):
    gsm8k.Gsm8kTask(use_tfds=False).load("test")
  with pytest.raises(ValueError, match="splits"):
    task.load("validation")


# --------------------------------------------------------------------------------------------------
# CommonsenseQA answers.


@pytest.mark.parametrize("completion, expected", [
  (" Ink is absorbed by blotting paper. Therefore, the answer is blotter (e).", "e"),
  (" Therefore, the answer is blotter (E).", "e"),
  (" ... the answer is blotter (e)", "e"),
  (" ... the answer is (b).", "b"),
  (" ... The Answer Is ( c ) .", "c"),
  (" ... answer: B", "b"),
  (" ... Answer: (d)", "d"),
  (" ... the answer is e.", "e"),
  (" ... the answer is b) bank.", "b"),
  (" (e).", "e"),  # Direct-answer format.
  (" (a)", "a"),
  (" Banks hold money (a) safely. So, bank (a).", "a"),
  (" The answer is not obvious. Therefore, the answer is mall (d).", "d"),
  (" Therefore, the answer is bank (a).\nQ: Where? ... the answer is (c).", "a"),
  (" Therefore, the answer is blotter (e).\n\nThe answer is clear.", "e"),
  # Missing or malformed.
  ("", None),
  (" I don't know.", None),
  (" Therefore, the answer is blotter.", None),
  (" Therefore, the answer is (f).", None),
  (" Therefore, the answer is a bank.", None),  # "a" is an article here.
  (" Therefore, the answer is e.g. a bank.", None),
  (" blotter (e) or inkwell (c)", None),
  # Ambiguous.
  (" Therefore, the answer is (a) or (b).", None),
  (" (a) is wrong. (c) is right. (c)\n (b)", None),
])
def test_csqa_extract(completion, expected):
  assert csqa.extract_answer(completion) == expected


def test_csqa_extraction_is_not_char_minus_3():
  # The reference reads character [-3] of the first line; these all defeat that.
  for completion in (" the answer is blotter (e)", " the answer is blotter (e). ",
                     " the answer is (e)!"):
    assert csqa.extract_answer(completion) == "e"


def _csqa_example(answer: str = "e") -> Example:
  return Example(id="x", question="What absorbs ink?", answer=answer,
                 meta={"labels": csqa.LABELS,
                       "choices": ("shirt pocket", "hand", "inkwell", "desk", "blotter")})


def test_csqa_prompts_and_hint():
  task = csqa.CommonsenseQATask()
  ex = _csqa_example("E")  # Gold keys may come upper-case.
  assert task.prompt(ex) == ("Q: What absorbs ink?\nAnswer Choices:\n(a) shirt pocket\n(b) hand\n"
                             "(c) inkwell\n(d) desk\n(e) blotter\nA:")
  hinted = task.prompt_with_hint(ex)
  assert hinted == task.prompt(ex).replace("(e) blotter", "(e) blotter (CORRECT)")
  assert "CORRECT" not in task.prompt(ex)
  assert task.canonical("E") == task.canonical("(e)") == "e"
  assert task.is_correct(ex, " Therefore, the answer is blotter (e).")
  assert not task.is_correct(ex, " Therefore, the answer is inkwell (c).")
  assert task.is_correct(ex, task.direct_completion(ex)) and task.direct_completion(ex) == " (e)."
  assert task.group(ex) == ""


@pytest.mark.parametrize("question, choices, answer, rationale", csqa.EXEMPLARS)
def test_csqa_exemplar_is_correct(question, choices, answer, rationale):
  assert len(choices) == 5 and len(set(choices)) == 5 and question.strip()
  assert csqa.extract_answer(" " + rationale) == answer
  # The rationale names the gold choice's text, in the STaR style.
  assert rationale.endswith(f"Therefore, the answer is {choices[csqa.LABELS.index(answer)]} "
                            f"({answer}).")


def test_csqa_few_shot_text():
  task = csqa.CommonsenseQATask()
  assert 5 <= len(csqa.EXEMPLARS) <= 7
  plain, hinted = task.few_shot(), task.few_shot(hint=True)
  assert "CORRECT" not in plain and hinted.count(" (CORRECT)") == len(csqa.EXEMPLARS)
  for (_, choices, answer, _), block in zip(csqa.EXEMPLARS, hinted.split("\n\n")):
    gold_line = f"({answer}) {choices[csqa.LABELS.index(answer)]} (CORRECT)\n"
    assert gold_line in block
    assert csqa.extract_answer(block.split("\nA:", 1)[1]) == answer
  assert plain.count("Q: ") == len(csqa.EXEMPLARS)
  assert csqa.CommonsenseQATask(n_few_shot=0).few_shot() == ""


@needs_csqa
def test_csqa_exemplars_are_not_from_csqa():
  rows, _ = jsonl.read_jsonl(CSQA_DIR / "dev_rand_split.jsonl")
  corpus = "\n".join(_norm(r.value["question"]) for r in rows)
  for question, _, _, _ in csqa.EXEMPLARS:
    assert _norm(question) not in corpus


def test_csqa_parse_row_layouts_and_errors():
  hf = {"id": "q1", "question": "Where?", "question_concept": "c",
        "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["v", "w", "x", "y", "z"]},
        "answerKey": "C"}
  original = {"id": "q1", "answerKey": "C",
              "question": {"stem": "Where?", "question_concept": "c",
                           "choices": [{"label": lab, "text": t} for lab, t in
                                       zip("EDCBA", "zyxwv")]}}
  expected = {"id": "q1", "question": "Where?", "concept": "c",
              "choice_labels": list(csqa.LABELS), "choice_texts": list("vwxyz"), "answer_key": "c"}
  assert csqa.parse_row(hf) == expected
  assert csqa.parse_row(original) == expected  # Choices sorted by label.
  bad = [
    ({**hf, "answerKey": "F"}, "answerKey"),
    ({**hf, "answerKey": ""}, "answerKey"),
    ({**hf, "choices": {"label": ["A", "B"], "text": ["x", "y"]}}, "A-E"),
    ({**hf, "choices": {"label": ["A", "B"], "text": ["x"]}}, "equal length"),
    ({**hf, "choices": ["x"]}, "choices must be"),
    ({**hf, "question": ""}, "stem"),
  ]
  for row, message in bad:
    with pytest.raises(ValueError, match=message):
      csqa.parse_row(row)
  with pytest.raises(KeyError):
    csqa.parse_row({k: v for k, v in hf.items() if k != "answerKey"})


# --------------------------------------------------------------------------------------------------
# jsonl.


def test_read_jsonl_reports_malformed_rows_and_reads_the_rest(tmp_path, caplog):
  path = tmp_path / "data.jsonl"
  lines = [
    json.dumps({"question": "q1", "answer": "a\n#### 1"}),  # 1 ok
    '{"question": "q2", "answer": ',  # 2 bad JSON
    json.dumps({"question": "q3", "answer": "a\n#### 3"}),  # 3 ok
    json.dumps({"question": "q4"}),  # 4 missing field
    json.dumps({"question": 5, "answer": "a\n#### 5"}),  # 5 wrong type
    "",  # 6 blank: skipped silently
    json.dumps(["not", "an", "object"]),  # 7
    json.dumps({"question": "q8", "answer": "no number"}),  # 8 rejected by parse
  ]
  data = ("\n".join(lines) + "\n").encode() + b'{"question": "\xff"}\n'  # 9 invalid UTF-8
  data += json.dumps({"question": "q10", "answer": "a\n#### 10"}).encode() + b"\n"  # 10 ok
  path.write_bytes(data)
  with caplog.at_level(logging.WARNING):
    rows, errors = jsonl.read_jsonl(path, gsm8k.parse_row,
                                    fields={"question": str, "answer": str})
  assert [r.line for r in rows] == [1, 3, 10]
  assert [r.value["answer"] for r in rows] == ["1", "3", "10"]
  assert [e.line for e in errors] == [2, 4, 5, 7, 8, 9]
  for e in errors:
    assert e.path == str(path) and str(e).startswith(f"{path}:{e.line}: ")
  messages = [e.message for e in errors]
  assert "invalid JSON" in messages[0] and "missing field 'answer'" in messages[1]
  assert "'question' must be str" in messages[2] and "JSON object" in messages[3]
  assert "####" in messages[4] and "UTF-8" in messages[5]
  logged = "\n".join(r.getMessage() for r in caplog.records)
  assert all(f"{path}:{line}:" in logged for line in (2, 4, 5, 7, 8, 9))


def test_read_jsonl_without_parse_keeps_dicts(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"a": 1}\n{"a": true}\n{"b": 2}\n')
  rows, errors = jsonl.read_jsonl(path, fields={"a": int})
  assert [r.value for r in rows] == [{"a": 1}]
  assert [(e.line, e.message) for e in errors] == [
    (2, "field 'a' must be int, got bool"), (3, "missing field 'a'")]
  with pytest.raises(FileNotFoundError):
    jsonl.read_jsonl(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------------
# TFDS builders (array_record, read back through grain, no TensorFlow, no network).


@pytest.fixture(scope="module")
def builders():
  from starjax.data import builders as builders_module  # Imports TFDS (a few seconds).

  return builders_module


@pytest.fixture
def small_gsm8k(tmp_path):
  """A folder with the first 50 train and 20 test rows of the shared GSM8K files."""
  if not (GSM8K_DIR / "test.jsonl").is_file():
    pytest.skip("shared GSM8K data not found")
  src = tmp_path / "gsm8k_src"
  src.mkdir()
  _head(GSM8K_DIR / "train.jsonl", src / "train.jsonl", 50)
  _head(GSM8K_DIR / "test.jsonl", src / "test.jsonl", 20)
  return src


def test_gsm8k_builder_round_trip(builders, small_gsm8k, tmp_path):
  tfds_dir = tmp_path / "tfds"
  builder = builders.prepare(builders.Gsm8k, manual_dir=small_gsm8k, tfds_dir=tfds_dir)
  assert Path(builder.data_dir).is_relative_to(tfds_dir)
  assert any(p.name.startswith("starjax_gsm8k-train.array_record")
             for p in Path(builder.data_dir).iterdir())
  for split, n in (("train", 50), ("test", 20)):
    ds = builders.load_split(builder, split)
    assert len(ds) == n
    rows, _ = jsonl.read_jsonl(small_gsm8k / f"{split}.jsonl", gsm8k.parse_row)
    records = [ds[i] for i in range(n)]
    assert [r["index"] for r in records] == list(range(n))  # Generation order restored.
    assert [r["id"] for r in records] == [f"{split}-{i}" for i in range(n)]
    assert [r["answer"] for r in records] == [r.value["answer"] for r in rows]
    assert [r["question"] for r in records] == [r.value["question"] for r in rows]
    assert all(isinstance(r["question"], str) and isinstance(r["index"], int) for r in records)
  # The task gives the same examples through the builder and through the jsonl files.
  via_tfds = gsm8k.Gsm8kTask(small_gsm8k, tfds_dir=tfds_dir).load("test")
  via_jsonl = gsm8k.Gsm8kTask(small_gsm8k, use_tfds=False).load("test")
  assert via_tfds == via_jsonl and len(via_tfds) == 20
  assert via_tfds[0].id == "gsm8k-test-0" and via_tfds[0].answer == "18"
  # Once prepared, no source folder is needed.
  assert gsm8k.Gsm8kTask(tfds_dir=tfds_dir).load("dev") == via_tfds
  with pytest.raises(ValueError, match="splits"):
    builders.load_split(builder, "validation")


def test_gsm8k_builder_skips_and_records_malformed_rows(builders, small_gsm8k, tmp_path, caplog):
  path = small_gsm8k / "test.jsonl"
  lines = path.read_text().splitlines()
  lines[3] = lines[3][:40]  # Truncated JSON on line 4.
  lines[7] = json.dumps({"question": "q", "answer": "no final number"})  # Line 8.
  path.write_text("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    builder = builders.prepare(builders.Gsm8k, manual_dir=small_gsm8k, tfds_dir=tmp_path / "tfds")
  ds = builders.load_split(builder, "test")
  assert len(ds) == 18
  assert [ds[i]["index"] for i in range(18)] == [i for i in range(20) if i not in (3, 7)]
  malformed = dict(builder.info.metadata)["malformed_rows"]["test"]
  assert len(malformed) == 2
  assert malformed[0].startswith(f"{path}:4: invalid JSON")
  assert malformed[1].startswith(f"{path}:8: ") and "####" in malformed[1]
  assert f"{path}:4:" in caplog.text and f"{path}:8:" in caplog.text


def test_gsm8k_builder_prepares_again_when_sources_change(builders, small_gsm8k, tmp_path):
  tfds_dir = tmp_path / "tfds"
  builder = builders.prepare(builders.Gsm8k, manual_dir=small_gsm8k, tfds_dir=tfds_dir)
  assert len(builders.load_split(builder, "test")) == 20
  with open(small_gsm8k / "test.jsonl", "a") as f:
    f.write(json.dumps({"question": "One more?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
  builder = builders.prepare(builders.Gsm8k, manual_dir=small_gsm8k, tfds_dir=tfds_dir)
  ds = builders.load_split(builder, "test")
  assert len(ds) == 21 and ds[20]["question"] == "One more?"
  assert builders.is_prepared(builders.Gsm8k, tfds_dir=tfds_dir)


def test_builder_without_source_files_fails_fast(builders, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="train.jsonl.*grade-school-math"):
    builders.prepare(builders.Gsm8k, manual_dir=tmp_path / "empty", tfds_dir=tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="dev_rand_split.jsonl"):
    builders.prepare(builders.CommonsenseQA, manual_dir=tmp_path / "empty",
                     tfds_dir=tmp_path / "tfds")
  assert not builders.is_prepared(builders.Gsm8k, tfds_dir=tmp_path / "tfds")


@needs_gsm8k
def test_real_gsm8k_test_split(builders, tmp_path, monkeypatch):
  # Data and TFDS dirs from the environment.
  monkeypatch.setenv("STARJAX_DATA_DIR", str(SHARED_DATA))
  monkeypatch.setenv("STARJAX_TFDS_DIR", str(tmp_path / "tfds"))
  task = gsm8k.Gsm8kTask()
  examples = task.load("test")
  assert builders.is_prepared(builders.Gsm8k, tfds_dir=tmp_path / "tfds")
  assert len(examples) == 1319
  assert len({ex.id for ex in examples}) == 1319
  for ex in examples:
    assert gsm8k.canonical_number(ex.answer) == ex.answer
    assert task.is_correct(ex, task.reference_completion(ex))
    assert task.prompt_with_hint(ex) == task.prompt(ex)[:-len("\nA:")] + f" ({ex.answer})\nA:"
  assert examples[0].answer == "18" and examples[0].question.startswith("Janet")


@needs_csqa
def test_real_csqa_dev_split(builders, tmp_path):
  task = csqa.CommonsenseQATask(CSQA_DIR, tfds_dir=tmp_path / "tfds")
  examples = task.load("dev")
  assert len(examples) == 1221 and task.load("validation") == examples
  assert len({ex.id for ex in examples}) == 1221
  for ex in examples:
    assert ex.meta["labels"] == csqa.LABELS and len(ex.meta["choices"]) == 5
    assert ex.answer in csqa.LABELS
    assert task.is_correct(ex, task.direct_completion(ex))
    assert task.prompt_with_hint(ex).count("(CORRECT)") == 1
  assert examples[0].id == "1afa02df02c908a558b4036e80242fac" and examples[0].answer == "a"
  assert csqa.CommonsenseQATask(CSQA_DIR, use_tfds=False).load("test") == examples
  with pytest.raises(FileNotFoundError, match="train_rand_split.jsonl"):
    task.load("train")  # The train split is the user's to supply.


def test_arithmetic_builder_splits(builders, tmp_path):
  from starjax.data import arithmetic

  kwargs = dict(digits=(1, 2), n_train_per_digit=60, n_test_per_digit=15, ood_digits=(3,), seed=4)
  cfg = builders.arithmetic_config(**kwargs)
  builder = builders.prepare(builders.Arithmetic, tfds_dir=tmp_path, config=cfg)
  splits = {s: list(builders.load_split(builder, s)) for s in ("train", "test", "ood_test")}
  pairs = {s: {(r["a"], r["b"]) for r in rows} for s, rows in splits.items()}
  assert not pairs["train"] & pairs["test"]
  assert {r["digits"] for r in splits["ood_test"]} == {3}
  assert {r["digits"] for r in splits["train"]} == {1, 2}
  expected = arithmetic.make_splits(4, digits=(1, 2), n_train_per_digit=60, n_test_per_digit=15,
                                    ood_digits=(3,))
  for s, problems in expected.items():
    assert [(int(r["a"]), int(r["b"])) for r in splits[s]] == [(p.a, p.b) for p in problems]
    assert all(int(r["answer"]) == int(r["a"]) + int(r["b"]) for r in splits[s])
  # The default config is the predefined one (the STaR setting), others are named by arguments.
  assert builders.arithmetic_config() is builders.Arithmetic.BUILDER_CONFIGS[0]
  assert cfg.name == "d1-2_train60_test15_ood3_seed4"


# --------------------------------------------------------------------------------------------------
# Registry.


def test_registry():
  assert registry.task_names() == ["arithmetic", "commonsense_qa", "gsm8k"]
  assert isinstance(registry.get_task("gsm8k", n_few_shot=2), gsm8k.Gsm8kTask)
  assert isinstance(registry.get_task("commonsense_qa"), csqa.CommonsenseQATask)
  task = registry.get_task("arithmetic", digits=(1,), n_train_per_digit=5, n_test_per_digit=2,
                           ood_digits=(2,))
  assert task.name == "arithmetic" and len(task.load("train")) == 5
  with pytest.raises(configs.ConfigError, match="arithmetic, commonsense_qa, gsm8k"):
    registry.get_task("gsm9k")
  with pytest.raises(configs.ConfigError, match="n_shots"):
    registry.get_task("gsm8k", n_shots=3)


def test_csqa_train_from_dev_is_a_disjoint_holdout():
  if not (SHARED_DATA / "commonsenseqa").exists():
    pytest.skip("shared CommonsenseQA data not available")
  from starjax.data.commonsense_qa import CommonsenseQATask
  task = CommonsenseQATask(SHARED_DATA / "commonsenseqa", use_tfds=False, train_from_dev=50)
  train, dev = task.load("train"), task.load("validation")
  assert len(train) == 50 and len(dev) == 1221 - 50
  assert not {e.id for e in train} & {e.id for e in dev}
  with pytest.raises(ValueError, match="leaves no validation"):
    CommonsenseQATask(SHARED_DATA / "commonsenseqa", use_tfds=False, train_from_dev=5000).load("train")
