"""Model soups: uniform mean, greedy selection (strict improvement), STaR-run soups end to end."""

import json

import jax
import numpy as np
import pytest

from starjax import models, tokenizers
from starjax.data.tasks import Example, Task
from starjax.eval import soups


def _tree(rng, dtype=np.float32):
  return {"embed": rng.normal(size=(5, 3)).astype(dtype),
          "layers": [{"w": rng.normal(size=(3, 4)).astype(dtype), "b": rng.normal(size=4)
                      .astype(dtype)} for _ in range(2)]}


def test_uniform_soup_matches_float64_mean():
  rng = np.random.default_rng(0)
  # Large offsets with small differences are where naive f32 averaging would lose digits.
  trees = [jax.tree.map(lambda x: x + np.float32(1e3), _tree(rng)) for _ in range(5)]
  soup = soups.uniform_soup(trees)
  want = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0), *trees)
  assert jax.tree.structure(soup) == jax.tree.structure(trees[0])
  for got, ref in zip(jax.tree.leaves(soup), jax.tree.leaves(want)):
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-7, atol=0)
  # One ingredient: the soup is that ingredient, bit for bit.
  for got, ref in zip(jax.tree.leaves(soups.uniform_soup(trees[:1])), jax.tree.leaves(trees[0])):
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_uniform_soup_keeps_bfloat16():
  rng = np.random.default_rng(1)
  trees = [jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.bfloat16), _tree(rng))
           for _ in range(3)]
  soup = soups.uniform_soup(trees)
  want = jax.tree.map(lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], axis=0),
                      *trees)
  for got, ref in zip(jax.tree.leaves(soup), jax.tree.leaves(want)):
    assert got.dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-2, atol=1e-2)


def test_mismatched_trees_raise_with_leaf_path():
  rng = np.random.default_rng(2)
  a, b = _tree(rng), _tree(rng)
  b["layers"][1]["w"] = np.zeros((3, 5), np.float32)
  with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['w'\].*\(3, 4\).*\(3, 5\)"):
    soups.uniform_soup([a, b], names=["m1", "m2"])
  c = _tree(rng)
  c["layers"][0]["b"] = c["layers"][0]["b"].astype(np.float16)
  with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['b'\].*float16"):
    soups.uniform_soup([a, c])
  d = _tree(rng)
  del d["embed"]
  with pytest.raises(ValueError, match=r"different tree structure.*\['embed'\]"):
    soups.uniform_soup([a, d])
  with pytest.raises(ValueError, match="No ingredients"):
    soups.uniform_soup([])


def _quadratic(params):
  return -float(np.sum(np.asarray(params["w"], np.float64) ** 2))


def _ing(name, *w):
  return name, {"w": np.asarray(w, np.float32)}


def test_greedy_soup_adds_only_strict_improvements_in_sorted_order():
  # Scores: far -9, a -4, b -5, same -4 (ties with a; after it in input order), c -2.
  ingredients = [_ing("far", 0, 3), _ing("a", 2, 0), _ing("b", -2, 1), _ing("same", 2, 0),
                 _ing("c", -1, -1)]
  calls = []
  res = soups.greedy_soup(ingredients, lambda p: calls.append(1) or _quadratic(p))
  # c (-2) -> +a: [.5,-.5] -0.5 kept -> +same: [1,-1/3] rejected -> +b: [-1/3,0] kept -> +far
  # [-1/4,3/4] -0.625 rejected.
  assert [h["name"] for h in res.history] == ["c", "a", "same", "b", "far"]
  assert [h["accepted"] for h in res.history] == [True, True, False, True, False]
  assert res.members == ["c", "a", "b"]
  np.testing.assert_allclose(res.params["w"], [-1 / 3, 0], rtol=1e-6, atol=1e-7)
  assert res.score == pytest.approx(-1 / 9)
  assert res.history[3]["candidate_score"] == pytest.approx(-1 / 9)
  assert res.ingredient_scores == {"far": -9, "a": -4, "b": -5, "same": -4, "c": -2}
  assert len(calls) == 5 + 4  # Each ingredient once, each candidate once.
  # Precomputed scores are used instead of evaluating the ingredients.
  calls.clear()
  res2 = soups.greedy_soup(ingredients, lambda p: calls.append(1) or _quadratic(p),
                           scores=res.ingredient_scores)
  assert res2.members == res.members and len(calls) == 4


def test_greedy_soup_never_adds_on_ties():
  # Accuracy-like (quantized) score: both candidates tie with the soup, so nothing is added,
  # even though the quadratic would improve.
  acc = lambda p: float(np.sum(np.asarray(p["w"]) ** 2) < 1.0)
  res = soups.greedy_soup([_ing("p", 0.5, 0), _ing("q", 0.2, 0), _ing("r", 0.5, 0)], acc)
  assert res.members == ["p"]
  assert [h["accepted"] for h in res.history] == [True, False, False]
  np.testing.assert_array_equal(res.params["w"], [0.5, 0])
  # Equal ingredient scores keep the input order, so the first given starts the soup.
  res = soups.greedy_soup([_ing("q", 0.2, 0), _ing("p", 0.5, 0)], acc)
  assert res.members == ["q"]


def test_greedy_soup_rejects_other_architectures():
  cfg = models.preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
  wide = models.preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=96)
  # Shapes and dtypes are all the check needs: abstract params are enough (and fast).
  a = jax.eval_shape(models.init_params, cfg, jax.random.key(0))
  b = jax.eval_shape(models.init_params, wide, jax.random.key(1))
  evaluate = lambda p: pytest.fail("evaluated before the architecture check")
  with pytest.raises(ValueError, match=r"'small' and 'wide' differ at leaf .*64.*96"):
    soups.greedy_soup([("small", a), ("wide", b)], evaluate)
  with pytest.raises(ValueError, match="unique"):
    soups.greedy_soup([("x", a), ("x", a)], evaluate)


# ---------------------------------------------------------------------------------------------
# End to end on a fake STaR run.


class ToyTask(Task):
  """Correctness is a hash of the completion, so random models get a mix of right and wrong."""

  name = "toy"
  stop = ("\n\n",)

  def load(self, split):
    n = {"train": 4, "test": 10, "other": 6}[split]
    rng = np.random.default_rng({"train": 0, "test": 1, "other": 2}[split])
    return [Example(id=f"{split}{i}", question=str(i), answer=str(int(rng.integers(0, 2))),
                    meta={"g": str(i % 2)}) for i in range(n)]

  def prompt(self, ex):
    return f"Q{ex.question}:"

  def prompt_with_hint(self, ex):
    return f"Q{ex.question} ({ex.answer}):"

  def extract_answer(self, completion):
    return str(sum(map(ord, completion)) % 2)

  def group(self, ex):
    return ex.meta["g"]


TOK = tokenizers.ByteTokenizer()
CFG = models.preset("tiny", vocab_size=TOK.vocab_size, dim=32, n_heads=2, n_kv_heads=1,
                    ffn_dim=64)


@pytest.fixture(scope="module")
def fake_run():
  base = jax.jit(lambda key: models.init_params(CFG, key))(jax.random.key(0))
  # "Fine-tunes": the base plus different perturbations, like iterations fine-tuned from M_0.
  leaves, treedef = jax.tree.flatten(base)
  ingredients = {}
  for n in (1, 2, 3):
    rng = np.random.default_rng([0, n])
    ingredients[f"iter_{n}"] = treedef.unflatten(
        [x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32) for x in leaves])
  return soups.StarRun(ToyTask(), CFG, base, TOK, ingredients, max_new_tokens=6, batch_size=8)


def test_soup_star_run_end_to_end(tmp_path, fake_run):
  seen = []

  def loader(workdir, iterations):
    seen.append((workdir, iterations))
    return tuple(fake_run)  # A plain tuple works as well as a StarRun.

  result = soups.soup_star_run(tmp_path, loader=loader)
  assert seen == [(tmp_path, None)]
  assert json.loads((tmp_path / "soups.json").read_text()) == json.loads(json.dumps(result))

  select, report, _ = soups.split_examples(fake_run.task, "test")
  assert len(select) == 5 and len(report) == 5 and result["n_examples"] == 5
  assert not {e.id for e in select} & {e.id for e in report}
  names = ["iter_1", "iter_2", "iter_3"]
  trees = [fake_run.ingredients[n] for n in names]
  rep = soups.accuracy_fn(fake_run.task, report, CFG, TOK, batch_size=8, max_new_tokens=6)
  sel = soups.accuracy_fn(fake_run.task, select, CFG, TOK, batch_size=8, max_new_tokens=6)
  # Reported numbers are direct re-evaluations on the report half ...
  assert result["ingredients"] == {n: rep(p) for n, p in zip(names, trees)}
  assert result["base"] == rep(fake_run.base_params)
  assert result["uniform"] == rep(soups.uniform_soup(trees))
  members = result["greedy"]["members"]
  assert result["greedy"]["acc"] == rep(soups.uniform_soup(
      [fake_run.ingredients[m] for m in members]))
  # ... and the greedy soup is the one selected on the other half.
  want = soups.greedy_soup(list(zip(names, trees)), sel)
  assert members == want.members
  assert len(members) == 2  # These seeds give a soup that takes one ingredient and rejects one.
  assert result["selection"]["ingredients"] == want.ingredient_scores
  assert result["selection"]["greedy"] == want.score
  assert set(result["by_group"]) == {"base", *names, "uniform", "greedy"}
  table = soups.format_table(result)
  assert "uniform soup" in table and "greedy soup" in table and "iter_3" in table


def test_soup_star_run_held_out_split_and_errors(tmp_path, fake_run):
  loader = lambda workdir, iterations: fake_run
  result = soups.soup_star_run(tmp_path, held_out_split="other", n_eval=4, loader=loader)
  assert result["n_examples"] == 4 and result["selection"]["n_examples"] == 4
  assert result["selection"]["split"] == "other"
  for bad in ({"held_out_split": "test"}, {"split": "train"}, {"held_out_split": "train"}):
    with pytest.raises(ValueError):
      soups.soup_star_run(tmp_path, loader=loader, **bad)


def test_load_star_run_needs_iterations(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "iter_0").mkdir()
  with pytest.raises(FileNotFoundError, match="No iter_N/params"):
    soups.load_star_run(tmp_path)
  (tmp_path / "iter_2" / "params").mkdir(parents=True)
  assert soups.star_iterations(tmp_path) == [2]
  with pytest.raises(FileNotFoundError, match=r"iteration\(s\) \[1\]"):
    soups.load_star_run(tmp_path, iterations=[1, 2])
