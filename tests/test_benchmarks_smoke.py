"""Smoke test of the benchmark suite: every benchmark runs on a tiny setting and writes valid JSON.

Timings are not checked (the benchmarks themselves never run under `make test`); only that the
scripts run end to end through `run_all --quick` and that their JSON has the documented schema.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xla_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quiet_star_step, run_all, train_step  # noqa: E402

TRAIN_ROW_KEYS = ("model", "seq_len", "dtype", "tokens_per_s", "mfu", "peak_mem_mb",
                  "torch_tokens_per_s")
QS_ROW_KEYS = ("seq_len", "n_ahead", "step_s", "peak_mem_mb", "dense_step_s", "dense_peak_mem_mb")


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_env.flags(base="")  # Fast compiles, no fake devices (one device).
  env["JAX_PLATFORMS"] = "cpu"
  env["XDG_CACHE_HOME"] = str(out.parent / "cache")  # Keep the real ceiling cache untouched.
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return out, json.loads(out.read_text()), proc.stdout


def test_every_benchmark_ran(quick_run):
  _, combined, stdout = quick_run
  names = run_all.discover()
  assert "train_step" in names
  for name in ["matmul_ceiling", *names]:
    res = combined["benchmarks"][name]
    assert res["status"] == "ok", (name, res.get("log_tail"))
    assert res["rows"], name
    assert res["machine"]["name"] == combined["machine"]["name"]
  assert "| benchmark |" in stdout and "| train_step |" in stdout


def test_ceiling_schema(quick_run):
  _, combined, _ = quick_run
  ceiling = combined["benchmarks"]["matmul_ceiling"]
  assert set(ceiling["ceiling_gflops"]) == {"float32", "bfloat16"}
  assert all(_positive(g) for g in ceiling["ceiling_gflops"].values())
  assert combined["ceiling_gflops"] == ceiling["ceiling_gflops"]
  for r in ceiling["rows"]:
    assert r["framework"] in ("jax", "torch") and _positive(r["gflops"])


def test_train_step_schema(quick_run):
  out, combined, _ = quick_run
  res = combined["benchmarks"]["train_step"]
  assert "6 * N * tokens" in res["flops_formula"]
  assert res["ceiling"]["gflops"] == combined["ceiling_gflops"]
  try:
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
  for r in res["rows"]:
    assert "error" not in r, r.get("log_tail")
    for key in TRAIN_ROW_KEYS:
      assert key in r, key
    assert r["model"] == "tiny" and r["dtype"] in ("float32", "bfloat16")
    assert _positive(r["tokens_per_s"]) and _positive(r["mfu"]) and _positive(r["peak_mem_mb"])
    if have_torch:
      assert _positive(r["torch_tokens_per_s"])
      # The peer is the same model: same loss at the same parameters.
      assert r["loss_diff_vs_torch"] < (1e-4 if r["dtype"] == "float32" else 0.05)
  assert {r["dtype"] for r in res["rows"]} == {"float32", "bfloat16"}
  assert out.with_suffix(".md").read_text().startswith("Machine:")


def test_flops_formula():
  tied = train_step.model_config("smollm2_135m", "float32")
  untied = train_step.model_config("small", "float32")
  assert train_step.matmul_params(tied) == tied.num_params()
  assert train_step.matmul_params(untied) == untied.num_params() - untied.vocab_size * untied.dim
  flops = train_step.train_flops(tied, batch=2, seq_len=8)
  attn = 12 * tied.n_layers * 8 * tied.n_heads * tied.head_dim * 16
  assert flops == 6 * tied.num_params() * 16 + attn


def test_quiet_star_step_schema(quick_run):
  _, combined, stdout = quick_run
  res = combined["benchmarks"]["quiet_star_step"]
  assert "flops_per_step = 3 * (base + thought + talk)" in res["flops_formula"]
  assert res["ceiling"]["gflops"] == combined["ceiling_gflops"]
  for r in res["rows"]:
    assert "skipped" not in r and "dense_skipped" not in r, r
    for key in QS_ROW_KEYS:
      assert key in r, key
    for key in ("step_s", "peak_mem_mb", "dense_step_s", "dense_peak_mem_mb", "flops_per_step",
                "gflops_per_s", "mfu", "speedup_vs_dense", "tokens_per_s"):
      assert _positive(r[key]), (key, r[key])
    assert r["dense_flops_per_step"] > r["flops_per_step"]
    assert r["run"]["loss_finite"] and r["dense_run"]["loss_finite"]
    # The dense-mask baseline is the same objective: same first loss from the same start.
    assert r["loss_diff_vs_dense"] < 1e-4 * max(1.0, abs(r["run"]["first_loss"]))
  ref = res["reference"]
  assert {(x["seq_len"], x["n_ahead"]) for x in ref["rows"]} == {(256, 16), (256, 4)}
  assert set(res["targets"]["met"]) == {"speedup_vs_reference", "mem_reduction_vs_reference",
                                        "speedup_vs_dense", "linear_in_n"}
  assert "| quiet_star_step |" in stdout


def test_quiet_star_flops_formula():
  model_cfg = quiet_star_step.model_config()
  assert (model_cfg.n_layers, model_cfg.dim, model_cfg.vocab_size) == (4, 128, 512)
  qcfg = quiet_star_step.quiet_star_config(16)
  assert (qcfg.n_sampled, qcfg.n_steps, qcfg.n_passes, qcfg.n_ahead_talk) == (13, 19, 2, 4)
  b, n, s, p, t = 2, 256, 19, 2, 4
  lin = 2.0 * (model_cfg.num_params() - 512 * 128)
  att = lambda keys: 4.0 * 4 * model_cfg.n_heads * model_cfg.head_dim * keys
  talk = b * p * t * n * (2.0 * 128 * 512 + 2.0 * (3 * 128**2 + 128))
  for dense, keys in ((False, n + s - 1), (True, n * s)):
    forward = b * n * (lin + att(n)) + b * p * (s - 1) * n * (lin + att(keys)) + talk
    flops = quiet_star_step.step_flops(model_cfg, qcfg, b, n, dense=dense)
    assert math.isclose(flops["flops_per_step"], 3 * forward)


def test_quiet_star_linearity():
  rows = [{"seq_len": 8, "n_ahead": n, "step_s": 1.0 + n, "flops_per_step": 1.0 + n,
           "dense_step_s": 1.0 + n * n, "dense_flops_per_step": 1.0 + n * n} for n in (4, 8, 16)]
  (lin,) = quiet_star_step.linearity(rows)
  assert lin["linear"] and abs(lin["chord_deviation"]) < 1e-9 and lin["step_ratio"] == 17 / 5
  (dense,) = quiet_star_step.linearity(rows, "dense_")
  assert not dense["linear"] and dense["chord_deviation"] < -0.1


def _qs_rows(step_s: dict[int, float]) -> list[dict]:
  model_cfg = quiet_star_step.model_config()
  return [{"seq_len": 256, "n_ahead": n, "step_s": s,
           "flops_per_step": quiet_star_step.step_flops(
               model_cfg, quiet_star_step.quiet_star_config(n), 2, 256)["flops_per_step"]}
          for n, s in step_s.items()]


def test_quiet_star_linearity_target_uses_interleaved_times():
  # Per-N children caught the machine at different speeds: N=16 looks too slow (chord -0.23).
  children = _qs_rows({4: 1.62, 8: 2.31, 16: 5.78})
  res = quiet_star_step.compare(children, "cpu")
  assert res["targets"]["met"]["linear_in_n"] is False
  assert res["targets"]["linear_in_n_source"] == "per_config_children"
  inter = quiet_star_step.interleaved_rows(
      {"seq_len": 256, "n_ahead": [4, 8, 16], "step_s": [1.4, 2.4, 4.3]},
      quiet_star_step.model_config())
  assert [r["flops_per_step"] for r in inter] == [r["flops_per_step"] for r in children]
  res = quiet_star_step.compare(children, "cpu", inter)
  assert res["targets"]["met"]["linear_in_n"] is True
  assert res["targets"]["linear_in_n_source"] == "interleaved"
  assert res["linear_in_n"][0]["linear"] is False  # The per-child check is still reported.
  # Interleaved times at another L do not stand in for the target's.
  other = [{**r, "seq_len": 128} for r in inter]
  res = quiet_star_step.compare(children, "cpu", other)
  assert res["targets"]["linear_in_n_source"] == "per_config_children"


def test_quiet_star_run_interleaved_rounds():
  spec = {"seq_len": 8, "n_aheads": [4, 5], "rounds": 2, "batch": 1, "quick": True, "warmup": 1}
  res = quiet_star_step.run_interleaved(spec)
  assert res["n_ahead"] == [4, 5] and res["rounds"] == 2 and res["loss_finite"]
  for times, median in zip(res["times_s"], res["step_s"]):
    assert len(times) == 2 and all(_positive(t) for t in times)
    assert math.isclose(median, sum(times) / 2)
  with pytest.raises(ValueError, match=">= 2 N"):
    quiet_star_step.run_interleaved({**spec, "n_aheads": [4]})


def test_summary_rows_name_each_configuration():
  results = {
      "quiet_star_step": {"rows": [
          {"model": "quiet_star_4x128", "seq_len": 256, "n_ahead": n, "batch": 2,
           "dtype": "float32", "step_s": 1.0, "tokens_per_s": 512.0 / n} for n in (4, 16)]},
      "decode": {"rows": [{"batch": 1, "mode": "greedy", "dtype": "float32",
                           "starjax_tokens_per_s": 20.0, "hf_tokens_per_s": 10.0,
                           "ratio": 2.0}]}}
  rows = run_all.summary_rows(results)
  assert [r["model"] for r in rows] == ["quiet_star_4x128 N=4", "quiet_star_4x128 N=16", "greedy"]
  assert rows[2]["tokens_per_s"] == 20.0 and rows[2]["speedup_vs_torch"] == 2.0
