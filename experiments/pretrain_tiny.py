r"""Pretrain the `tiny` decoder on generated arithmetic scratchpads (byte tokenizer), on CPU.

Launch:
  python -m starjax.train --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny

Expected (2 CPU cores, about 2 minutes): train loss falls from ~5.6 (uniform over 261 byte-level
ids) to below 1.0 by step 300; see `runs/pretrain_tiny/metrics.jsonl`.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.tokenizer = "byte"
  c.model = dict(preset="tiny", dtype="float32", remat="none")
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.data = dict(task="arithmetic", digits=(1, 2, 3), n_train_per_digit=2000, n_eval_per_digit=30,
                rationale_fraction=1.0, completion_only=False, seed=0)
  c.optimizer = dict(lr=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01,
                     clip_norm=1.0)
  c.train = dict(steps=300, batch_size=16, seq_len=256, pack=True, eval_every=100,
                 eval_batches=2, log_every=10, ckpt_every=100, keep_ckpts=2)
  return c
