r"""STaR on CommonsenseQA from the built-in SmolLM2-135M-Instruct, at a CPU-sized subset.

CommonsenseQA's train split is not shipped here: put `train_rand_split.jsonl` (HF layout) next to
the dev file in `$STARJAX_DATA_DIR/commonsenseqa/` and set `--config.task.train_from_dev=0` to
train on it. Without it, this CPU config trains on 64 seeded-random dev questions and evaluates on
the disjoint rest (`train_from_dev=64`), which is only a pipeline check.

CPU (2 cores):
  STARJAX_DATA_DIR=../shared/data python -m starjax.star \
    --config=experiments/star_commonsense_qa.py --workdir=runs/star_csqa

Full scale (TPU pod; train 9741, dev 1221; paper: STaR with rationalization 72.5% with GPT-J):
  python -m starjax.star --config=experiments/star_commonsense_qa.py \
    --workdir=gs://BUCKET/star_csqa --config.task.n_few_shot=7 --config.task.train_from_dev=0 \
    --config.star.n_train_questions=None --config.star.n_eval=None --config.star.iterations=30 \
    --config.star.gen_batch_size=512 --config.star.batch_size=64 --config.mesh.fsdp=4
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.tokenizer = ""
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.task = dict(name="commonsense_qa", n_few_shot=3, train_from_dev=64)
  c.base = dict(pretrain=None, pretrained="smollm2-135m")
  c.star = dict(iterations=2, samples_per_question=1, greedy=True, max_new_tokens=96,
                gen_batch_size=16, n_train_questions=16, rationalize=True,
                max_kept_per_question=1, few_shot_train=False, union=False, base_steps=4,
                step_growth=1.2, batch_size=4, seq_len=512, pack=True, eval_splits=("test",),
                n_eval=16, eval_batch_size=16, seed=0,
                optimizer=dict(lr=1e-5, warmup_steps=2, schedule="constant", weight_decay=0.0))
  return c
