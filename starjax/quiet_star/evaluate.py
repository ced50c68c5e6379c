r"""Quiet-STaR evaluation: soft answer probability, zero-shot CoT maj@k, difficult tokens.

Command line (restores the latest Quiet-STaR checkpoint of a training run; same config file):
  python -m starjax.quiet_star.evaluate --config=experiments/quiet_star_demo.py --workdir=DIR \
    [--config.eval.soft_tasks=gsm8k,commonsense_qa] [--config.eval.cot_tasks=gsm8k] [--step=N]
and writes DIR/eval/ (or --out): summary.json, difficult_tokens.{json,png}, soft_answer_TASK.json,
cot_TASK.json.

Everything is built on `position_scores`, the eval-mode forward of spec §1.7: one sampled thought
at every position (P = 1) and one talk step (T = 1), so at position t it gives log p(x_{t+1})
under the base logits and under the mixed logits of the step that reads <end-of-thought>.

* Soft answer probability (§1.7, `soft_answer`): the text `Q: {question}\nA: {answer}\n`
  (GSM8K: the final number; CommonsenseQA: the choices as `(A) text` lines and the letter). For
  each answer token, p(gold) renormalised over the allowed tokens (digits and newline, or the
  letters A-E and newline: every id whose text, leading spaces removed, consists of those
  characters), multiplied over the answer and averaged over questions; with and without thoughts.
  Answer tokens that are only spaces are not scored (the reference skips the first "▁"), and the
  gold token always counts as allowed. Also reported: the plain log-probability of the answer.
* Zero-shot CoT with majority vote (`zero_shot_cot`): `Q: {q}\nA: Let's think step by step.`, k
  sampled rationales, then the answer trigger and a greedy answer; the majority vote of the k
  extracted answers is scored (`starjax.eval.passk`). Generation goes through a `TextGenerator`;
  the default samples the base LM with `starjax.sampling`; `eval.cot_generator="thoughts"` thinks
  before every token (`quiet_star.inference`, cached).
* Difficult tokens (`difficult_tokens`): on held-out windows, the per-token loss change
  (with thoughts - base) grouped by the base loss into deciles (equal-count groups in the order
  of base loss, ties by position), as JSON and a PNG plot.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from starjax.eval import passk, plots
from starjax.models.config import ModelConfig
from starjax.quiet_star import forward as fwd
from starjax.quiet_star import objective, sampling
from starjax.quiet_star.config import QuietStarConfig
from starjax.train.losses import token_nll
from starjax.utils_io import atomic_write_json

Array = jax.Array
Params = dict[str, Any]

log = logging.getLogger(__name__)

SOFT_TASKS = ("gsm8k", "commonsense_qa")
UNITS = {"number": "0123456789\n", "letter": "ABCDE\n"}
LETTERS = "ABCDE"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """The `eval` section of a Quiet-STaR experiment config.

  Attributes:
    every: evaluate base vs thought loss on held-out windows every N training steps (0: never).
    at_end: run all configured evaluations when training finishes (written to workdir/eval).
    n_windows: held-out windows for the loss evaluations and the decile analysis.
    batch_size: rows per eval forward (rounded up to the mesh's batch shards).
    seed: thought-sampling seed of the evaluations.
    soft_tasks: tasks for the soft answer probability ("gsm8k", "commonsense_qa"); a tuple or a
      comma-separated string (normalised to a tuple).
    soft_n: questions per soft task (the first ones of the test/validation split).
    soft_max_len: questions longer than this many tokens are skipped (counted in the output).
    cot_tasks: tasks for zero-shot CoT with majority vote.
    cot_n: questions per CoT task.
    cot_k: samples per question (majority vote over them).
    cot_max_new_tokens: rationale length cap (reference: 384).
    cot_temperature: rationale sampling temperature (reference: 0.9).
    cot_generator: name in `GENERATORS` ("base": the base LM without thoughts).
    data_dir: folder holding gsm8k/ and commonsenseqa/ (default: $STARJAX_DATA_DIR).
  """

  every: int = 0
  at_end: bool = True
  n_windows: int = 32
  batch_size: int = 8
  seed: int = 0
  soft_tasks: str | tuple[str, ...] = ""
  soft_n: int = 64
  soft_max_len: int = 256
  cot_tasks: str | tuple[str, ...] = ""
  cot_n: int = 16
  cot_k: int = 8
  cot_max_new_tokens: int = 128
  cot_temperature: float = 0.9
  cot_generator: str = "base"
  data_dir: str | None = None

  def __post_init__(self):
    for name in ("n_windows", "batch_size", "soft_n", "soft_max_len", "cot_n", "cot_k",
                 "cot_max_new_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    for name in ("soft_tasks", "cot_tasks"):
      object.__setattr__(self, name, _as_names(getattr(self, name)))
      bad = sorted(set(getattr(self, name)) - set(SOFT_TASKS))
      if bad:
        raise ValueError(f"{name}: unknown task(s) {bad}; known: {list(SOFT_TASKS)}.")
    if self.cot_generator not in GENERATORS:
      raise ValueError(f"cot_generator={self.cot_generator!r}; known: {sorted(GENERATORS)}.")


def _as_names(value: Any) -> tuple[str, ...]:
  """("a", "b") from a tuple or a comma-separated string (as the command line gives it)."""
  if isinstance(value, str):
    value = value.split(",")
  return tuple(v.strip() for v in value if v.strip())


def eval_config(cfg: QuietStarConfig) -> QuietStarConfig:
  """The training config in eval mode: one thought per position, one talk step."""
  return cfg.replace(n_ahead_talk=1, n_passes=1, include_self_in_baseline=True)


# ---------------------------------------------------------------------------------------------
# Per-position scores.


def renormalized_logp(logits: Array, targets: Array, allowed: Array) -> Array:
  """log p(target) with the softmax restricted to `allowed` (V,) bool plus the target itself."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  lse = jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  lse = jnp.where(allowed[targets], lse, jnp.logaddexp(lse, picked))
  return picked - lse


def _scores_local(params: Params, key: Array, allowed: Array, tokens: Array, valid: Array,
                  ids: Array, forced: Array | None, *, cfg: QuietStarConfig,
                  model_cfg: ModelConfig, with_logits: bool) -> dict[str, Array]:
  valid = valid.astype(bool)
  base, th = sampling.rollouts(params, tokens, valid, sampling.example_keys(key, ids), cfg,
                               model_cfg, forced)
  h = th.hidden[0, -1]  # Pass 0, the step that reads <end-of-thought> (talk step 0).
  w = objective.mixing_weight(params["mixer"], base.hidden, h, cfg)
  mixed = objective.mix_logits(w, base.logits, fwd.logits_from_hidden(params["lm"], h, model_cfg))
  targets = fwd.shift_left(tokens, 1, cfg.fill_id)
  out = {
      "base_logp": -token_nll(base.logits, targets),
      "thought_logp": -token_nll(mixed, targets),
      "base_renorm_logp": renormalized_logp(base.logits, targets, allowed),
      "thought_renorm_logp": renormalized_logp(mixed, targets, allowed),
      "mixing_weight": w,
      "scored": valid & fwd.shift_left(valid, 1, False),
      "thoughts": jnp.moveaxis(th.tokens[0], 0, 1),  # (B, M, L)
  }
  if with_logits:
    out["base_logits"] = base.logits.astype(jnp.float32)
    out["thought_logits"] = mixed
  return out


@functools.lru_cache(maxsize=32)
def scores_fn(cfg: QuietStarConfig, model_cfg: ModelConfig, mesh: Mesh | None = None,
              forced: bool = False, with_logits: bool = False) -> Callable[..., dict[str, Array]]:
  """Jitted `position_scores` for fixed settings (cfg is put in eval mode)."""
  cfg = eval_config(cfg)
  local = functools.partial(_scores_local, cfg=cfg, model_cfg=model_cfg, with_logits=with_logits)
  if forced:
    fn = sampling.over_examples(local, mesh, 3)
  else:
    fn = sampling.over_examples(lambda p, k, a, t, v, i: local(p, k, a, t, v, i, None), mesh, 3)
  return jax.jit(fn)


def position_scores(params: Params, batch: dict[str, Any], key: Array, cfg: QuietStarConfig,
                    model_cfg: ModelConfig, *, allowed: Array | None = None,
                    mesh: Mesh | None = None, forced_thoughts: Array | None = None,
                    with_logits: bool = False) -> dict[str, Array]:
  """Eval-mode scores of every position t (predicting x_{t+1}), with and without thoughts.

  Args:
    params: Quiet-STaR parameters {"lm", "thought", "mixer"}.
    batch: {"tokens": int (B, L), "mask": (B, L) real tokens, optional "example_ids": (B,)}.
    key: thought-sampling key (token keys as in training, pass 0).
    cfg: the training config (used in eval mode: T = 1, P = 1).
    model_cfg: decoder shape.
    allowed: optional bool (V,) for the renormalised log-probs (default: none allowed, so those
      are 0).
    mesh: optional mesh; B must divide over its batch axes.
    forced_thoughts: optional int (B, 1, M, L) thought tokens instead of sampled ones.
    with_logits: also return "base_logits" and "thought_logits" (B, L, V) float32.

  Returns:
    base_logp, thought_logp, base_renorm_logp, thought_renorm_logp, mixing_weight (B, L);
    scored (B, L): x_t and x_{t+1} are real; thoughts (B, M, L).
  """
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  if allowed is None:
    allowed = jnp.zeros((model_cfg.vocab_size,), bool)
  args = [params, key, jnp.asarray(allowed, bool), tokens, jnp.asarray(batch["mask"], bool),
          sampling.batch_example_ids(batch)]
  if forced_thoughts is not None:
    args.append(jnp.asarray(forced_thoughts, jnp.int32))
  fn = scores_fn(cfg, model_cfg, mesh, forced_thoughts is not None, with_logits)
  return fn(*args)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _batch_shards(mesh: Mesh | None) -> int:
  axes = None if mesh is None else sampling.batch_axes(mesh)
  return 1 if not axes else math.prod(mesh.shape[a] for a in axes)


def scores_over_rows(params: Params, tokens: np.ndarray, mask: np.ndarray, ids: np.ndarray,
                     key: Array, cfg: QuietStarConfig, model_cfg: ModelConfig, *,
                     batch_size: int, allowed: np.ndarray | None = None,
                     mesh: Mesh | None = None, progress: bool = False,
                     desc: str = "eval") -> dict[str, np.ndarray]:
  """`position_scores` over many rows in fixed-size batches; host arrays (N, L) out.

  The last batch is filled up with copies of its first row (results dropped), so every call has
  the same shape and compiles once per row length.
  """
  n = len(tokens)
  batch_size = _round_up(min(batch_size, _round_up(n, _batch_shards(mesh))), _batch_shards(mesh))
  parts: list[dict[str, np.ndarray]] = []
  for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress,
                    dynamic_ncols=True, leave=False):
    idx = np.arange(start, min(start + batch_size, n))
    fill = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
    batch = {"tokens": tokens[fill], "mask": mask[fill], "example_ids": ids[fill]}
    out = jax.device_get(position_scores(params, batch, key, cfg, model_cfg, allowed=allowed,
                                         mesh=mesh))
    parts.append({k: np.asarray(v)[:len(idx)] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# Difficult tokens: loss change by base-loss decile.


def window_losses(params: Params, windows: np.ndarray, key: Array, cfg: QuietStarConfig,
                  model_cfg: ModelConfig, *, batch_size: int, mesh: Mesh | None = None,
                  progress: bool = False) -> dict[str, np.ndarray]:
  """Per scored token of the windows (N, L): base_nll, thought_nll, mixing_weight (1-D)."""
  windows = np.asarray(windows, np.int32)
  s = scores_over_rows(params, windows, np.ones(windows.shape, bool),
                       np.arange(len(windows), dtype=np.int32), key, cfg, model_cfg,
                       batch_size=batch_size, mesh=mesh, progress=progress, desc="eval windows")
  keep = s["scored"].astype(bool)
  return {"base_nll": -s["base_logp"][keep].astype(np.float64),
          "thought_nll": -s["thought_logp"][keep].astype(np.float64),
          "mixing_weight": s["mixing_weight"][keep].astype(np.float64)}


def decile_table(base_nll: np.ndarray, thought_nll: np.ndarray, n_groups: int = 10
                 ) -> dict[str, Any]:
  """Loss change (thought - base) per group of tokens ordered by base loss.

  Tokens are sorted by base loss (stable, so ties keep their order) and split into `n_groups`
  contiguous groups whose sizes differ by at most one (`np.array_split`); group 0 is the easiest.
  """
  base = np.asarray(base_nll, np.float64).reshape(-1)
  thought = np.asarray(thought_nll, np.float64).reshape(-1)
  if base.shape != thought.shape:
    raise ValueError(f"base_nll {base.shape} and thought_nll {thought.shape} differ.")
  if len(base) < n_groups:
    raise ValueError(f"{len(base)} tokens cannot form {n_groups} groups.")
  delta = thought - base
  groups = []
  for i, idx in enumerate(np.array_split(np.argsort(base, kind="stable"), n_groups)):
    groups.append({
        "group": i, "count": int(len(idx)),
        "base_loss_min": float(base[idx].min()), "base_loss_max": float(base[idx].max()),
        "base_loss_mean": float(base[idx].mean()), "thought_loss_mean": float(thought[idx].mean()),
        "delta_mean": float(delta[idx].mean()), "improved_frac": float(np.mean(delta[idx] < 0)),
    })
  return {"n_tokens": int(len(base)), "base_loss": float(base.mean()),
          "thought_loss": float(thought.mean()), "delta_mean": float(delta.mean()),
          "groups": groups}


def plot_deciles(table: dict[str, Any], path: str | os.PathLike, title: str | None = None
                 ) -> Path:
  """Bar plot of the mean loss change per base-loss group (negative = thoughts help)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  groups = table["groups"]
  x = np.arange(len(groups))
  delta = [g["delta_mean"] for g in groups]
  fig = Figure(figsize=(7.0, 4.2))
  ax = fig.add_subplot(1, 1, 1)
  ax.bar(x, delta, color=["tab:green" if d < 0 else "tab:red" for d in delta])
  ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set_xticks(x, [f"{i + 1}\n{g['base_loss_mean']:.2f}" for i, g in enumerate(groups)],
                fontsize=7)
  ax.set_xlabel("base-loss decile (1 = easiest); mean base loss (nats)")
  ax.set_ylabel("mean loss change with thoughts (nats)")
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(title or f"Quiet-STaR: loss change by token difficulty "
               f"({table['n_tokens']} tokens, mean {table['delta_mean']:+.4f})", fontsize=9)
  fig.tight_layout()
  return plots.save_figure(fig, path)


def difficult_tokens(params: Params, windows: np.ndarray, key: Array, cfg: QuietStarConfig,
                     model_cfg: ModelConfig, out_dir: str | os.PathLike, *, batch_size: int,
                     mesh: Mesh | None = None, progress: bool = False) -> dict[str, Any]:
  """Writes difficult_tokens.json and difficult_tokens.png to `out_dir`; returns the table."""
  losses = window_losses(params, windows, key, cfg, model_cfg, batch_size=batch_size, mesh=mesh,
                         progress=progress)
  table = decile_table(losses["base_nll"], losses["thought_nll"])
  table["mixing_weight_mean"] = float(losses["mixing_weight"].mean())
  out_dir = Path(out_dir)
  atomic_write_json(out_dir / "difficult_tokens.json", table)
  plot_deciles(table, out_dir / "difficult_tokens.png")
  return table


# ---------------------------------------------------------------------------------------------
# Soft answer probability (spec §1.7).


def load_task(name: str, data_dir: str | None = None) -> Any:
  """The task `name` reading jsonl files from `data_dir/<folder>` (or $STARJAX_DATA_DIR)."""
  from starjax.data import registry  # pylint: disable=g-import-not-at-top

  folder = {"gsm8k": "gsm8k", "commonsense_qa": "commonsenseqa"}[name]
  kwargs: dict[str, Any] = {"use_tfds": False}
  if data_dir:
    kwargs["data_dir"] = str(Path(data_dir) / folder)
  return registry.get_task(name, **kwargs)


def check_task_data(ec: EvalConfig) -> None:
  """Loads the held-out split of every configured task, so missing data fails before training.

  Raises:
    FileNotFoundError: a task's files are missing (the message says where to put them).
  """
  for name in dict.fromkeys(ec.soft_tasks + ec.cot_tasks):
    load_task(name, ec.data_dir).load("test")


def eval_examples(task: Any, n: int) -> list[Any]:
  """The first `n` held-out examples (GSM8K test, CommonsenseQA validation)."""
  return task.load("test")[:n]


def soft_answer_text(task_name: str, ex: Any) -> tuple[str, str, str]:
  """(prefix, answer, kind): `Q: ...\nA:` and ` {answer}\n` in the reference's format."""
  if task_name == "gsm8k":
    return f"Q: {ex.question}\nA:", f" {ex.answer}\n", "number"
  if task_name == "commonsense_qa":
    lines = [f"Q: {ex.question}"]
    lines += [f"({label.upper()}) {text}" for label, text in zip(ex.meta["labels"],
                                                                 ex.meta["choices"])]
    return "\n".join(lines) + "\nA:", f" {ex.answer.strip().upper()}\n", "letter"
  raise ValueError(f"No soft answer format for task {task_name!r}; known: {list(SOFT_TASKS)}.")


_ALLOWED_CACHE: dict[tuple[int, str, int], np.ndarray] = {}


def allowed_ids(tok: Any, units: str, vocab_size: int) -> np.ndarray:
  """bool (vocab_size,): ids whose text, leading spaces removed, is made of `units` characters."""
  key = (id(tok), units, vocab_size)
  if key not in _ALLOWED_CACHE:
    chars = set(units)
    mask = np.zeros((vocab_size,), bool)
    for i in range(min(tok.vocab_size, vocab_size)):
      text = tok.decode([i], skip_special=False).lstrip(" ")
      mask[i] = bool(text) and set(text) <= chars
    _ALLOWED_CACHE[key] = mask
  return _ALLOWED_CACHE[key]


def is_scored_answer_token(tok: Any, token: int) -> bool:
  """False for tokens that are only spaces (not scored, like the reference's leading "▁")."""
  text = tok.decode([token], skip_special=False)
  return not (text.strip(" ") == "" and "\n" not in text)


@dataclasses.dataclass(frozen=True)
class SoftItem:
  """One question for the soft metric: `tokens` = prefix + answer, answer from `answer_start`."""

  id: str
  tokens: list[int]
  answer_start: int
  scored: list[bool]


def soft_items(task_name: str, examples: Sequence[Any], tok: Any) -> tuple[list[SoftItem], str]:
  """Tokenised items (prefix with BOS, answer encoded on its own) and the answer kind."""
  items, kind = [], "number"
  for ex in examples:
    prefix, answer, kind = soft_answer_text(task_name, ex)
    p, a = tok.encode(prefix, add_bos=True), tok.encode(answer)
    items.append(SoftItem(id=ex.id, tokens=p + a, answer_start=len(p),
                          scored=[is_scored_answer_token(tok, t) for t in a]))
  return items, kind


def _bucket(n: int, minimum: int = 32) -> int:
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def soft_answer(params: Params, items: Sequence[SoftItem], allowed: np.ndarray, key: Array,
                cfg: QuietStarConfig, model_cfg: ModelConfig, *, batch_size: int, max_len: int,
                pad_id: int = 0, mesh: Mesh | None = None, progress: bool = False
                ) -> dict[str, Any]:
  """The soft answer probability and answer log-probability, with and without thoughts.

  Per question: soft = prod over scored answer tokens of p(gold | allowed) (renormalised), and
  logprob = sum over all answer tokens of log p(gold) (full vocabulary). Means over questions.
  Questions are right-padded to a power-of-two length bucket; longer than `max_len`: skipped.
  """
  kept = [it for it in items if len(it.tokens) <= max_len]
  if not kept:
    raise ValueError(f"No question fits soft_max_len={max_len} tokens.")
  per_q: list[dict[str, Any]] = []
  by_len: dict[int, list[int]] = {}
  for i, it in enumerate(kept):
    by_len.setdefault(_bucket(len(it.tokens)), []).append(i)
  for length, members in sorted(by_len.items()):
    tokens = np.full((len(members), length), pad_id, np.int32)
    mask = np.zeros((len(members), length), bool)
    for r, i in enumerate(members):
      tokens[r, :len(kept[i].tokens)] = kept[i].tokens
      mask[r, :len(kept[i].tokens)] = True
    s = scores_over_rows(params, tokens, mask, np.asarray(members, np.int32), key, cfg, model_cfg,
                         batch_size=batch_size, allowed=allowed, mesh=mesh, progress=progress,
                         desc=f"soft answer L={length}")
    for r, i in enumerate(members):
      it = kept[i]
      # Answer token j sits at answer_start + j and is predicted at the position before it.
      pos = np.arange(it.answer_start, len(it.tokens)) - 1
      sc = np.asarray(it.scored, bool)
      row = {"id": it.id, "index": i}
      for name in ("base", "thought"):
        row[f"soft_{name}"] = float(np.exp(np.sum(
            s[f"{name}_renorm_logp"][r, pos][sc].astype(np.float64))))
        row[f"logprob_{name}"] = float(np.sum(s[f"{name}_logp"][r, pos].astype(np.float64)))
      per_q.append(row)
  per_q.sort(key=lambda x: x["index"])
  mean = lambda k: float(np.mean([q[k] for q in per_q]))
  return {"n": len(per_q), "skipped_too_long": len(items) - len(kept),
          "soft_accuracy_base": mean("soft_base"), "soft_accuracy_thought": mean("soft_thought"),
          "answer_logprob_base": mean("logprob_base"),
          "answer_logprob_thought": mean("logprob_thought"), "questions": per_q}


# ---------------------------------------------------------------------------------------------
# Zero-shot chain of thought with majority vote.


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationRequest:
  """What a `TextGenerator` is asked to do for a list of prompts."""

  max_new_tokens: int
  num_samples: int = 1
  temperature: float = 1.0
  greedy: bool = False
  stop: tuple[str, ...] = ()
  seed: int = 0


# generate(prompts, request) -> result[i][k]: sample k for prompt i, cut before any stop string.
TextGenerator = Callable[[Sequence[str], GenerationRequest], list[list[str]]]


def base_lm_generator(params: Params, model_cfg: ModelConfig, tok: Any, cfg: QuietStarConfig,
                      mesh: Mesh | None = None, batch_size: int = 16,
                      progress: bool = False) -> TextGenerator:
  """Samples the base LM (`params["lm"]`) with `starjax.sampling`; thought markers suppressed."""
  del cfg

  def generate(prompts: Sequence[str], req: GenerationRequest) -> list[list[str]]:
    from starjax.sampling import sampler  # pylint: disable=g-import-not-at-top

    out = sampler.generate_text(
        model_cfg, params["lm"], tok, list(prompts), max_new_tokens=req.max_new_tokens,
        num_samples=req.num_samples, greedy=req.greedy, temperature=req.temperature,
        stop=req.stop, seed=req.seed, mesh=mesh, batch_size=batch_size, progress=progress,
        suppress_ids=(tok.start_thought_id, tok.end_thought_id))
    return [[c.text for c in row] for row in out]

  return generate


def thought_generator(*args: Any, **kwargs: Any) -> TextGenerator:
  """Thought-augmented generation with a KV cache (`quiet_star.inference.thought_lm_generator`)."""
  from starjax.quiet_star import inference  # pylint: disable=g-import-not-at-top

  return inference.thought_lm_generator(*args, **kwargs)


# name -> factory(params, model_cfg, tok, cfg, mesh=..., batch_size=..., progress=...).
GENERATORS: dict[str, Callable[..., TextGenerator]] = {"base": base_lm_generator,
                                                       "thoughts": thought_generator}

COT_TRIGGER = " Let's think step by step."
ANSWER_TRIGGERS = {"gsm8k": "\nTherefore, the answer (arabic numerals) is",
                   "commonsense_qa": "\nTherefore, among A through E, the answer is"}
COT_STOP = ("\nQ:", "\n\n\n")
_NUMBER_RE = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")
_LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")


def cot_prompt(task_name: str, ex: Any) -> str:
  """`Q: {q}\nA: Let's think step by step.` (CommonsenseQA: choices inline, as Kojima et al.)."""
  if task_name == "commonsense_qa":
    choices = " ".join(f"({label.upper()}) {text}"
                       for label, text in zip(ex.meta["labels"], ex.meta["choices"]))
    return f"Q: {ex.question} Answer Choices: {choices}\nA:{COT_TRIGGER}"
  return f"Q: {ex.question}\nA:{COT_TRIGGER}"


def extract_cot_answer(task_name: str, text: str) -> str | None:
  """The first number (GSM8K, commas removed, canonical) or letter A-E (lower case)."""
  if task_name == "gsm8k":
    from starjax.data.gsm8k import canonical_number  # pylint: disable=g-import-not-at-top

    m = _NUMBER_RE.search(text)
    return None if m is None else canonical_number(m.group(0))
  m = _LETTER_RE.search(text)
  return None if m is None else m.group(1).lower()


def gold_answer(task_name: str, ex: Any) -> str:
  if task_name == "gsm8k":
    return ex.answer
  return ex.answer.strip().lower()


def zero_shot_cot(task_name: str, examples: Sequence[Any], generate: TextGenerator, *, k: int,
                  max_new_tokens: int, temperature: float, seed: int = 0) -> dict[str, Any]:
  """Zero-shot CoT maj@k: k sampled rationales per question, a greedy answer after the trigger,
  majority vote over the k extracted answers."""
  prompts = [cot_prompt(task_name, ex) for ex in examples]
  rationales = generate(prompts, GenerationRequest(
      max_new_tokens=max_new_tokens, num_samples=k, temperature=temperature, stop=COT_STOP,
      seed=seed))
  follow = [p + r + ANSWER_TRIGGERS[task_name] for p, rs in zip(prompts, rationales) for r in rs]
  finals = generate(follow, GenerationRequest(max_new_tokens=12, greedy=True, stop=("\n",),
                                              seed=seed))
  answers = [[extract_cot_answer(task_name, finals[i * k + j][0]) for j in range(k)]
             for i in range(len(examples))]
  gold = [gold_answer(task_name, ex) for ex in examples]
  rows = [{"id": ex.id, "gold": g, "answers": a, "majority": passk.majority_vote(a),
           "rationale_0": rs[0]}
          for ex, g, a, rs in zip(examples, gold, answers, rationales)]
  return {
      "task": task_name, "n": len(examples), "k": k,
      "maj_accuracy": passk.majority_accuracy(answers, gold),
      "sample_accuracy": float(np.mean([[x == g for x in a] for a, g in zip(answers, gold)])),
      "no_answer_frac": float(np.mean([[x is None for x in a] for a in answers])),
      "questions": rows,
  }


# ---------------------------------------------------------------------------------------------
# All configured evaluations of a trained model.


def run_evaluations(ec: EvalConfig, params: Params, cfg: QuietStarConfig, model_cfg: ModelConfig,
                    tok: Any, out_dir: str | os.PathLike, *, windows: np.ndarray | None = None,
                    mesh: Mesh | None = None, step: int | None = None,
                    progress: bool = False) -> dict[str, Any]:
  """Difficult tokens (if `windows`), soft answer and CoT per configured task; writes
  `out_dir`/summary.json and the per-evaluation files; returns the flat summary."""
  out_dir = Path(out_dir)
  key = jax.random.key(ec.seed)
  summary: dict[str, Any] = {"step": step}
  if windows is not None and len(windows):
    table = difficult_tokens(params, windows[:ec.n_windows], key, cfg, model_cfg, out_dir,
                             batch_size=ec.batch_size, mesh=mesh, progress=progress)
    summary.update({"eval_base_loss": table["base_loss"],
                    "eval_thought_loss": table["thought_loss"],
                    "eval_mixing_weight": table["mixing_weight_mean"],
                    "hardest_decile_delta": table["groups"][-1]["delta_mean"],
                    "easiest_decile_delta": table["groups"][0]["delta_mean"]})
  for name in ec.soft_tasks:
    task = load_task(name, ec.data_dir)
    items, kind = soft_items(name, eval_examples(task, ec.soft_n), tok)
    res = soft_answer(params, items, allowed_ids(tok, UNITS[kind], model_cfg.vocab_size), key,
                      cfg, model_cfg, batch_size=ec.batch_size, max_len=ec.soft_max_len,
                      pad_id=tok.pad_id, mesh=mesh, progress=progress)
    atomic_write_json(out_dir / f"soft_answer_{name}.json", res)
    summary.update({f"{name}_{k}": v for k, v in res.items() if k != "questions"})
  if ec.cot_tasks:
    generate = GENERATORS[ec.cot_generator](params, model_cfg, tok, cfg, mesh=mesh,
                                            batch_size=ec.batch_size, progress=progress)
    for name in ec.cot_tasks:
      task = load_task(name, ec.data_dir)
      res = zero_shot_cot(name, eval_examples(task, ec.cot_n), generate, k=ec.cot_k,
                          max_new_tokens=ec.cot_max_new_tokens, temperature=ec.cot_temperature,
                          seed=ec.seed)
      atomic_write_json(out_dir / f"cot_{name}.json", res)
      summary.update({f"{name}_cot_maj{ec.cot_k}": res["maj_accuracy"],
                      f"{name}_cot_sample_accuracy": res["sample_accuracy"]})
  atomic_write_json(out_dir / "summary.json", summary)
  return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> None:
  """`python -m starjax.quiet_star.evaluate --config=... --workdir=... [--step=N] [--out=DIR]`."""
  del argv
  import json  # pylint: disable=g-import-not-at-top

  from absl import app, flags  # pylint: disable=g-import-not-at-top

  from starjax import configs, parallel  # pylint: disable=g-import-not-at-top
  from starjax.quiet_star import train  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  parallel.initialize()
  f = flags.FLAGS
  try:
    summary = train.evaluate_checkpoint(f.config, f.workdir, step=f.step, out_dir=f.out)
  except (configs.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  print(json.dumps(summary, indent=1, sort_keys=True))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "The run's experiment config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's directory (checkpoints).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/eval, or eval_step_N).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top

  _define_flags()
  _app.run(main)
