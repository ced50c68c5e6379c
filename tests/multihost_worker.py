"""One process of the multi-host test (tests/test_multihost.py); also runs as a single process.

Does (i) STaR-style generation with a tiny random model (greedy text and sampled tokens, K samples
per prompt, prompts sharded over the mesh), (ii) two iterations of the STaR loop (generate, keep,
rationalize, fine-tune, evaluate, stage files written by process 0) with a stand-in checker a
random model can pass, and (iii) a few steps of the real training loop with checkpoints. Process 0 alone writes the results (--out/generate.npz right after generation,
--out/train.npz at the end); the other processes only check that they got the same output.

Multi-process when STARJAX_DISTRIBUTED=1 (set by `starjax.parallel.localhost.launch`, together
with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID); XLA_FLAGS and JAX_PLATFORMS
must be set by the caller before this starts. With --stall_at=S, process 1 writes
`workdir/stalled` when it is about to load the batch of step S and then hangs, so the test can
kill it at a known point.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

assert "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""), "set XLA_FLAGS"

from starjax import parallel  # noqa: E402

HEARTBEAT_S = 5  # A dead peer is noticed within about this long.


def _initialize() -> None:
  if os.environ.get(parallel.distributed.ENV_FLAG) == "1":
    parallel.initialize(True, coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                        process_id=int(os.environ["JAX_PROCESS_ID"]), timeout_s=120,
                        heartbeat_timeout_s=HEARTBEAT_S, shutdown_timeout_s=30)


_initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from starjax import models, tokenizers  # noqa: E402
from starjax.data.arithmetic_task import ArithmeticTask  # noqa: E402
from starjax.parallel import multihost  # noqa: E402
from starjax.sampling import DecodeConfig, generate_text, generate_tokens  # noqa: E402
from starjax.star.config import STaRConfig  # noqa: E402
from starjax.star.loop import STaR  # noqa: E402
from starjax.train import loop  # noqa: E402
from starjax.train.optim import OptimizerConfig  # noqa: E402

PROMPTS = ["Q: 12+7\nA:", "Q: 3+45\nA:", "Input:\n9 9 + 1\n", "Q: what is 8+8?\nA:", "1 2 3"]
STEPS = 8
TINY = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)  # Compiles fast.
STALL_MARKER = "stalled"


def train_config() -> config_dict.ConfigDict:
  """Tiny run; fsdp=8 so parameters (and their checkpoint shards) span both processes."""
  c = loop.default_config()
  c.tokenizer = "byte"
  c.model = dict(TINY, preset="tiny", dtype="float32", remat="none")
  c.mesh = dict(data=1, fsdp=8, tensor=1)
  c.data = dict(task="arithmetic", digits=(1, 2), n_train_per_digit=60, n_eval_per_digit=2,
                seed=0)  # Too few eval rows for a batch: no eval pass (one compile less).
  c.optimizer.update(lr=3e-3, warmup_steps=2, schedule="cosine")
  c.train.update(steps=STEPS, batch_size=16, seq_len=64, eval_every=0, eval_batches=1,
                 log_every=1, ckpt_every=2, keep_ckpts=3, async_ckpt=True, progress=False)
  return c


def generate() -> dict[str, np.ndarray]:
  """Greedy text and sampled tokens (K=3) of a tiny random model on a (data=2, fsdp=4) mesh."""
  tok = tokenizers.ByteTokenizer()
  cfg = models.preset("tiny", vocab_size=tok.vocab_size, **TINY)
  params = models.init_params(cfg, jax.random.key(0))
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
  greedy = generate_text(cfg, params, tok, PROMPTS, max_new_tokens=6, num_samples=2, greedy=True,
                         mesh=mesh)
  dc = DecodeConfig(max_new_tokens=6, temperature=1.0, top_k=20, eos_id=tok.eos_id,
                    pad_id=tok.pad_id)
  prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
  sampled = generate_tokens(cfg, params, prompts, dc, num_samples=3, seed=7, mesh=mesh)
  out = {
      "greedy_text": np.asarray([[c.text for c in row] for row in greedy]),
      "sampled_tokens": sampled.tokens, "sampled_lengths": sampled.lengths,
      "sampled_logprobs": sampled.logprobs,
  }
  multihost.assert_same({k: v for k, v in out.items() if k != "greedy_text"}, "sampled outputs")
  return out


class EvenLengthTask(ArithmeticTask):
  """A checker a random model passes about half the time: the completion's length is even."""

  def is_correct(self, ex, completion: str) -> bool:
    del ex
    return len(completion) % 2 == 0


def star(workdir: Path) -> None:
  """Two STaR iterations of a tiny random model on a (data=2, fsdp=4) mesh into workdir."""
  tok = tokenizers.ByteTokenizer()
  cfg = models.preset("tiny", vocab_size=tok.vocab_size, **TINY)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
  params = multihost.global_from_host(models.init_params(cfg, jax.random.key(1)),
                                      NamedSharding(mesh, P()))
  task = EvenLengthTask(digits=(1, 2), n_train_per_digit=6, n_test_per_digit=3, ood_digits=(),
                        seed=0)
  config = STaRConfig(iterations=2, greedy=False, samples_per_question=2, temperature=1.0,
                      max_new_tokens=8, gen_batch_size=8, base_steps=2, batch_size=8, seq_len=64,
                      eval_batch_size=8, seed=3,
                      optimizer=OptimizerConfig(lr=1e-2, warmup_steps=1, schedule="constant"))
  STaR(task=task, model_cfg=cfg, base_params=params, tokenizer=tok, config=config,
       workdir=workdir, mesh=mesh, progress=False).run()


def record_and_stall(steps_run: list[int], stall_at: int | None, workdir: Path) -> None:
  """Records the train steps this run loads; with `stall_at`, process 1 hangs at that step."""
  original = loop.RowSource.__call__

  def call(self, s):
    if self.batch_size == 16:  # The train source (eval is off).
      if s == stall_at and jax.process_index() == 1:
        (workdir / STALL_MARKER).write_text(str(s))
        time.sleep(3600)  # Killed by the test.
      steps_run.append(s)
    return original(self, s)

  loop.RowSource.__call__ = call


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """Process 0 only: host outputs are written once, not once per process."""
  if multihost.is_primary():
    with open(path, "wb") as f:
      np.savez(f, written_by=np.asarray(jax.process_index()), **arrays)


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="directory for generate.npz and train.npz")
  p.add_argument("--skip_generate", action="store_true")
  p.add_argument("--stall_at", type=int, default=None)
  args = p.parse_args()
  workdir, out = Path(args.workdir), Path(args.out)
  if not args.skip_generate:
    save(out / "generate.npz", generate())
    star(workdir.parent / (workdir.name + "_star"))
  steps_run: list[int] = []
  record_and_stall(steps_run, args.stall_at, workdir)
  result = loop.train_and_evaluate(train_config(), workdir)
  params = multihost.to_host(result["state"].params)  # All-gathered: fsdp spans processes.
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays = {"params/" + jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
  arrays.update(step=np.asarray(multihost.to_host(result["state"].step)),
                steps_run=np.asarray(steps_run), process_count=np.asarray(jax.process_count()),
                device_count=np.asarray(jax.device_count()))
  save(out / "train.npz", arrays)
  print(json.dumps({"process": jax.process_index(), "step": int(arrays["step"])}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
