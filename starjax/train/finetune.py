"""Fine-tune given params on a list of examples for a fixed number of steps.

The building block of STaR's inner step ("fine-tune from the base model on this iteration's
rationales"). Batches are a pure function of (seed, step), as in the main loop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from starjax.models import positions as positions_lib
from starjax.models.config import ModelConfig
from starjax.train import batching, optim
from starjax.train import state as state_lib
from starjax.train import step as step_lib

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, opt: optim.OptimizerConfig, total_steps: int, mesh: Mesh,
              batch_size: int):
  tx = optim.make_optimizer(opt, total_steps)
  shardings = state_lib.state_shardings(cfg, tx, mesh)
  return tx, step_lib.jit_train_step(cfg, tx, mesh, shardings, batch_size)


def finetune(cfg: ModelConfig, params: Any, examples: Sequence[batching.Example], *, steps: int,
             batch_size: int, seq_len: int, opt: optim.OptimizerConfig, mesh: Mesh,
             pad_id: int, seed: int = 0, pack: bool = True, position_jitter: float = 0.0,
             progress: bool = False, desc: str = "finetune") -> tuple[Any, list[dict[str, float]]]:
  """Returns (new params, per-step metrics).

  `params` is left intact: the train state is built by a jitted init whose outputs are fresh
  buffers, and only that state is donated to the train step.
  """
  from starjax.train.loop import RowSource  # pylint: disable=g-import-not-at-top

  if not examples:
    raise ValueError("No examples to fine-tune on.")
  if cfg.position_coupling and position_jitter:
    raise ValueError("position_jitter would scramble the model's coupled positions "
                     f"(position_coupling={cfg.position_coupling!r}); set it to 0.")
  # A truncated example would lose its EOS (or all its completion tokens): drop it instead.
  kept = [ex for ex in examples if batching.fits(ex, seq_len)]
  if len(kept) < len(examples):
    log.warning("dropping %d of %d examples longer than seq_len=%d", len(examples) - len(kept),
                len(examples), seq_len)
  if not kept:
    raise ValueError(f"None of the {len(examples)} examples fits seq_len={seq_len}.")
  rows = batching.make_rows(kept, seq_len, pad_id, pack=pack,
                            position_fn=positions_lib.position_fn(cfg))
  source = RowSource(rows, batch_size, seed, mesh, position_jitter, cfg.digit_offset)
  # A constant schedule does not depend on the step count: one compiled step serves every
  # STaR iteration even though their lengths differ.
  tx, train_fn = _compiled(cfg, opt, steps if opt.schedule != "constant" else 1, mesh, batch_size)
  state = state_lib.create_train_state(cfg, tx, mesh, jax.random.key(seed), params=params)
  history = []
  for s in tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
    state, m = train_fn(state, step_lib.device_batch(source(s), mesh, batch_size))
    history.append(m)
  history = [{k: float(v) for k, v in m.items()} for m in jax.device_get(history)]
  return state.params, history
