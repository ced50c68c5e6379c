"""Robust JSON-lines reading: a malformed row is reported with its file and line, never fatal.

A row is malformed when it is not valid UTF-8 or JSON, is not a JSON object, lacks a required
field, has a field of the wrong type, or is rejected by the caller's `parse` function. Each such
row becomes a `JsonlError` (also logged as a warning) and reading goes on with the next line.
Blank lines are skipped silently. A missing or unreadable file is an ordinary exception.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# Errors logged one by one per file; the rest are summarised in one line.
MAX_LOGGED_ERRORS = 20

# Exceptions a `parse` function raises to reject a row (anything else is a bug and propagates).
ROW_ERRORS = (ValueError, KeyError, TypeError, IndexError)


@dataclasses.dataclass(frozen=True)
class JsonlError:
  """A malformed row: where it is and what is wrong with it."""

  path: str
  line: int  # 1-based line number in `path`.
  message: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.message}"


@dataclasses.dataclass(frozen=True)
class JsonlRow(Generic[T]):
  """A well-formed row and its 1-based line number."""

  line: int
  value: T


def check_fields(row: Any, fields: Mapping[str, type | tuple[type, ...]]) -> None:
  """Raises ValueError unless `row` is an object holding each field with one of its types."""
  if not isinstance(row, dict):
    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
  for name, types in fields.items():
    if name not in row:
      raise ValueError(f"missing field {name!r}")
    allowed = types if isinstance(types, tuple) else (types,)
    value = row[name]
    # bool is an int subclass in Python, but true/false are not numbers in JSON.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
      raise ValueError(f"field {name!r} must be {' or '.join(t.__name__ for t in allowed)}, "
                       f"got {type(value).__name__}")


def read_jsonl(
  path: str | os.PathLike[str],
  parse: Callable[[dict[str, Any]], T] | None = None,
  *,
  fields: Mapping[str, type | tuple[type, ...]] | None = None,
) -> tuple[list[JsonlRow[T]], list[JsonlError]]:
  """Reads a JSON-lines file, keeping the good rows and reporting the malformed ones.

  Args:
    path: the file.
    parse: turns a row (a dict that passed `fields`) into the value kept; it rejects the row by
      raising ValueError, KeyError, TypeError or IndexError. Default: keep the dict.
    fields: required top-level fields and their allowed types, e.g. {"question": str}.

  Returns:
    (rows, errors): the well-formed rows in file order with their line numbers, and one error per
    malformed row.
  """
  path_str = os.fspath(path)
  rows: list[JsonlRow[Any]] = []
  errors: list[JsonlError] = []
  with open(path_str, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
        if not text.strip():
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
        check_fields(row, fields or {})
        value = parse(row) if parse is not None else row
      except UnicodeDecodeError as e:
        error = JsonlError(path_str, line_no, f"invalid UTF-8: {e.reason}")
      except KeyError as e:  # row["field"] in `parse`.
        error = JsonlError(path_str, line_no, f"missing field {e.args[0] if e.args else ''!r}")
      except ROW_ERRORS as e:
        error = JsonlError(path_str, line_no, str(e) or type(e).__name__)
      else:
        rows.append(JsonlRow(line_no, value))
        continue
      errors.append(error)
      if len(errors) <= MAX_LOGGED_ERRORS:
        log.warning("Skipping malformed row %s", error)
  if len(errors) > MAX_LOGGED_ERRORS:
    log.warning("%s: %d malformed rows in all (%d logged above); %d rows read.", path_str,
                len(errors), MAX_LOGGED_ERRORS, len(rows))
  return rows, errors


def find_split_files(directory: str | os.PathLike[str],
                     names: Mapping[str, tuple[str, ...]]) -> dict[str, Path]:
  """{split: path} for each split that has a file in `directory`.

  `names` gives the accepted file names of each split, in order of preference.
  """
  directory = Path(directory)
  found = {}
  for split, candidates in names.items():
    path = next((directory / n for n in candidates if (directory / n).is_file()), None)
    if path is not None:
      found[split] = path
  return found
