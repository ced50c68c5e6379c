"""Decode throughput: starjax's sampler vs HF transformers `generate`, same config and weights.

New tokens per second at batch 1, 8 and 32 for 128 new tokens after a 16-token prompt, greedy and
sampled, f32 and bf16 compute (`--dtypes`; HF runs f32), on the SmolLM2-135M shape (random
weights), measured in one run with:
  * the fraction of the machine's compute limit reached: 2 x params x batch FLOPs per decode step
    against the row dtype's matmul ceiling (benchmarks/matmul_ceiling.py, same run);
  * at batch 1, the fraction of memory bandwidth used: the f32 weights read once per step against
    the copy bandwidth measured here.

  python -m benchmarks.decode --out benchmarks/results/decode.json [--quick]

Rows: batch, mode, dtype, starjax_tokens_per_s, hf_tokens_per_s, ratio, compute_fraction,
bandwidth_fraction (batch 1 only).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common

PROMPT_LEN = 16


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
  """Copy bandwidth (read + write bytes per second) of a large float32 array, in GB/s."""
  a = np.ones(mb * 2**20 // 4, np.float32)
  b = np.empty_like(a)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(b, a)
    best = min(best, time.perf_counter() - t)
  return 2 * a.nbytes / best / 1e9


def _starjax_rate(cfg, params, batch: int, mode: str, new_tokens: int, repeats: int) -> float:
  from starjax.sampling import DecodeConfig, generate_tokens  # pylint: disable=g-import-not-at-top

  dc = DecodeConfig(max_new_tokens=new_tokens, greedy=mode == "greedy", temperature=1.0,
                    top_p=0.95 if mode == "sampled" else 1.0, eos_id=None)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (batch, PROMPT_LEN)).tolist()

  def run():
    generate_tokens(cfg, params, prompts, dc, batch_size=batch, min_prompt_bucket=PROMPT_LEN,
                    seed=1)

  timing = common.time_fn(run, warmup=1, repeats=repeats)
  return batch * new_tokens / timing.median


def _hf_rate(cfg, params, batch: int, mode: str, new_tokens: int, repeats: int) -> float | None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  from starjax.models import hf  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 2)
  hf_cfg = transformers.LlamaConfig(**hf.config_to_hf(cfg, architecture="LlamaForCausalLM"))
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
           hf.params_to_hf(cfg, jax.device_get(params)).items()}
  model.load_state_dict(state, strict=False)
  ids = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                           (batch, PROMPT_LEN)))
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
            pad_token_id=0, do_sample=mode == "sampled")
  if mode == "sampled":
    kw.update(temperature=1.0, top_p=0.95, top_k=0)

  def run():
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), **kw)

  timing = common.time_fn(run, warmup=1, repeats=repeats)
  return batch * new_tokens / timing.median


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(__doc__.splitlines()[0])
  p.add_argument("--batches", default=None, help="Comma list (default 1,8,32).")
  p.add_argument("--dtypes", default="float32,bfloat16",
                 help="Compute dtypes of starjax's rows (HF runs f32, once per batch and mode).")
  p.add_argument("--no-hf", action="store_true", help="Skip the transformers peer.")
  args = p.parse_args(argv)
  from starjax import models  # pylint: disable=g-import-not-at-top

  machine = common.machine_info()
  ceiling = common.get_ceiling(args.ceiling, machine["name"], quick=args.quick)
  if args.quick:
    # Smoke setting: seconds, not minutes (run_all gives each benchmark a small budget).
    cfg = models.preset("tiny", vocab_size=256, n_layers=1)
    batches, new_tokens, repeats = [1], 4, 1
  else:
    cfg = models.preset("smollm2_135m")
    batches, new_tokens, repeats = [1, 8, 32], 128, 3
  if args.batches:
    batches = [int(b) for b in args.batches.split(",")]
  dtypes = [d for d in args.dtypes.split(",") if d]
  params = models.init_params(cfg, jax.random.key(0))
  n_params = cfg.num_params()
  bandwidth = memory_bandwidth_gbs(64 if args.quick else 512)
  started = time.time()
  rows = []
  last_row_s = 0.0
  for batch in batches:
    for mode in ("greedy", "sampled"):
      # Rows grow with the batch: stop early rather than be killed mid-row by run_all's limit.
      if args.budget_s and time.time() - started + 2 * last_row_s > args.budget_s:
        break
      row_started = time.time()
      hf_rate = None if args.no_hf else _hf_rate(cfg, params, batch, mode, new_tokens,
                                                 max(1, repeats - 1))
      for dtype in dtypes:
        sj = _starjax_rate(cfg.replace(dtype=dtype), params, batch, mode, new_tokens, repeats)
        step_s = batch / sj  # seconds per decode step (one token for each row)
        row = {
            "batch": batch, "mode": mode, "dtype": dtype, "new_tokens": new_tokens,
            "prompt_len": PROMPT_LEN, "starjax_tokens_per_s": sj, "hf_tokens_per_s": hf_rate,
            "ratio": sj / hf_rate if hf_rate else None,
            "compute_fraction": (2 * n_params * batch / step_s / 1e9 / ceiling["gflops"][dtype]
                                 if ceiling["gflops"].get(dtype) else None),
            "bandwidth_fraction": (4 * n_params / step_s / 1e9 / bandwidth) if batch == 1
                                  else None,
        }
        rows.append(row)
        print(f"batch {batch:3d} {mode:8s} {dtype:8s} starjax {sj:8.1f} tok/s  hf "
              f"{common.fmt(hf_rate)} tok/s  ratio {common.fmt(row['ratio'])}", flush=True)
      last_row_s = time.time() - row_started
  result = {
      "benchmark": "decode", "machine": machine, "quick": args.quick, "model": "tiny" if args.quick
      else "smollm2_135m (random weights)", "params": n_params, "ceiling": ceiling,
      "memory_bandwidth_gbs": bandwidth,
      "formula": "compute_fraction = 2*params*batch / step_time / the row dtype's matmul "
                 "ceiling; bandwidth_fraction = 4*params bytes / step_time / copy bandwidth "
                 "(batch 1: the f32 parameters are read once per token; with bf16 compute a "
                 "one-row product stays f32, see starjax.models.matmul.bf16_dot_ok). HF runs f32.",
      "rows": rows,
  }
  if args.out:
    common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
