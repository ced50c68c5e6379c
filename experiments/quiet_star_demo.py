r"""Quiet-STaR on CPU: a byte-level `tiny` decoder on GSM8K worked solutions, end to end.

Launch (`make quiet-star-demo` runs the same command):
  python -m starjax.quiet_star.train --config=experiments/quiet_star_demo.py \
    --workdir=runs/quiet_star_demo

GSM8K is read from $STARJAX_DATA_DIR/gsm8k, or from ../shared/data/gsm8k next to the repository.
The run is resumable at any point (rerun the same command). It does:
1. Warm-up: 200 steps of plain LM pretraining of the from-scratch `tiny` preset (2 layers, width
   64, byte tokenizer) on the GSM8K train solutions (`starjax.train`, in WORKDIR/warmup).
2. Quiet-STaR: 150 steps on windows of 64 tokens, 8 windows per step, 2 thoughts of 4 sampled
   tokens at every position, 2 talk steps, AdamW lr 1e-3 (constant after 10 steps); held-out
   loss with and without thoughts every 25 steps; decoded thoughts in WORKDIR/thoughts.jsonl.
3. Evaluation: WORKDIR/eval/difficult_tokens.{json,png} (loss change by base-loss decile on 64
   held-out windows of GSM8K test solutions) and soft_answer_gsm8k.json (spec §1.7, 32 test
   questions).

Deviations from the reference, both measured here:
* policy_loss_beta = 10, not 1e6. With lr 1e-3 on a 0.1M-parameter model the reference weight
  lets REINFORCE overwrite the language model: the base loss rose from 2.2 to 7.0 within 25 steps
  and the mixing weight ran off to -11. With beta = 100 the thoughts collapse to one string
  (" <<<"), so both passes agree and the advantage is 0 in 90-97% of the cells after 100 steps;
  with 10 it stays nonzero in ~50% (the clamp zeroes the other half).
* mixer_init_std = 0.125, not the model's 0.02: at width 64 the reference init (made for width
  4096) leaves the head's hidden activations ~0.02, and w moved about half as far in 150 steps.
The head is otherwise the reference's (unbounded w, zero output layer: w = 0 and the policy loss
is exactly 0 at step 1). With `quiet_star.mixing_sigmoid=True` (w = 0.5 at the start) the head
instead learns to switch the thoughts off (w = 0.001 after 50 steps).

Measured on the 2-core CPU dev machine, idle (load average 0.0 at the start, ~1 during): 3 min
52 s wall for everything (warm-up 200 steps at 2.0 steps/s, Quiet-STaR 150 steps at 1.5 steps/s,
compilation and evaluation); the same numbers come out bit for bit under load (at load average ~6
an earlier variant of this config took 9 min 50 s).
* Warm-up: LM loss 3.87 at step 20, 2.27 at step 200; held-out loss 2.24 nats/byte.
* Quiet-STaR, training windows, means over blocks of steps 2-25 / 26-50 / 51-75 / 76-100 /
  101-125 / 126-150:
    L_talk_0 - L_base   -0.00005 / -0.0012 / -0.0014 / -0.0013 / -0.0030 / -0.0011 nats
    L_base               2.316 / 2.254 / 2.228 / 2.222 / 2.175 / 2.174
    mixing weight w      -0.022 / -0.031 / -0.044 / -0.043 / -0.049 / -0.038 (0 at step 1)
    policy loss          3.9e-3 / 6.8e-3 / 9.4e-3 / 1.0e-2 / 9.2e-3 / 6.5e-3 (0 at step 1)
* Held-out (64 windows of GSM8K test solutions, 4032 tokens), L_thought - L_base at steps
  25/50/75/100/125/150: -0.0004 / -0.0003 / -0.0003 / -0.0033 / -0.0013 / +0.0026; base loss
  2.27 -> 2.15.
* eval/difficult_tokens.png at step 150: thoughts lower the loss of the easy tokens (deciles 1-6,
  -0.016 to -0.045 nats, 72-100% of them improved) and raise it for the hard ones (decile 10:
  +0.13). A negative w mostly sharpens the base distribution, which helps confident correct
  predictions and hurts confident wrong ones: at this scale the thoughts themselves carry little.
* Soft answer probability on 32 GSM8K test questions: 0.00154 without thoughts, 0.00151 with.
"""

import os
from pathlib import Path

from ml_collections import config_dict

from starjax.quiet_star import train


def _data_root() -> str:
  """$STARJAX_DATA_DIR, else the shared data folder next to the repository."""
  return os.environ.get("STARJAX_DATA_DIR") or str(
      Path(__file__).resolve().parents[1].parent / "shared" / "data")


def get_config() -> config_dict.ConfigDict:
  c = train.default_config()
  c.tokenizer = "byte"
  c.model.update(preset="tiny", dtype="float32", remat="none")
  c.base.update(pretrained="", thought_init="---")
  c.data = dict(task="gsm8k_text", data_dir=str(Path(_data_root()) / "gsm8k"),
                n_train=config_dict.placeholder(int), n_eval=200)  # n_train None: all 7473.
  c.warmup.update(steps=200, batch_size=8, seq_len=512, pack=True, log_every=20, ckpt_every=100,
                  keep_ckpts=1, eval_every=200, eval_batches=2)
  c.warmup.optimizer.update(lr=3e-3, warmup_steps=20, schedule="cosine", weight_decay=0.01)
  c.quiet_star.update(n_thought_tokens=4, n_ahead_talk=2, n_passes=2, policy_loss_beta=10.0,
                      mixer_init_std=0.125)
  c.optimizer.update(lr=1e-3, warmup_steps=10, schedule="constant", weight_decay=0.0)
  c.train.update(steps=150, batch_size=8, seq_len=64, log_every=1, ckpt_every=50, keep_ckpts=2,
                 thoughts_every=25, thought_positions=4)
  c.eval.update(every=25, at_end=True, n_windows=64, batch_size=16, soft_tasks="gsm8k",
                soft_n=32, soft_max_len=512, data_dir=_data_root())
  return c
