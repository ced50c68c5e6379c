r"""STaR on n-digit addition, from scratch, on 2 CPU cores (`make demo`).

Launch:
  python -m starjax.star --config=experiments/star_arithmetic.py --workdir=runs/star_arithmetic

A small decoder is first trained on a seed set: scratchpad rationales for 1-2 digit sums only
(some shown with the answer as a hint, like the paper's answer-key prompts) plus answer-only
problems for 1-5 digits. STaR iterations then run on 1-5 digit problems whose rationales are
unknown: generate greedily, keep correct rationales, rationalize wrong ones with the answer as a
hint (saved without it), fine-tune from the base model for 40 * 1.2^(n-1) steps, evaluate on
held-out problems.

Expected: (filled in from a measured run)
"""

from ml_collections import config_dict

from starjax.train import loop

SEED = 0
DIGITS = (1, 2, 3, 4, 5)
N_TEST = 40


def base_config() -> config_dict.ConfigDict:
  c = loop.default_config()
  c.tokenizer = "byte"
  c.model.update(preset="small", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                 max_seq_len=1024)
  c.data = dict(task="arithmetic_seed", rationale_digits=(1, 2), n_rationale_per_digit=600,
                hint_fraction=0.3, answer_digits=DIGITS, n_answer_per_digit=600,
                n_test_per_digit=N_TEST, seed=SEED)
  c.optimizer.update(lr=2e-3, warmup_steps=50, schedule="cosine", weight_decay=0.01)
  c.train.update(steps=500, batch_size=16, seq_len=256, eval_every=250, eval_batches=2,
                 log_every=25, ckpt_every=100, keep_ckpts=1, progress=True)
  return c


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.tokenizer = "byte"
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.task = dict(name="arithmetic", digits=DIGITS, n_train_per_digit=300, n_test_per_digit=N_TEST,
                ood_digits=(6,), seed=SEED)
  c.base = dict(pretrain=base_config(), pretrained="")
  c.star = dict(iterations=6, samples_per_question=1, greedy=True, max_new_tokens=160,
                gen_batch_size=256, n_train_questions=None, rationalize=True,
                max_kept_per_question=1, union=False, base_steps=40, step_growth=1.2,
                batch_size=16, seq_len=256, pack=True, eval_splits=("test", "ood_test"),
                n_eval=None, eval_batch_size=256, seed=SEED,
                optimizer=dict(lr=1e-3, warmup_steps=10, schedule="constant", weight_decay=0.01))
  return c
