r"""Quiet-STaR on GSM8K worked solutions from the built-in SmolLM2-135M-Instruct.

CPU (2 cores): a pipeline check on real weights, 4 steps on windows of 32 tokens, then the soft
answer probability on 8 test questions and the decile analysis; `make quiet-star` runs it. It
takes 2 min 49 s on the idle 2-core dev machine (loading, compilation, 24 s per step,
evaluation); its numbers say nothing about the method (the CPU demo is `quiet_star_demo.py`):
  STARJAX_DATA_DIR=../shared/data python -m starjax.quiet_star.train \
    --config=experiments/quiet_star_gsm8k.py --workdir=runs/quiet_star_gsm8k
Measured there: L_base 3.31 at step 1 (windows start mid-document), soft answer probability
0.0213 with and without thoughts (the head has barely moved at lr 1e-6).

Full scale (TPU pod; run the same command on every host with STARJAX_DISTRIBUTED=1). Reference
settings (spec §1.6): 12-ahead thoughts (9 sampled tokens), 4 talk steps, 2 thoughts per position,
windows of 256 tokens, 8 windows per update, AdamW lr 1e-6 with 20 warm-up steps, weight decay
0.001, clip 1.0, policy weight 1e6, 100 updates; evaluation on the full GSM8K test set and
CommonsenseQA validation (soft answer probability) and zero-shot CoT maj@8 on 128 questions:
  python -m starjax.quiet_star.train --config=experiments/quiet_star_gsm8k.py \
    --workdir=gs://BUCKET/quiet_star_gsm8k \
    --config.train.steps=100 --config.train.batch_size=8 --config.train.seq_len=256 \
    --config.quiet_star.n_ahead=12 --config.quiet_star.n_ahead_talk=4 \
    --config.quiet_star.n_passes=2 --config.optimizer.lr=1e-6 \
    --config.data.n_train=7473 --config.model.dtype=bfloat16 --config.model.remat=full \
    --config.mesh.data=-1 --config.mesh.fsdp=1 \
    --config.eval.soft_tasks=gsm8k,commonsense_qa --config.eval.soft_n=1319 \
    --config.eval.cot_tasks=gsm8k,commonsense_qa --config.eval.cot_n=128 --config.eval.cot_k=8 \
    --config.eval.cot_max_new_tokens=384 --config.eval.batch_size=64

Paper reference (Mistral-7B, open-web-math, zero-shot): GSM8K 5.9 -> 10.9%, CommonsenseQA
36.3 -> 47.2%. A 135M model is expected to gain far less; the soft answer probability with and
without thoughts (eval/soft_answer_gsm8k.json) and the decile plot (eval/difficult_tokens.png)
are the quantities to compare.
"""

from ml_collections import config_dict

from starjax.quiet_star import train


def get_config() -> config_dict.ConfigDict:
  c = train.default_config()
  c.tokenizer = ""  # The pretrained model brings its own.
  c.base.update(pretrained="smollm2-135m", thought_init="---")
  c.model = dict(dtype="float32", remat="none")
  # data_dir: None reads $STARJAX_DATA_DIR/gsm8k; n_train: None takes all 7473 problems.
  c.data = dict(task="gsm8k_text", data_dir=config_dict.placeholder(str), n_train=64, n_eval=16)
  c.quiet_star.update(n_ahead=6, n_ahead_talk=2, n_passes=2)  # 3 sampled thought tokens.
  c.optimizer.update(lr=1e-6, warmup_steps=2, schedule="constant", weight_decay=0.001,
                     clip_norm=1.0)
  c.train.update(steps=4, batch_size=2, seq_len=32, ckpt_every=2, keep_ckpts=2,
                 thoughts_every=2, log_every=1)
  c.eval.update(every=0, at_end=True, n_windows=4, batch_size=4, soft_tasks="gsm8k", soft_n=8,
                soft_max_len=256, cot_tasks="", cot_n=4, cot_k=2, cot_max_new_tokens=64)
  return c
