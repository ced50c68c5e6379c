"""A whole STaR experiment from one config: base model -> STaR iterations -> results.json + plot.

The base model either comes from a seed-training run (`config.base.pretrain`, a full
`starjax.train` config trained into `workdir/base`, itself resumable) or from a pretrained
checkpoint (`config.base.pretrained`, a name or path for `starjax.models.load`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from starjax import configs
from starjax.data.tasks import Task
from starjax.parallel import mesh as mesh_lib
from starjax.parallel import multihost
from starjax.star.config import STaRConfig
from starjax.star.loop import STaR
from starjax.train import optim
from starjax.utils_io import atomic_write_json, atomic_writer, read_json

log = logging.getLogger(__name__)

_SECTIONS = ("task", "base", "star", "mesh", "tokenizer")


def make_task(section: Any) -> Task:
  """`{"name": ..., **kwargs}` -> Task."""
  values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  name = values.pop("name", None)
  try:
    from starjax.data import registry  # pylint: disable=g-import-not-at-top
    return registry.get_task(name, **values)
  except ImportError:
    from starjax.data.arithmetic_task import ArithmeticTask  # pylint: disable=g-import-not-at-top
    if name != "arithmetic":
      raise configs.ConfigError(f"config.task.name={name!r} is not available.") from None
    return configs.call_with_config(ArithmeticTask, values, "config.task")


def parse_star_config(section: Any) -> STaRConfig:
  values = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
  opt = configs.to_dataclass(optim.OptimizerConfig, values.pop("optimizer", {}),
                             "config.star.optimizer")
  return configs.to_dataclass(STaRConfig, values, "config.star", optimizer=opt)


def _base_model(config: Any, workdir: Path, tokenizer_spec: str):
  """Returns (model_cfg, params, tokenizer) of M_0."""
  from starjax import tokenizers  # pylint: disable=g-import-not-at-top
  from starjax.train import loop as train_loop  # pylint: disable=g-import-not-at-top

  base = config.base
  if base.get("pretrain") is not None:
    pre = base.pretrain
    log.info("base model: seed training into %s", workdir / "base")
    result = train_loop.train_and_evaluate(pre, workdir / "base")
    if result["preempted"]:
      raise SystemExit("Stopped during base-model training; rerun the same command to resume.")
    tok = tokenizers.load_tokenizer(pre.tokenizer)
    run = train_loop.parse_config(pre, vocab_size=tok.vocab_size)
    return run.model, result["state"].params, tok
  if base.get("pretrained"):
    from starjax import models  # pylint: disable=g-import-not-at-top
    loaded = models.load(base.pretrained)
    return loaded.cfg, loaded.params, loaded.tokenizer
  raise configs.ConfigError("config.base needs `pretrain` (a train config) or `pretrained`.")


def summarize(history: list[dict[str, Any]], task_name: str) -> dict[str, Any]:
  """results.json content: per iteration, accuracy per group of each eval split + statistics."""
  rows = []
  for h in history:
    row = {k: v for k, v in h.items() if k != "eval"}
    for split, acc in h["eval"].items():
      groups = {g: a for g, a in acc.items() if g != "all"}
      prefix = "" if split == "test" else f"{split}_"
      row[f"{prefix}accuracy"] = acc.get("all")
      row[f"{prefix}accuracy_by_group"] = groups
      if task_name == "arithmetic":
        row[f"{prefix}accuracy_by_digits"] = groups
    rows.append(row)
  return {"task": task_name, "iterations": rows}


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
  """Held-out accuracy per group (digit count) across iterations, one line per group."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  its = results["iterations"]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  groups = sorted({g for r in its for g in r.get("accuracy_by_group", {})},
                  key=lambda g: (len(g), g))
  for g in groups:
    ax.plot([r["iteration"] for r in its], [r["accuracy_by_group"].get(g) for r in its],
            marker="o", label=f"{g} digits" if results["task"] == "arithmetic" else g or "all")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel("STaR iteration (0 = base model)")
  ax.set_ylabel("held-out accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"STaR on {results['task']}")
  fig.tight_layout()
  with atomic_writer(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def format_table(results: dict[str, Any]) -> str:
  """Markdown table: accuracy per group (if the task has groups), overall, STaR statistics."""
  its = results["iterations"]
  groups = sorted({g for r in its for g in r.get("accuracy_by_group", {}) if g},
                  key=lambda g: (len(g), g))
  head = ["iter", *groups, "all", "coverage", "rat. yield", "kept"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def num(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"

  for r in its:
    cells = [str(r["iteration"])]
    cells += [num(r["accuracy_by_group"].get(g)) for g in groups]
    cells += [num(r.get("accuracy"), 3), num(r.get("train_coverage")),
              num(r.get("rationalization_yield")), str(r.get("kept_examples", "-"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_experiment(config: Any, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the experiment; writes results.json and accuracy.png into workdir."""
  workdir = Path(workdir)
  top = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  configs.check_keys(top, list(_SECTIONS), "config")
  star_cfg = parse_star_config(config.star)
  mesh_cfg = configs.to_dataclass(mesh_lib.MeshConfig, config.mesh, "config.mesh")
  task = make_task(config.task)
  if not workdir.parent.is_dir():
    raise FileNotFoundError(f"The parent of the workdir {str(workdir)!r} does not exist.")
  workdir.mkdir(exist_ok=True)
  # The run's config next to its results, so tools (model soups, eval) can rebuild the task and
  # the model from the workdir alone. Stages are reused by file, so resuming under a different
  # config would silently mix the two: refuse instead.
  saved = workdir / "config.json"
  if saved.exists():
    import json  # pylint: disable=g-import-not-at-top
    if json.loads(json.dumps(top, sort_keys=True, default=str)) != read_json(saved):
      raise configs.ConfigError(
          f"{workdir} holds a run with a different config ({saved}); resuming would mix stages "
          "from both. Use a new --workdir, or the original config.")
  if multihost.is_primary():
    atomic_write_json(saved, top)
  model_cfg, params, tok = _base_model(config, workdir, config.tokenizer)
  mesh = mesh_lib.make_mesh(mesh_cfg)
  runner = STaR(task=task, model_cfg=model_cfg, base_params=params, tokenizer=tok,
                config=star_cfg, workdir=workdir, mesh=mesh,
                progress=progress and multihost.is_primary())

  def write(history):
    if not multihost.is_primary():
      return
    results = summarize(history, task.name)
    atomic_write_json(workdir / "results.json", results)
    plot_accuracy(results, workdir / "accuracy.png")

  history = runner.run(on_iteration=write)
  write(history)
  return summarize(history, task.name)
