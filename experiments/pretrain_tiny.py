r"""Pretrain the `tiny` decoder on generated arithmetic scratchpads (byte tokenizer), on CPU.

Launch:
  python -m starjax.train --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  (or `make pretrain-tiny`; any field can be overridden, e.g. --config.train.steps=100)

Expected (measured on the 2-core CPU dev machine, 92 s wall including compilation): train loss
4.99 at step 10 (uniform over the 261 byte-level ids would be 5.56), 0.57 at step 100, 0.39 at
step 300; eval loss 0.39 and next-byte accuracy 0.86 at step 300. Most of the remaining loss is
the unpredictable digits of the operands; see `runs/pretrain_tiny/metrics.jsonl`.
"""

from ml_collections import config_dict

from starjax.train import loop


def get_config() -> config_dict.ConfigDict:
  c = loop.default_config()
  c.tokenizer = "byte"
  c.model.preset = "tiny"
  c.data = dict(task="arithmetic", digits=(1, 2, 3), n_train_per_digit=2000, n_eval_per_digit=30,
                rationale_fraction=1.0, completion_only=False, seed=0)
  c.optimizer.update(lr=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01)
  c.train.update(steps=300, batch_size=16, seq_len=256, pack=True, eval_every=100,
                 eval_batches=2, log_every=10, ckpt_every=100, keep_ckpts=2)
  return c
