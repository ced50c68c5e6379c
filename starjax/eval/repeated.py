r"""Repeated sampling: N samples per problem -> pass@k for every k, majority vote, coverage fit.

Library: `run_repeated_sampling(task, examples, cfg, params, tokenizer, ...)` samples, scores
with the task's checker and (given `out_dir`) writes

* `results.json`: settings, pass@k for k = 1..N, majority-vote accuracy, the power-law fit of
  coverage, per-group metrics;
* `samples.jsonl`: one line per problem with every sample's text, extracted answer and
  correctness;
* `coverage.png`: coverage against k with the fit and the majority-vote line.

Each file is written to a temporary name and renamed into place; results.json comes last, so its
presence marks a complete run.

Command line (any config field can be overridden, unknown keys are rejected):

  python -m starjax.eval.repeated --config=experiments/repeated_arithmetic.py --workdir=DIR
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.sharding import Mesh
from ml_collections import config_dict, config_flags

from starjax import configs, tokenizers
from starjax import utils_io as fileio
from starjax.data.arithmetic_task import ArithmeticTask
from starjax.data.tasks import Example, Task
from starjax.eval import checkpoints, passk, plots
from starjax.models.config import ModelConfig
from starjax.parallel import mesh as mesh_lib
from starjax.sampling import generate_text

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
PLOT_FILE = "coverage.png"
FIT_POINTS = 40  # Log-spaced k values used for the power-law fit.


def score_samples(task: Task, examples: Sequence[Example],
                  completions: Sequence[Sequence[Any]]) -> tuple[dict[str, Any], list[dict]]:
  """Scores N completions per problem; returns (metrics, per-problem records).

  Args:
    task: answer extraction and checking.
    examples: P problems.
    completions: per problem, N `Completion`s (or plain strings), the same N for every problem.

  Returns:
    metrics: JSON-ready dict (see `run_repeated_sampling`).
    records: one JSON-ready dict per problem (the lines of `samples.jsonl`).

  The majority-vote answer of a problem counts as correct when the samples that gave it are
  (`task.is_correct` of its first such sample), so a task's own checker decides, as for pass@k.
  """
  if len(examples) == 0:
    raise ValueError("No problems to score.")
  if len(completions) != len(examples):
    raise ValueError(f"{len(completions)} completion lists for {len(examples)} problems.")
  n = {len(row) for row in completions}
  if len(n) != 1 or 0 in n:
    raise ValueError(f"Every problem needs the same, positive number of samples; got {sorted(n)}.")
  n = n.pop()

  records, correct, answers, maj_correct = [], [], [], []
  for ex, row in zip(examples, completions):
    texts = [c if isinstance(c, str) else c.text for c in row]
    got = [task.extract_answer(t) for t in texts]
    ok = [bool(task.is_correct(ex, t)) for t in texts]
    maj = passk.majority_vote(got)
    maj_ok = maj is not None and ok[got.index(maj)]
    correct.append(ok)
    answers.append(got)
    maj_correct.append(maj_ok)
    samples = []
    for j, (c, t) in enumerate(zip(row, texts)):
      s = {"text": t, "answer": got[j], "correct": ok[j]}
      if not isinstance(c, str):
        s.update(logprob=c.logprob, finished=c.finished, n_tokens=len(c.tokens))
      samples.append(s)
    records.append({"id": ex.id, "group": task.group(ex), "question": ex.question,
                    "gold": task.canonical(ex.answer), "num_correct": int(sum(ok)),
                    "majority": maj, "majority_correct": maj_ok, "samples": samples})

  correct = np.asarray(correct, bool)
  ks = np.arange(1, n + 1)
  curve = passk.pass_at_k_curve(correct, ks)
  fit, fit_error = None, None
  # Fit on log-spaced k: consecutive pass@k values are strongly correlated, and all of 1..N would
  # weight the largest decade of k most.
  fit_ks = np.unique(np.round(np.geomspace(1, n, min(n, FIT_POINTS))).astype(int))
  try:
    a, b = passk.fit_power_law(fit_ks, curve[fit_ks - 1])
    keep = (curve > 0) & (curve < 1)
    rmse = float(np.sqrt(np.mean((np.log(curve[keep]) - np.log(passk.power_law(ks[keep], a, b)))
                                 ** 2)))
    fit = {"a": a, "b": b, "rmse_log_coverage": rmse, "fit_ks": fit_ks.tolist()}
  except ValueError as e:  # Too few points strictly between 0 and 1 (e.g. all solved at k=1).
    fit_error = str(e)

  groups: dict[str, list[int]] = {}
  for i, ex in enumerate(examples):
    groups.setdefault(task.group(ex), []).append(i)
  per_group = {}
  for g, idx in sorted(groups.items()):
    sub = passk.pass_at_k_curve(correct[idx], [1, n])
    per_group[g] = {"n_problems": len(idx), "pass@1": float(sub[0]), f"pass@{n}": float(sub[1]),
                    "majority_accuracy": float(np.mean([maj_correct[i] for i in idx]))}

  no_answer = np.mean([[a is None for a in row] for row in answers])
  metrics = {
      "n_problems": len(examples),
      "num_samples": n,
      "pass@1": float(curve[0]),
      f"pass@{n}": float(curve[-1]),
      "majority_accuracy": float(np.mean(maj_correct)),
      "pass_at_k": {"k": ks.tolist(), "value": curve.tolist()},
      "power_law_fit": fit,
      "power_law_fit_error": fit_error,
      "no_answer_fraction": float(no_answer),
      "per_group": per_group,
  }
  return metrics, records


def run_repeated_sampling(task: Task, examples: Sequence[Example], cfg: ModelConfig, params: Any,
                          tokenizer: Any, *, num_samples: int, max_new_tokens: int,
                          temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                          seed: int = 0, mesh: Mesh | None = None, batch_size: int = 32,
                          few_shot: bool = True, progress: bool = True,
                          out_dir: str | os.PathLike | None = None,
                          metadata: dict[str, Any] | None = None) -> dict[str, Any]:
  """Draws `num_samples` completions per example and measures coverage and majority vote.

  Prompts are `task.few_shot() + task.prompt(ex)` (without the few-shot part if `few_shot` is
  False); sampling stops at `task.stop`. Sample j of problem i depends only on (seed, i, j).

  Returns:
    The contents of `results.json`: "pass@1", "pass@N", "majority_accuracy", "pass_at_k"
    ({"k": [1..N], "value": [...]}), "power_law_fit" ({"a", "b", "fit_ks",
    "rmse_log_coverage" over all k with 0 < pass@k < 1}, or None with the reason in
    "power_law_fit_error"), "per_group" (pass@1, pass@N and majority accuracy per
    `task.group`), "no_answer_fraction", "finished_fraction", "sampling" (the settings) and
    "timing", plus "metadata" when given (e.g. the run config). With `out_dir`, also writes
    the three files there (see `write_outputs`).
  """
  if len(examples) == 0:
    raise ValueError("No examples given.")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  shots = task.few_shot() if few_shot else ""
  prompts = [shots + task.prompt(ex) for ex in examples]
  t0 = time.perf_counter()
  completions = generate_text(cfg, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                              num_samples=num_samples, temperature=temperature, top_k=top_k,
                              top_p=top_p, stop=task.stop, seed=seed, mesh=mesh,
                              batch_size=batch_size, progress=progress)
  seconds = time.perf_counter() - t0
  metrics, records = score_samples(task, examples, completions)
  n_samples = len(examples) * num_samples
  results = {
      "task": task.name,
      **metrics,
      "finished_fraction": float(np.mean([s["finished"] for r in records
                                          for s in r["samples"]])),
      "sampling": {"num_samples": num_samples, "max_new_tokens": max_new_tokens,
                   "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                   "few_shot": few_shot, "batch_size": batch_size},
      "timing": {"sampling_s": seconds, "samples_per_s": n_samples / max(seconds, 1e-9)},
  }
  if metadata is not None:
    results["metadata"] = metadata
  if out_dir is not None:
    write_outputs(out_dir, results, records)
  return results


def write_outputs(out_dir: str | os.PathLike, results: dict[str, Any],
                  records: Sequence[dict]) -> None:
  """Writes samples.jsonl, coverage.png and (last, as the completion marker) results.json.

  An existing results.json is removed first, so a run that dies half-way never leaves the old
  results next to new samples.
  """
  out_dir = Path(out_dir)
  (out_dir / RESULTS_FILE).unlink(missing_ok=True)
  fileio.write_text_atomic(out_dir / SAMPLES_FILE, "".join(json.dumps(r) + "\n" for r in records))
  fit = results.get("power_law_fit")
  n = results["num_samples"]
  plots.plot_coverage(out_dir / PLOT_FILE, results["pass_at_k"]["k"], results["pass_at_k"]["value"],
                      fit=None if fit is None else (fit["a"], fit["b"]),
                      majority=results["majority_accuracy"],
                      title=f"{results.get('task', '')}: {results['n_problems']} problems, "
                            f"N={n}")
  fileio.write_text_atomic(out_dir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """The `sampling` section: decoding settings and batch size."""

  num_samples: int
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  batch_size: int = 32

  def __post_init__(self):
    for name in ("num_samples", "max_new_tokens", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"sampling.{name} must be >= 1, got {getattr(self, name)}.")


_SECTIONS = ("task", "split", "n_problems", "problem_seed", "few_shot", "sampling", "model",
             "tokenizer", "mesh", "progress")
_MODEL_KEYS = ("checkpoint", "step", "pretrained")


def default_config() -> config_dict.ConfigDict:
  """Every field with its default; experiment files start from this and change what they need.

  Fields:
    task: {"name": registry name, "kwargs": constructor arguments}.
    split: which split of the task to sample on.
    n_problems: how many problems (0: the whole split); a subset is drawn with `problem_seed`
      and kept in split order.
    few_shot: prepend `task.few_shot()` to every prompt.
    sampling: `SamplingConfig` fields.
    model: either `checkpoint` (a `python -m starjax.train` workdir; `step` -1 = latest) or
      `pretrained` (a name or path for `starjax.models.load`, see `find_pretrained_loader`).
    tokenizer: tokenizer spec; "" = the checkpoint run's own (required with `pretrained` unless
      the loader returns one).
    mesh: sampling mesh (prompts are split over the data and fsdp axes).
    progress: show a progress bar.
  """
  c = config_dict.ConfigDict()
  c.task = {"name": "arithmetic", "kwargs": {}}
  c.split = "test"
  c.n_problems = 0
  c.problem_seed = 0
  c.few_shot = True
  c.sampling = {"num_samples": 16, "max_new_tokens": 128,
                **{f.name: f.default for f in dataclasses.fields(SamplingConfig)
                   if f.default is not dataclasses.MISSING}}
  c.model = {"checkpoint": "", "step": -1, "pretrained": ""}
  c.tokenizer = ""
  c.mesh = {f.name: f.default for f in dataclasses.fields(mesh_lib.MeshConfig)}
  c.progress = True
  return c


def make_task(name: str, kwargs: dict[str, Any]) -> Task:
  """`starjax.data.registry.get_task` when available; otherwise the built-in arithmetic task."""
  try:
    from starjax.data import registry  # pylint: disable=g-import-not-at-top
  except ImportError:
    registry = None
  if registry is not None:
    try:
      return registry.get_task(name, **kwargs)
    except (KeyError, TypeError, ValueError) as e:
      raise configs.ConfigError(
          f"config.task: cannot build task {name!r} with {kwargs}: {e}") from e
  if name != "arithmetic":
    raise configs.ConfigError(f"config.task.name={name!r}: without starjax.data.registry only "
                              f"'arithmetic' is available.")
  return configs.call_with_config(ArithmeticTask, kwargs, "config.task.kwargs")


def _load_model(model: dict[str, Any], tokenizer_spec: str, mesh: Mesh
                ) -> tuple[ModelConfig, Any, Any, dict[str, Any]]:
  """(model config, params, tokenizer, provenance) from the `model` section."""
  configs.check_keys(model, list(_MODEL_KEYS), "config.model")
  ckpt, name = model.get("checkpoint", ""), model.get("pretrained", "")
  if bool(ckpt) == bool(name):
    raise configs.ConfigError("Set exactly one of config.model.checkpoint (a training workdir) and "
                              "config.model.pretrained (a model name).")
  if ckpt:
    step = model.get("step", -1)
    cfg, params, spec, step, _ = checkpoints.restore_params(
        ckpt, step=None if step < 0 else step, mesh=mesh)
    tok = tokenizers.load_tokenizer(tokenizer_spec or spec)
    return cfg, params, tok, {"checkpoint": str(ckpt), "step": step,
                              "tokenizer": tokenizer_spec or spec}
  loader = find_pretrained_loader()
  if loader is None:
    raise configs.ConfigError(
        f"config.model.pretrained={name!r} needs `starjax.models.load` (or "
        f"`starjax.models.registry.load`), which this checkout does not have; use "
        f"config.model.checkpoint instead.")
  accepts_mesh = "mesh" in inspect.signature(loader).parameters
  loaded = loader(name, mesh=mesh) if accepts_mesh else loader(name)
  if isinstance(loaded, tuple):
    cfg, params, tok = loaded[:3]
  else:
    cfg, params, tok = loaded.cfg, loaded.params, getattr(loaded, "tokenizer", None)
  if tokenizer_spec:
    tok = tokenizers.load_tokenizer(tokenizer_spec)
  elif tok is None:
    raise configs.ConfigError(f"Pretrained model {name!r} has no tokenizer; set config.tokenizer.")
  elif isinstance(tok, (str, os.PathLike)):
    tok = tokenizers.load_tokenizer(tok)
  return cfg, params, tok, {"pretrained": name, "tokenizer": tokenizer_spec or None}


def find_pretrained_loader() -> Callable[..., Any] | None:
  """`starjax.models.load` or `starjax.models.registry.load`, whichever exists (else None).

  Contract: `load(name, *, mesh=None, ...)` returns an object with `cfg`, `params` and
  `tokenizer` attributes (or a (cfg, params, tokenizer) tuple); tokenizer may be None or a spec.
  """
  for module, attr in (("starjax.models", "load"), ("starjax.models.registry", "load")):
    try:
      fn = getattr(importlib.import_module(module), attr, None)
    except ImportError:
      continue
    if callable(fn) and not isinstance(fn, types.ModuleType):
      return fn
  return None


def select_problems(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
  """All examples if n == 0 (or n >= len), else n of them drawn with `seed`, in split order."""
  if n < 0:
    raise configs.ConfigError(f"config.n_problems must be >= 0, got {n}.")
  if n == 0 or n >= len(examples):
    return list(examples)
  idx = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
  return [examples[i] for i in idx]


def run_from_config(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
  """The CLI's work, importable: validates `config`, loads model and task, samples, writes files.

  Raises:
    configs.ConfigError: unknown keys, wrong types or inconsistent settings (before any work).
    FileNotFoundError: the workdir's parent or the checkpoint does not exist.
  """
  top = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  configs.check_keys(top, list(_SECTIONS), "config")
  task_section = dict(top.get("task") or {})
  configs.check_keys(task_section, ["name", "kwargs"], "config.task")
  sampling = configs.to_dataclass(SamplingConfig, top.get("sampling"), "config.sampling")
  mesh_cfg = configs.to_dataclass(mesh_lib.MeshConfig, top.get("mesh"), "config.mesh")
  workdir = Path(workdir)
  if not workdir.absolute().parent.is_dir():
    raise FileNotFoundError(f"The parent of the workdir {str(workdir)!r} does not exist.")

  task = make_task(str(task_section.get("name", "")), dict(task_section.get("kwargs") or {}))
  try:
    examples = task.load(str(top.get("split", "test")))
  except ValueError as e:
    raise configs.ConfigError(f"config.split: {e}") from e
  examples = select_problems(examples, int(top.get("n_problems", 0)),
                             int(top.get("problem_seed", 0)))
  mesh = mesh_lib.make_mesh(mesh_cfg)
  cfg, params, tok, provenance = _load_model(dict(top.get("model") or {}),
                                             str(top.get("tokenizer", "")), mesh)
  log.info("%d problems x %d samples from %s", len(examples), sampling.num_samples, provenance)
  return run_repeated_sampling(
      task, examples, cfg, params, tok, **dataclasses.asdict(sampling), mesh=mesh,
      few_shot=bool(top.get("few_shot", True)), progress=bool(top.get("progress", True)),
      out_dir=workdir, metadata={"config": top, "model": provenance})


def main(argv: list[str]) -> None:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only-manager notices.
  try:
    results = run_from_config(_FLAGS["config"].value, _FLAGS["workdir"].value)
  except (configs.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  keys = ("task", "n_problems", "num_samples", "pass@1", f"pass@{results['num_samples']}",
          "majority_accuracy", "power_law_fit", "per_group", "timing")
  print(json.dumps({k: results[k] for k in keys if k in results}, indent=1))


_FLAGS: dict[str, Any] = {}

if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module defines none.
  _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                     lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Output directory.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
