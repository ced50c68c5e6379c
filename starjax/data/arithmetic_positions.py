"""Position coupling for the arithmetic scratchpad: position ids by line and by field.

After Cho et al. 2024 ("Position Coupling: Improving Length Generalization of Arithmetic
Transformers Using Task Structure"). The text of an example is unchanged; only the position ids
that the model's rotary embedding sees are chosen from the task's structure, so that every lookup
the scratchpad needs is one fixed relative offset at every operand width, and a small model
trained on 1-2 digit scratchpads can run the same lookups on wider ones.

Each line of an example gets its own block of `LINE` ids. Inside a line, every field is
right-aligned at a fixed id, and digits are 2 ids apart (the space between takes the odd id):

  4 5 6 + 7 8 9 , C: 0      a's units digit at A, '+' at A + 2, b's units digit at B,
  4 5 + 7 8 , 5 C: 1        ',' at COMMA, the sum's units digit at S, 'C' at S + 2 and the
  4 + 7 , 4 5 C: 1          carry at S + 5; every other character follows the one before it.
  , 2 4 5 C: 1

So the digits that the next line adds (a's and b's units digits) and the carry are at the same
ids on every line, and the space after ',' that predicts the new sum digit, and the space that
predicts the new carry, read them at offsets that do not depend on the width or the line. The sum
digits already written keep their ids from line to line (a copy at offset LINE), an operand's
kept digits move one digit pair right (a copy at offset LINE + 2), and a newline takes the id just
before the next line's first character, so the first operand digit is also a fixed-offset copy.
The prompt's operand line has the layout of the scratchpad's first line, which copies it at the
same ids; the result line ("c d d d") and the answer line are right-aligned at S. A digits line
right after "Target:" (a hint, or a direct answer) is laid out as n + 1 digits ending at S,
since its width is not known when it starts: a direct answer without a final carry then ends at
S - 2.

Ids increase along every example, so the causal mask by position is still the causal mask by
sequence order, and a KV cache needs no change. A character's id depends on it and on what came
before only, except the prompt's operand widths, which are read from the prompt up front. One
implementation serves the host (numpy, `coupled_positions`) and the decoder (jax, `step`).
Operands wider than `MAX_WIDTH` digits lose the alignment (ids are kept increasing).

Measured (seed-model probe, 2-core CPU, 2026-12-03): with these ids, a model trained on 1-2 digit
scratchpads copies 3-5 digit operands into the first line and adds the first digit pair right;
without them it could not copy a 3-digit operand. Two other layouts were tried and dropped: ids by
a digit's significance in the original operand (so kept digits keep their id, with the sum field's
frame moving left one pair per line), and the prompt's operands one pair to the left (so the
first line copies them like every later line): both lost the first line's copy at 3 digits.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

LINE = 256  # Ids per line.
MAX_WIDTH = 20
A = 2 * MAX_WIDTH  # a's units digit.
PLUS = A + 2
B = PLUS + 2 * MAX_WIDTH + 2  # b's units digit.
COMMA = B + 2
S = COMMA + 2 * MAX_WIDTH + 4  # The sum's units digit.
CARRY_MARK = S + 2  # 'C' of "C: c"; the carry digit follows at S + 5.

_OPER, _FINAL, _SUM, _TEXT = range(4)  # Line kinds.
_NONE = -(1 << 20)
_SCRATCH = tuple(ord(c) for c in "<scratch>")
_OPERANDS_RE = re.compile(r"^([0-9](?: [0-9])*) \+ ([0-9](?: [0-9])*)$", re.M)

# State fields, in this order in a row of the (R, len(FIELDS)) int32 state array.
FIELDS = ("width_a", "width_b", "line", "scratch", "kind", "field", "count", "carry", "prev",
          "length", "match")


def initial_state(width_a: int, width_b: int) -> np.ndarray:
  """The state before an example's first character (numpy int32 row)."""
  values = {"width_a": width_a, "width_b": width_b, "scratch": -1, "kind": _TEXT, "prev": -1}
  return np.asarray([values.get(f, 0) for f in FIELDS], np.int32)


def _layout(xp: Any, st: dict[str, Any], line: Any, scratch: Any) -> tuple[Any, Any, Any, Any]:
  """(kind, width of a, width of b, digits of the sum field) of a line, before it starts."""
  n = xp.maximum(st["width_a"], st["width_b"])
  conds = [line == 1, scratch < 0, scratch == 0, scratch < n, scratch == n,
           scratch == n + 1, scratch == n + 3]
  kinds = [_OPER, _TEXT, _OPER, _OPER, _FINAL, _SUM, _SUM]
  wa = [st["width_a"], 0, st["width_a"], n - scratch, 0, 0, 0]
  wb = [st["width_b"], 0, st["width_b"], n - scratch, 0, 0, 0]
  # Digits lines: a hint or direct answer after "Target:" (n + 1), the result line (n + 1) and
  # the answer line, which drops a 0 carry.
  sums = [0, n + 1, 0, scratch, n, n + 1, n + st["carry"]]
  pick = lambda values, default: xp.select(conds, [xp.asarray(v) + 0 * n for v in values],
                                           default)
  return pick(kinds, _TEXT), pick(wa, 0), pick(wb, 0), pick(sums, 0)


def _first_id(xp: Any, st: dict[str, Any], line: Any, scratch: Any) -> Any:
  """Id (within its block) of a line's first character."""
  kind, wa, _, m = _layout(xp, st, line, scratch)
  return xp.select([kind == _OPER, kind == _FINAL, kind == _SUM],
                   [A - 2 * (wa - 1), COMMA + 0 * m, S - 2 * (m - 1)], 0 * m)


def step(st: dict[str, Any], ch: Any) -> tuple[Any, dict[str, Any]]:
  """Id of the next character `ch` (its code; -1 for a non-character token), and the new state.

  Works elementwise on numpy or jax arrays of any shape (one state per row).
  """
  xp = jnp if any(isinstance(v, jnp.ndarray) for v in st.values()) else np
  ch = xp.asarray(ch)
  is_nl = ch == ord("\n")
  is_digit = (ch >= ord("0")) & (ch <= ord("9"))
  kind0, wa, wb, m = _layout(xp, st, st["line"], st["scratch"])
  # A line after "Target:" that starts with a digit is a hint or a direct answer.
  kind0 = xp.where((kind0 == _TEXT) & (st["scratch"] < 0) & (st["line"] >= 2) & is_digit, _SUM,
                   kind0)
  kind = xp.where(st["length"] == 0, kind0, st["kind"])
  f, count = st["field"], st["count"]
  rel_digit = xp.select(
      [(f == 0) & (kind == _OPER), (f == 0) & (kind == _SUM), (f == 1) & (kind == _OPER),
       f == 2],
      [A - 2 * (wa - 1 - count), S - 2 * (m - 1 - count), B - 2 * (wb - 1 - count),
       S - 2 * (m - 1 - count)], _NONE)
  is_plus = (ch == ord("+")) & (kind == _OPER) & (f == 0)
  is_comma = (ch == ord(",")) & ((kind == _OPER) | (kind == _FINAL)) & (f < 2)
  is_c = (ch == ord("C")) & (f == 2)
  rel = xp.select([is_digit, is_plus, is_comma, is_c], [rel_digit, PLUS + 0 * f, COMMA + 0 * f,
                                                         CARRY_MARK + 0 * f], _NONE)
  base = st["line"] * LINE
  pos = xp.where(rel == _NONE, st["prev"] + 1, xp.maximum(base + rel, st["prev"] + 1))
  # Newline: the next line's layout is known from the state.
  opened = (st["match"] == len(_SCRATCH)) & (st["length"] == len(_SCRATCH))
  scratch = xp.where(opened, 0, xp.where(st["scratch"] >= 0, st["scratch"] + 1, st["scratch"]))
  after_target = (scratch < 0) & (st["line"] >= 2)  # Hint, direct answer or "<scratch>" next.
  nl_rel = xp.where(after_target, -1, _first_id(xp, st, st["line"] + 1, scratch) - 1)
  pos = xp.where(is_nl, xp.maximum((st["line"] + 1) * LINE + nl_rel, st["prev"] + 1), pos)
  code = xp.asarray(_SCRATCH)[xp.minimum(st["length"], len(_SCRATCH) - 1)]
  matched = (st["match"] == st["length"]) & (st["length"] < len(_SCRATCH)) & (ch == code)
  field = xp.select([is_plus, is_comma, is_c], [1 + 0 * f, 2 + 0 * f, 3 + 0 * f], f)
  new = dict(
      st,
      line=st["line"] + is_nl,
      scratch=xp.where(is_nl, scratch, st["scratch"]),
      kind=kind,
      field=xp.where(is_nl, 0, field),
      count=xp.where(is_nl | is_plus | is_comma | is_c, 0, count + is_digit),
      carry=xp.where(is_digit & (f == 3), ch - ord("0"), st["carry"]),
      prev=pos,
      length=xp.where(is_nl, 0, st["length"] + 1),
      match=xp.where(is_nl, 0, st["match"] + matched),
  )
  new = {k: xp.asarray(v).astype(np.int32) for k, v in new.items()}
  return xp.asarray(pos).astype(np.int32), new


def as_dict(state: Any) -> dict[str, Any]:
  """(..., len(FIELDS)) array -> dict of (...) arrays."""
  return {f: state[..., i] for i, f in enumerate(FIELDS)}


def as_array(state: dict[str, Any]) -> Any:
  xp = jnp if any(isinstance(v, jnp.ndarray) for v in state.values()) else np
  return xp.stack([state[f] for f in FIELDS], axis=-1)


def prompt_widths(text: str) -> tuple[int, int]:
  """Operand widths from the first operand line ("4 5 6 + 7 8 9") of an example or prompt."""
  m = _OPERANDS_RE.search(text)
  if m is None:
    return 0, 0
  return len(m.group(1).split()), len(m.group(2).split())


def codes_positions(codes: Any, widths: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Ids of a sequence of character codes (-1 = not a character), and the state after it."""
  ids, finals = batch_positions(np.asarray(codes, np.int32).reshape(1, -1),
                                np.asarray([widths], np.int32))
  return ids[0], finals[0]


def coupled_positions(text: str, widths: tuple[int, int] | None = None) -> np.ndarray:
  """Position ids (one per character) of an arithmetic example, or of a prompt + completion."""
  widths = widths if widths is not None else prompt_widths(text)
  return codes_positions([ord(c) for c in text], widths)[0]


def batch_positions(codes: np.ndarray, widths: np.ndarray,
                    lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Ids of R sequences at once, stepping all rows together over time.

  Args:
    codes: int (R, T) character codes (-1 = not a character, e.g. BOS, EOS or padding; a row's
      ids past its end are meaningless).
    widths: int (R, 2) the operand widths of each row's prompt.
    lengths: int (R,) each row's length (default T): the returned state is the one after it.

  Returns:
    (ids (R, T) int32, states (R, len(FIELDS)) int32: each row's state after its last token).
  """
  r, t = codes.shape
  lengths = np.full(r, t) if lengths is None else np.asarray(lengths)
  st = as_dict(np.stack([initial_state(int(a), int(b)) for a, b in widths])
               if r else np.zeros((0, len(FIELDS)), np.int32))
  finals = as_array(st).copy()  # Rows of length 0 keep the initial state.
  ids = np.empty((r, t), np.int32)
  for i in range(t):
    ids[:, i], st = step(st, codes[:, i].astype(np.int32))
    done = lengths == i + 1
    finals[done] = as_array(st)[done]
  return ids, finals
