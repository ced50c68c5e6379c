"""Tasks by name: `get_task("gsm8k", data_dir=...)`."""

from __future__ import annotations

import importlib
from typing import Any

from starjax import configs
from starjax.data.tasks import Task

# name -> (module, class); modules are imported on demand.
_TASKS: dict[str, tuple[str, str]] = {
  "arithmetic": ("starjax.data.arithmetic_task", "ArithmeticTask"),
  "gsm8k": ("starjax.data.gsm8k", "Gsm8kTask"),
  "commonsense_qa": ("starjax.data.commonsense_qa", "CommonsenseQATask"),
}


def task_names() -> list[str]:
  return sorted(_TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
  """The task called `name`, built with `kwargs` (its constructor's keyword arguments).

  Raises:
    configs.ConfigError (a ValueError): for an unknown name or an unknown keyword argument.
  """
  if name not in _TASKS:
    raise configs.ConfigError(f"Unknown task {name!r}; known tasks: {', '.join(task_names())}.")
  module, cls_name = _TASKS[name]
  cls = getattr(importlib.import_module(module), cls_name)
  return configs.call_with_config(cls, kwargs, "config.task")
