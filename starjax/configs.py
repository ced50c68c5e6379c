"""ml_collections ConfigDicts at the edge, frozen dataclasses inside.

`to_dataclass` converts one ConfigDict section into a dataclass and rejects unknown keys and
wrong types with an error that names the full key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config key is unknown, missing or of the wrong type."""


def _as_dict(section: Any) -> dict[str, Any]:
  if section is None:
    return {}
  if hasattr(section, "to_dict"):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise ConfigError(f"Expected a config section (mapping), got {type(section).__name__}.")


def _type_ok(value: Any, annotation: Any) -> bool:
  origin = typing.get_origin(annotation)
  if annotation is Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_type_ok(value, a) for a in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if origin in (tuple, list):
    return isinstance(value, (tuple, list))
  if origin in (dict, Mapping):
    return isinstance(value, Mapping)
  if isinstance(annotation, type):
    return isinstance(value, annotation)
  return True


def check_keys(given: Mapping[str, Any], known: list[str], where: str) -> None:
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ConfigError(f"Unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                      f"known keys of {where}: {', '.join(sorted(known))}.")


def to_dataclass(cls: type[T], section: Any, where: str, **extra: Any) -> T:
  """Builds `cls` from a ConfigDict section, checking keys and types; `extra` fills the rest."""
  values = {**_as_dict(section), **extra}
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  check_keys(values, list(fields), where)
  hints = typing.get_type_hints(cls)
  for name, value in values.items():
    if not _type_ok(value, hints[name]):
      raise ConfigError(f"{where}.{name}={value!r} has type {type(value).__name__}; expected "
                        f"{hints[name]}.")
    if isinstance(value, list):
      values[name] = tuple(value)
  missing = [n for n, f in fields.items() if n not in values
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"Missing config key(s) {', '.join(f'{where}.{k}' for k in missing)}.")
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"Invalid {where}: {e}") from e


def check_call(fn: Callable[..., Any], section: Any, where: str, provided: tuple[str, ...] = ()
               ) -> dict[str, Any]:
  """Checks a section's keys against fn's keyword arguments (minus `provided`); returns them."""
  values = _as_dict(section)
  params = inspect.signature(fn).parameters
  known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
           and n not in provided]
  check_keys(values, known, where)
  return values


def call_with_config(fn: Callable[..., T], section: Any, where: str, **extra: Any) -> T:
  """Calls `fn(**section, **extra)` after checking the keys against fn's signature."""
  return fn(**check_call(fn, section, where, tuple(extra)), **extra)
