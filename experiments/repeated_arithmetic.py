r"""Repeated sampling on held-out arithmetic with the `pretrain_tiny` model, on CPU.

Launch (after `python -m starjax.train --config=experiments/pretrain_tiny.py
--workdir=runs/pretrain_tiny`):
  python -m starjax.eval.repeated --config=experiments/repeated_arithmetic.py \
    --workdir=runs/repeated_arithmetic
  (another run: --config.model.checkpoint=DIR; more samples: --config.sampling.num_samples=256)

The problems are the pretraining run's eval split (same task seed, digits and split size as
`pretrain_tiny`'s data section), so none was trained on.

Expected (measured on the shared 2-core CPU dev machine from a 300-step `pretrain_tiny` run;
72-111 s wall depending on load, almost all of it sampling 30 x 64 completions at 19-29
samples/s; the numbers below reproduce exactly): the model rarely gets a scratchpad right when
sampling (T=0.6, top-p 0.95, the Large Language Monkeys defaults) but coverage keeps growing
with k: pass@1 0.009, pass@2 0.017, pass@4 0.030, pass@8 0.046, pass@16 0.066, pass@32 0.100,
pass@64 0.167; majority vote 0.033 (1 of 30). The exponentiated power law fits with a = -4.74,
b = -0.210 (RMS error 0.08 in log coverage). Per digit count: 1 digit (8 problems) pass@1 0.029,
pass@64 0.25; 2 digits (11) 0.004 and 0.27; 3 digits (11) none solved. 17% of samples have no
parsable answer. Outputs: results.json, samples.jsonl, coverage.png in the workdir.
"""

from ml_collections import config_dict

from starjax.eval import repeated


def get_config() -> config_dict.ConfigDict:
  c = repeated.default_config()
  c.task.name = "arithmetic"
  c.task.kwargs = dict(digits=(1, 2, 3), n_train_per_digit=2000, n_test_per_digit=30,
                       ood_digits=(), seed=0)
  c.split = "test"
  c.n_problems = 30
  c.problem_seed = 0
  c.sampling.update(num_samples=64, max_new_tokens=128, temperature=0.6, top_p=0.95, top_k=0,
                    seed=0, batch_size=8)
  c.model.checkpoint = "runs/pretrain_tiny"
  return c
