"""Saving and loading bare parameter trees (orbax; atomic: written to a temp dir, then renamed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_params(path: str | os.PathLike, params: Any) -> None:
  """Writes `params` to `path` (a new directory). Orbax commits by renaming a temp dir, so an
  interrupted save leaves no half-written `path`."""
  path = Path(path).absolute()
  if path.exists():
    raise FileExistsError(f"Refusing to overwrite existing params at {path}.")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)
    ckptr.wait_until_finished()


def load_params(path: str | os.PathLike, like: Any) -> Any:
  """Restores params saved by `save_params` onto the shapes/shardings of `like`.

  `like` may hold arrays (their shardings are used) or ShapeDtypeStructs with shardings.
  """
  path = Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"No params at {path}.")
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      like)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def params_exist(path: str | os.PathLike) -> bool:
  return Path(path).is_dir()
