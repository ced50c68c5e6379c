r"""Model soups (Wortsman et al. 2022): weight averages of fine-tunes that share one init.

* `uniform_soup(params_list)`: θ = (1/K) Σ_k θ_k.
* `greedy_soup(ingredients, evaluate)`: ingredients sorted by held-out score (descending; equal
  scores keep their input order); the soup starts as the best one and each next ingredient is
  added iff the candidate (n·θ_soup + θ_i)/(n+1) scores STRICTLY higher (ties are never added).
* `accuracy_fn(task, examples, ...)`: greedy-decoding accuracy of params, the `evaluate` above.
* `soup_star_run(workdir)`: soups over the iterations M_1..M_N of a STaR run (every M_n is
  fine-tuned from the same base model), written to `workdir/soups.json`.

Averages are accumulated in float32 (or the leaf dtype if wider) and cast back to each leaf's
dtype, so a soup has exactly the structure, shapes, dtypes (and shardings) of its ingredients.

Command line:

  python -m starjax.eval.soups --star_workdir=DIR [--split=test] [--held_out_split=NAME] \
      [--n_eval=N] [--iterations=1,2,3]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from starjax.data.tasks import Example, Task, accuracy_by_group
from starjax.models.config import ModelConfig
from starjax.sampling import generate_text
from starjax.utils_io import atomic_write_json

log = logging.getLogger(__name__)

SOUPS_FILE = "soups.json"
Params = Any


# ---------------------------------------------------------------------------------------------
# Averaging.


def _leaf_desc(x: Any) -> str:
  return f"shape {_shape(x)} dtype {_dtype(x)}"


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _dtype(x: Any) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def check_compatible(trees: Sequence[Params], names: Sequence[str] | None = None) -> None:
  """Raises ValueError unless all trees have one structure and equal leaf shapes and dtypes.

  The message names the two ingredients, the first mismatching leaf path and both leaves' shapes
  and dtypes. Non-floating leaves cannot be averaged and are rejected too.
  """
  if not trees:
    raise ValueError("No ingredients given.")
  names = [f"#{i}" for i in range(len(trees))] if names is None else list(names)
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(trees[0])
  for path, x in ref_leaves:
    if not jnp.issubdtype(_dtype(x), jnp.inexact):
      raise ValueError(f"Cannot average the non-floating leaf {jax.tree_util.keystr(path)} "
                       f"({_leaf_desc(x)}) of ingredient {names[0]!r}.")
  for name, tree in zip(names[1:], trees[1:]):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if treedef != ref_def:
      ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_leaves]
      paths = [jax.tree_util.keystr(p) for p, _ in leaves]
      i = next((i for i, (a, b) in enumerate(zip(ref_paths, paths)) if a != b),
               min(len(ref_paths), len(paths)))
      mine = ref_paths[i] if i < len(ref_paths) else "<no leaf>"
      theirs = paths[i] if i < len(paths) else "<no leaf>"
      raise ValueError(
          f"Ingredient {name!r} has a different tree structure from {names[0]!r} "
          f"({len(paths)} vs {len(ref_paths)} leaves): first mismatching leaf #{i} is {theirs} "
          f"in {name!r} but {mine} in {names[0]!r}.")
    for (path, a), (_, b) in zip(ref_leaves, leaves):
      if _shape(a) != _shape(b) or _dtype(a) != _dtype(b):
        raise ValueError(
            f"Ingredients {names[0]!r} and {name!r} differ at leaf {jax.tree_util.keystr(path)}: "
            f"{_leaf_desc(a)} vs {_leaf_desc(b)}.")


def _acc_dtype(x: Any) -> Any:
  return jnp.promote_types(_dtype(x), jnp.float32)


def _start_sum(tree: Params) -> Params:
  return jax.tree.map(lambda x: jnp.asarray(x, _acc_dtype(x)), tree)


def _add(total: Params, tree: Params) -> Params:
  return jax.tree.map(lambda s, x: s + jnp.asarray(x, s.dtype), total, tree)


def _divide(total: Params, n: int, like: Params) -> Params:
  return jax.tree.map(lambda s, x: (s / n).astype(_dtype(x)), total, like)


def uniform_soup(params_list: Sequence[Params], names: Sequence[str] | None = None) -> Params:
  """θ = (1/K) Σ_k θ_k, summed in (at least) float32 and cast back to each leaf's dtype.

  Raises:
    ValueError: no trees, or trees differing in structure, leaf shape or dtype (the message
      names the first mismatching leaf path).
  """
  params_list = list(params_list)
  check_compatible(params_list, names)
  total = _start_sum(params_list[0])
  for tree in params_list[1:]:
    total = _add(total, tree)
  return _divide(total, len(params_list), params_list[0])


@dataclasses.dataclass(frozen=True)
class SoupResult:
  """A greedy soup.

  Attributes:
    params: the average of the members.
    members: ingredient names in the soup, in the order they were added (best first).
    history: one record per ingredient in sorted order: {"name", "ingredient_score",
      "candidate_score" (score of the soup with it added; None for the first), "accepted",
      "soup_size" (members after the step)}.
    score: held-out score of the final soup.
    ingredient_scores: held-out score of every ingredient alone.
  """

  params: Params
  members: list[str]
  history: list[dict[str, Any]]
  score: float
  ingredient_scores: dict[str, float]


def greedy_soup(ingredients: Sequence[tuple[str, Params]], evaluate: Callable[[Params], float],
                *, scores: Mapping[str, float] | None = None) -> SoupResult:
  """Greedy soup: add ingredients in order of held-out score while the score strictly improves.

  Args:
    ingredients: (name, params) pairs with identical tree structure, shapes and dtypes.
    evaluate: held-out score of params (higher is better). Never pass a metric computed on the
      split the reported accuracy comes from: selection would then leak into the report.
    scores: precomputed held-out scores of the ingredients (by name), to skip evaluating them.

  Sorting is stable: ingredients with equal scores keep their input order. The candidate
  (n·θ_soup + θ_i)/(n+1) is formed from a running (float32) sum of the members, and it is kept
  only if `evaluate(candidate) > score(soup)`; a tie leaves the soup unchanged.

  Raises:
    ValueError: no ingredients, duplicate names, incompatible trees or a NaN score.
  """
  names = [n for n, _ in ingredients]
  trees = [p for _, p in ingredients]
  if len(set(names)) != len(names):
    raise ValueError(f"Ingredient names must be unique, got {names}.")
  check_compatible(trees, names)
  own = {} if scores is None else dict(scores)
  ing_scores = {n: float(own[n]) if n in own else float(evaluate(p)) for n, p in ingredients}
  if any(math.isnan(s) for s in ing_scores.values()):
    raise ValueError(f"NaN ingredient score: {ing_scores}.")
  order = sorted(range(len(names)), key=lambda i: -ing_scores[names[i]])

  first = order[0]
  total, n = _start_sum(trees[first]), 1
  best = ing_scores[names[first]]
  members = [names[first]]
  history = [{"name": names[first], "ingredient_score": best, "candidate_score": None,
              "accepted": True, "soup_size": 1}]
  for i in order[1:]:
    cand_total = _add(total, trees[i])
    cand_score = float(evaluate(_divide(cand_total, n + 1, trees[i])))
    accepted = cand_score > best
    if accepted:
      total, n, best = cand_total, n + 1, cand_score
      members.append(names[i])
    history.append({"name": names[i], "ingredient_score": ing_scores[names[i]],
                    "candidate_score": cand_score, "accepted": accepted, "soup_size": n})
    log.info("greedy soup: %s %s (%.4f; soup %.4f, %d members)", names[i],
             "added" if accepted else "rejected", cand_score, best, n)
  return SoupResult(params=_divide(total, n, trees[first]), members=members, history=history,
                    score=best, ingredient_scores=ing_scores)


# ---------------------------------------------------------------------------------------------
# Task accuracy.


def group_accuracy_fn(task: Task, examples: Sequence[Example], model_cfg: ModelConfig,
                      tokenizer: Any, *, batch_size: int, mesh: Mesh | None = None,
                      max_new_tokens: int = 160, progress: bool = False
                      ) -> Callable[[Params], dict[str, float]]:
  """Like `accuracy_fn`, but the callable returns `accuracy_by_group` (with "all")."""
  examples = list(examples)
  if not examples:
    raise ValueError("No examples to evaluate on.")
  prompts = [task.few_shot() + task.prompt(ex) for ex in examples]
  # As in STaR's own evaluation: thought tokens are never generated.
  suppress = tuple(getattr(tokenizer, a) for a in ("start_thought_id", "end_thought_id")
                   if getattr(tokenizer, a, None) is not None)

  def evaluate(params: Params) -> dict[str, float]:
    gens = generate_text(model_cfg, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         num_samples=1, greedy=True, stop=task.stop, seed=0, mesh=mesh,
                         batch_size=batch_size, progress=progress, suppress_ids=suppress)
    return accuracy_by_group(task, examples, [g[0].text for g in gens])

  return evaluate


def accuracy_fn(task: Task, examples: Sequence[Example], model_cfg: ModelConfig, tokenizer: Any,
                *, batch_size: int, mesh: Mesh | None = None, max_new_tokens: int = 160,
                progress: bool = False) -> Callable[[Params], float]:
  """params -> fraction of `examples` solved by greedy decoding.

  Prompts are `task.few_shot() + task.prompt(ex)`, decoding stops at `task.stop` (and never emits
  thought tokens, as in STaR's evaluation), and `task.is_correct` scores the completion.
  """
  groups = group_accuracy_fn(task, examples, model_cfg, tokenizer, batch_size=batch_size,
                             mesh=mesh, max_new_tokens=max_new_tokens, progress=progress)
  return lambda params: groups(params)["all"]


# ---------------------------------------------------------------------------------------------
# STaR runs.


class StarRun(NamedTuple):
  """What `soup_star_run` needs from a run; a loader may return the first five as a tuple."""

  task: Task
  model_cfg: ModelConfig
  base_params: Params
  tokenizer: Any
  ingredients: dict[str, Params]  # e.g. {"iter_1": params, ...}, all fine-tuned from the base.
  max_new_tokens: int = 160
  batch_size: int = 64
  mesh: Mesh | None = None


def star_iterations(workdir: str | os.PathLike) -> list[int]:
  """N >= 1 of every `iter_N/params` in a STaR workdir, ascending."""
  out = []
  for d in Path(workdir).glob("iter_*"):
    suffix = d.name[len("iter_"):]
    if suffix.isdigit() and int(suffix) >= 1 and (d / "params").is_dir():
      out.append(int(suffix))
  return sorted(out)


def load_star_run(workdir: str | os.PathLike, iterations: Sequence[int] | None = None) -> StarRun:
  """Task, base model and iteration params of a STaR workdir (from its `config.json`).

  A `base.pretrain` base model is restored from the finished run in `workdir/base`; the params
  of `iter_N` are restored onto the base model's shapes and shardings.
  """
  # Imported here: the experiment module pulls in training code the soup math does not need.
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top

  from starjax import configs  # pylint: disable=g-import-not-at-top
  from starjax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from starjax.star import experiment  # pylint: disable=g-import-not-at-top
  from starjax.train import params_io  # pylint: disable=g-import-not-at-top
  from starjax.utils_io import read_json  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} has no config.json; is it a STaR experiment workdir?")
  found = star_iterations(workdir)
  if iterations is None:
    iterations = found
  missing = sorted(set(iterations) - set(found))
  if missing:
    raise FileNotFoundError(f"No params for iteration(s) {missing} in {workdir} "
                            f"(found {found}).")
  if not iterations:
    raise FileNotFoundError(f"No iter_N/params (N >= 1) in {workdir}; nothing to soup.")
  config = config_dict.ConfigDict(read_json(workdir / "config.json"))
  task = experiment.make_task(config.task)
  star_cfg = experiment.parse_star_config(config.star)
  mesh = mesh_lib.make_mesh(configs.to_dataclass(mesh_lib.MeshConfig, config.mesh,
                                                 "config.mesh"))
  model_cfg, base_params, tok = experiment._base_model(  # pylint: disable=protected-access
      config, workdir, config.tokenizer)
  ingredients = {f"iter_{n}": params_io.load_params(workdir / f"iter_{n}" / "params", base_params)
                 for n in sorted(iterations)}
  return StarRun(task, model_cfg, base_params, tok, ingredients,
                 max_new_tokens=star_cfg.max_new_tokens, batch_size=star_cfg.eval_batch_size,
                 mesh=mesh)


def _subset(examples: list[Example], n: int | None) -> list[Example]:
  return examples if n is None or n >= len(examples) else examples[:n]


def split_examples(task: Task, split: str, held_out_split: str | None = None,
                   n_eval: int | None = None, seed: int = 0
                   ) -> tuple[list[Example], list[Example], str]:
  """(selection examples, report examples, description of the selection set).

  Without `held_out_split`, `split` is shuffled with `seed` and cut in two disjoint halves: the
  first floor(len/2) examples select the greedy soup, the rest are reported on. With
  `held_out_split` (which must differ from `split`), the whole of it selects and the whole of
  `split` is reported on. `n_eval` caps each set (the first n of its shuffled order); both sets
  are returned in split order. The training split may be neither.
  """
  if "train" in (split, held_out_split):
    raise ValueError("Soups are never selected or reported on the training split.")
  if held_out_split == split:
    raise ValueError(f"held_out_split must differ from split ({split!r}); leave it unset to "
                     f"select on one half of {split!r} and report on the other.")
  if n_eval is not None and n_eval < 1:
    raise ValueError(f"n_eval must be >= 1 (or None for all), got {n_eval}.")

  def shuffled(n: int, salt: int) -> list[int]:
    return np.random.default_rng([seed, salt]).permutation(n).tolist()

  report_all = task.load(split)
  if held_out_split is None:
    if len(report_all) < 2:
      raise ValueError(f"Split {split!r} has {len(report_all)} example(s); need >= 2 to select "
                       f"on one part and report on the other.")
    perm = shuffled(len(report_all), 0)
    half = len(perm) // 2
    sel_idx, rep_idx = perm[:half], perm[half:]
    select_all = report_all
    desc = f"a seeded half of {split!r} (seed {seed}), disjoint from the report"
  else:
    select_all = task.load(held_out_split)
    sel_idx, rep_idx = shuffled(len(select_all), 1), shuffled(len(report_all), 0)
    desc = f"split {held_out_split!r}"
  sel_idx, rep_idx = _subset(sel_idx, n_eval), _subset(rep_idx, n_eval)
  select = [select_all[i] for i in sorted(sel_idx)]
  report = [report_all[i] for i in sorted(rep_idx)]
  if not select:
    raise ValueError(f"The selection set ({desc}) is empty.")
  return select, report, desc


def soup_star_run(workdir: str | os.PathLike, *, split: str = "test",
                  held_out_split: str | None = None, iterations: Sequence[int] | None = None,
                  n_eval: int | None = None, seed: int = 0,
                  loader: Callable[[Path, Sequence[int] | None], Any] | None = None,
                  progress: bool = False) -> dict[str, Any]:
  """Uniform and greedy soups of a STaR run's iterations; writes `workdir/soups.json`.

  Ingredients are the params of every `iter_N` (N >= 1; or those in `iterations`), all
  fine-tuned from the same base model. The greedy soup is SELECTED on held-out examples disjoint
  from those it is REPORTED on: by default one seeded half of `split` selects and the other half
  reports (a task such as arithmetic has no validation split, and its other held-out split is
  out of distribution); `held_out_split` selects on a whole other split instead. The training
  split is never used. The base model, every ingredient and both soups are reported on the same
  examples; the selection-set scores are kept under "selection".

  Args:
    workdir: STaR experiment workdir.
    split: the split accuracies are reported on.
    held_out_split: a split to select the greedy soup on (default: half of `split`).
    iterations: iterations to use (default: all with params).
    n_eval: cap on the selection and on the report examples (default: all).
    seed: shuffles the splits.
    loader: `(workdir, iterations) -> StarRun` (or its first five fields as a tuple); default
      `load_star_run`.
    progress: progress bars while decoding.

  Returns:
    The contents of soups.json: "ingredients" ({name: accuracy}), "uniform" (accuracy), "greedy"
    ({"members", "acc", "history"}), "base" (accuracy of M_0), "by_group" (per-group accuracies
    of each), "selection" (the selection set and its scores), "split", "n_examples", "task".
  """
  workdir = Path(workdir)
  run = StarRun(*(loader or load_star_run)(workdir, iterations))
  if not run.ingredients:
    raise ValueError("The loader returned no ingredients.")
  names = list(run.ingredients)
  trees = [run.ingredients[n] for n in names]
  check_compatible([run.base_params] + trees, ["base"] + names)
  select, report, desc = split_examples(run.task, split, held_out_split, n_eval, seed)
  log.info("soups of %s: select on %s, report on %d examples of %r", names, desc, len(report),
           split)
  kw = dict(batch_size=run.batch_size, mesh=run.mesh, max_new_tokens=run.max_new_tokens,
            progress=progress)
  select_acc = accuracy_fn(run.task, select, run.model_cfg, run.tokenizer, **kw)
  report_acc = group_accuracy_fn(run.task, report, run.model_cfg, run.tokenizer, **kw)

  sel_scores = {n: select_acc(p) for n, p in zip(names, trees)}
  uniform = uniform_soup(trees, names)
  greedy = greedy_soup(list(zip(names, trees)), select_acc, scores=sel_scores)

  by_group = {"base": report_acc(run.base_params)}
  by_group.update({n: report_acc(p) for n, p in zip(names, trees)})
  by_group["uniform"] = report_acc(uniform)
  # A one-member greedy soup is that ingredient (exactly): no need to decode again.
  by_group["greedy"] = (by_group[greedy.members[0]] if len(greedy.members) == 1
                        else report_acc(greedy.params))
  result = {
      "task": run.task.name,
      "split": split,
      "n_examples": len(report),
      "base": by_group["base"]["all"],
      "ingredients": {n: by_group[n]["all"] for n in names},
      "uniform": by_group["uniform"]["all"],
      "greedy": {"members": greedy.members, "acc": by_group["greedy"]["all"],
                 "history": greedy.history},
      "by_group": by_group,
      "selection": {"set": desc, "split": held_out_split or split, "n_examples": len(select),
                    "seed": seed, "ingredients": sel_scores, "uniform": select_acc(uniform),
                    "greedy": greedy.score},
  }
  atomic_write_json(workdir / SOUPS_FILE, result)
  return result


def format_table(result: dict[str, Any]) -> str:
  """Markdown table: base, ingredients, uniform and greedy soup; selection and report accuracy."""
  sel = result["selection"]
  rows = [("base (M_0)", None, result["base"])]
  rows += [(n, sel["ingredients"][n], a) for n, a in result["ingredients"].items()]
  rows.append(("uniform soup", sel["uniform"], result["uniform"]))
  rows.append((f"greedy soup [{', '.join(result['greedy']['members'])}]", sel["greedy"],
               result["greedy"]["acc"]))
  width = max(len(r[0]) for r in rows)
  lines = [f"| {'model':<{width}} | selection acc | {result['split']} acc |",
           f"|{'-' * (width + 2)}|---|---|"]
  for name, s, a in rows:
    lines.append(f"| {name:<{width}} | {'-' if s is None else f'{s:.4f}'} | {a:.4f} |")
  lines.append(f"selection: {sel['set']} ({sel['n_examples']} examples); "
               f"report: {result['n_examples']} examples of {result['split']!r}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> None:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only-manager notices.
  f = _FLAGS
  iterations = [int(i) for i in f["iterations"].value] if f["iterations"].value else None
  try:
    result = soup_star_run(f["star_workdir"].value, split=f["split"].value,
                           held_out_split=f["held_out_split"].value or None,
                           iterations=iterations, n_eval=f["n_eval"].value or None,
                           seed=f["seed"].value, progress=f["progress"].value)
  except (ValueError, FileNotFoundError) as e:
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(str(e)) from e
  print(format_table(result))
  print(f"wrote {Path(f['star_workdir'].value) / SOUPS_FILE}")


_FLAGS: dict[str, Any] = {}

if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  # Flags are defined only when run as a program, so importing this module defines none.
  _FLAGS["star_workdir"] = flags.DEFINE_string("star_workdir", None, "STaR experiment workdir.")
  _FLAGS["split"] = flags.DEFINE_string("split", "test", "Split accuracies are reported on.")
  _FLAGS["held_out_split"] = flags.DEFINE_string(
      "held_out_split", "", "Split the greedy soup is selected on (default: a seeded half of "
      "--split, disjoint from the half reported on).")
  _FLAGS["n_eval"] = flags.DEFINE_integer("n_eval", 0, "Cap on selection and report examples "
                                          "(0 = all).")
  _FLAGS["iterations"] = flags.DEFINE_list("iterations", [], "Iterations to soup (default: all "
                                           "iter_N/params with N >= 1).")
  _FLAGS["seed"] = flags.DEFINE_integer("seed", 0, "Seed of the split shuffles.")
  _FLAGS["progress"] = flags.DEFINE_bool("progress", False, "Progress bars while decoding.")
  flags.mark_flags_as_required(["star_workdir"])
  app.run(main)
