r"""STaR on GSM8K from the built-in SmolLM2-135M-Instruct, at a CPU-sized subset.

CPU (2 cores; a few questions, to check the pipeline end to end):
  STARJAX_DATA_DIR=../shared/data python -m starjax.star --config=experiments/star_gsm8k.py \
    --workdir=runs/star_gsm8k

Full scale (TPU pod, paper settings: all 7473 train questions, 6 exemplars, greedy rationales,
rationalization, 40 * 1.2^(n-1) fine-tune steps from the base model, capped at the 30th
iteration's value; evaluation on the 1319 test questions):
  python -m starjax.star --config=experiments/star_gsm8k.py --workdir=gs://BUCKET/star_gsm8k \
    --config.task.n_few_shot=6 --config.star.n_train_questions=None --config.star.n_eval=None \
    --config.star.iterations=30 --config.star.max_steps=9500 --config.star.gen_batch_size=512 \
    --config.star.batch_size=64 --config.mesh.data=-1 --config.mesh.fsdp=4

Paper reference (GPT-J 6B): few-shot CoT 3.1%, STaR with rationalization 10.7% on the test set.
A 135M model is expected to stay in the low single digits; this config exists to run the loop on
a real pretrained model and a real dataset, not to reproduce the paper's number on CPU.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.tokenizer = ""  # The pretrained model brings its own.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # data_dir: None reads $STARJAX_DATA_DIR/gsm8k.
  c.task = dict(name="gsm8k", n_few_shot=2)
  c.base = dict(pretrain=None, pretrained="smollm2-135m")
  c.star = dict(iterations=2, samples_per_question=1, greedy=True, max_new_tokens=192,
                gen_batch_size=16, n_train_questions=16, rationalize=True,
                max_kept_per_question=1, few_shot_train=False, union=False, base_steps=4,
                step_growth=1.2, batch_size=4, seq_len=512, pack=True, eval_splits=("test",),
                n_eval=16, eval_batch_size=16, seed=0,
                optimizer=dict(lr=1e-5, warmup_steps=2, schedule="constant", weight_decay=0.0))
  return c
