"""Multi-host on one machine: 2 JAX processes x 4 CPU devices vs one process with 8 devices.

The worker (`tests/multihost_worker.py`) generates with a tiny random model (greedy and sampled,
K samples per prompt, prompts sharded over the mesh) and trains a few steps of the real loop with
parameters sharded across both processes and asynchronous orbax checkpoints. Run A (two
processes) stalls process 1 before step 6; the test kills it and expects process 0 to abort with
JAX's "another task died" error within seconds. Run B (two fresh processes) resumes from the step-4
checkpoint. Everything is compared with run R, one uninterrupted process with 8 devices.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import xla_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from starjax import parallel
from starjax.parallel import localhost, multihost
from starjax.train import step as step_lib

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parents[1]
STALL_AT = 5  # Batch index; checkpoints exist for steps 2 and 4 by then.
KILL_DEADLINE_S = 60  # Process 0 must be gone this long after process 1 is killed.


def _env(tmp: Path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.pop("STARJAX_DISTRIBUTED", None)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = xla_env.flags(base="")  # Fast compiles; localhost adds the device count.
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "jax_cache")  # Run B reuses run A's programs.
  return env


def _cmd(workdir: Path, out: Path, *extra: str) -> list[str]:
  out.mkdir(parents=True, exist_ok=True)
  return [sys.executable, str(WORKER), f"--workdir={workdir}", f"--out={out}", *extra]


def _logs(d: Path, name: str, n: int):
  return ([open(d / f"{name}{i}.out", "w") for i in range(n)],
          [open(d / f"{name}{i}.err", "w") for i in range(n)])


def _tail(path: Path, n: int = 3000) -> str:
  return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _wait_for(pred, procs, timeout_s: float, what: str, logs: list[Path]) -> None:
  deadline = time.monotonic() + timeout_s
  while not pred():
    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
      raise AssertionError(f"{what} did not happen; exit codes "
                           f"{[p.poll() for p in procs]}\n" + "\n".join(_tail(f) for f in logs))
    time.sleep(0.2)


@dataclasses.dataclass
class Runs:
  tmp: Path
  ref: dict  # Run R: one process, 8 devices.
  gen: dict  # Run A's generation (two processes).
  resumed: dict  # Run B's training results.
  kill_exit_code: int
  kill_seconds: float
  kill_stderr: str
  ckpts_before_resume: list[int]


def _load(path: Path) -> dict:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _ckpt_steps(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
  tmp = tmp_path_factory.mktemp("multihost")
  env = _env(tmp)
  # Run R in the background while run A starts.
  ref_env = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
  ref_out, ref_err = _logs(tmp, "ref", 1)
  ref = subprocess.Popen(_cmd(tmp / "ref_w", tmp / "ref"), env=ref_env, stdout=ref_out[0],
                         stderr=ref_err[0])
  try:
    # Run A: generate, train, process 1 hangs at STALL_AT; kill it once checkpoint 4 is written.
    work = tmp / "mh_w"
    work.mkdir()
    outs, errs = _logs(tmp, "a", 2)
    procs = localhost.launch(_cmd(work, tmp / "a", f"--stall_at={STALL_AT}"), 2, 4, env=env,
                             stdout=outs, stderr=errs)
    logs = [tmp / "a0.err", tmp / "a1.err"]
    _wait_for(lambda: (work / "stalled").exists() and 4 in _ckpt_steps(work), procs, 240,
              "process 1 stalling after checkpoint 4", logs)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    try:
      code = procs[0].wait(timeout=KILL_DEADLINE_S)
    except subprocess.TimeoutExpired:
      procs[0].kill()
      code = None
    kill_s = time.monotonic() - t0
    procs[1].wait()
    ckpts = _ckpt_steps(work)
    # Run B: both processes again, same command: resumes from the latest checkpoint.
    outs, errs = _logs(tmp, "b", 2)
    procs = localhost.launch(_cmd(work, tmp / "b", "--skip_generate"), 2, 4, env=env,
                             stdout=outs, stderr=errs)
    codes = localhost.wait_all(procs, timeout_s=240)
    assert codes == [0, 0], f"resume failed: {codes}\n{_tail(tmp / 'b0.err')}\n{_tail(tmp / 'b1.err')}"
    assert ref.wait(timeout=240) == 0, _tail(tmp / "ref0.err")
  finally:
    if ref.poll() is None:
      ref.kill()
  ref_data = {**_load(tmp / "ref" / "generate.npz"), **_load(tmp / "ref" / "train.npz")}
  return Runs(tmp=tmp, ref=ref_data, gen=_load(tmp / "a" / "generate.npz"),
              resumed=_load(tmp / "b" / "train.npz"), kill_exit_code=code, kill_seconds=kill_s,
              kill_stderr=_tail(tmp / "a0.err", 4000), ckpts_before_resume=ckpts)


def _metrics(workdir: Path) -> dict[int, dict]:
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
  steps = [r["step"] for r in lines]
  assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
  return {r["step"]: r for r in lines}


@pytest.mark.slow
def test_generation_matches_single_process(runs):
  assert int(runs.gen["written_by"]) == 0
  np.testing.assert_array_equal(runs.gen["greedy_text"], runs.ref["greedy_text"])
  np.testing.assert_array_equal(runs.gen["sampled_tokens"], runs.ref["sampled_tokens"])
  np.testing.assert_array_equal(runs.gen["sampled_lengths"], runs.ref["sampled_lengths"])
  np.testing.assert_allclose(runs.gen["sampled_logprobs"], runs.ref["sampled_logprobs"],
                             atol=1e-5)
  # Sampling really sampled: K samples of a prompt differ somewhere.
  assert (runs.gen["sampled_tokens"][:, 0] != runs.gen["sampled_tokens"][:, 1]).any()


def _star_files(workdir: Path) -> dict[str, object]:
  """Every STaR stage file, with the fields that legitimately differ (wall times) removed."""
  from starjax.utils_io import read_json, read_jsonl

  out: dict[str, object] = {}
  for n in (0, 1, 2):
    d = workdir / f"iter_{n}"
    for name in ("samples.jsonl", "rationalized.jsonl", "kept.jsonl"):
      if n:
        out[f"{n}/{name}"] = read_jsonl(d / name)
    for name in ("finetune.json", "metrics.json") if n else ("metrics.json",):
      rec = read_json(d / name)
      rec.pop("seconds", None)
      rec.pop("wall_s", None)
      out[f"{n}/{name}"] = rec
  return out


@pytest.mark.slow
def test_star_loop_matches_single_process(runs):
  """Two processes run the STaR loop (stage files by process 0) exactly as one process does."""
  got, want = _star_files(runs.tmp / "mh_w_star"), _star_files(runs.tmp / "ref_w_star")
  assert got.keys() == want.keys()
  assert want["1/kept.jsonl"] and want["2/finetune.json"]["steps"] == 2  # Something was kept.
  for k in want:
    for field in ("first_loss", "last_loss", "finetune_last_loss"):  # Reduction order differs.
      if isinstance(want[k], dict) and want[k].get(field) is not None:
        np.testing.assert_allclose(got[k].pop(field), want[k].pop(field), rtol=1e-5, err_msg=k)
    assert got[k] == want[k], k
  hashes = {want[f"{n}/metrics.json"]["start_params_hash"] for n in (1, 2)}
  assert hashes == {want["0/metrics.json"]["base_params_hash"]}  # Both start from the base.


@pytest.mark.slow
def test_killed_process_fails_the_other_quickly(runs):
  assert runs.kill_exit_code not in (None, 0), (
      f"process 0 still running {KILL_DEADLINE_S} s after process 1 was killed")
  assert runs.kill_seconds < KILL_DEADLINE_S
  # The coordination service words it by what the survivor was doing when the peer vanished.
  markers = ("another task died", "unhealthy", "heartbeat timeout", "remote task has failed")
  assert any(m in runs.kill_stderr for m in markers), runs.kill_stderr


@pytest.mark.slow
def test_resume_continues_and_equals_uninterrupted_single_process(runs):
  assert runs.ckpts_before_resume == [2, 4]
  res, ref = runs.resumed, runs.ref
  assert int(res["process_count"]) == 2 and int(ref["process_count"]) == 1
  assert int(res["device_count"]) == int(ref["device_count"]) == 8
  assert int(res["written_by"]) == 0
  np.testing.assert_array_equal(res["steps_run"], [4, 5, 6, 7])  # Resumed at step 4.
  assert int(res["step"]) == int(ref["step"]) == 8
  assert _ckpt_steps(runs.tmp / "mh_w")[-1] == 8
  # Losses of steps 1-4 (run A) and 5-8 (run B) equal the uninterrupted single-process run.
  got, want = _metrics(runs.tmp / "mh_w"), _metrics(runs.tmp / "ref_w")
  assert sorted(got) == sorted(want) == list(range(1, 9))
  for s in want:
    np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=1e-6, err_msg=f"step {s}")
  keys = sorted(k for k in ref if k.startswith("params/"))
  assert keys and keys == sorted(k for k in res if k.startswith("params/"))
  for k in keys:
    np.testing.assert_allclose(res[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
  checksum = lambda d: sum(float(np.abs(d[k]).astype(np.float64).sum()) for k in keys)
  np.testing.assert_allclose(checksum(res), checksum(ref), rtol=1e-9)


# ---------------------------------------------------------------- single-process behaviour


def test_initialize_reads_the_launcher_environment(monkeypatch):
  """`initialize()` with no arguments takes what `localhost.process_env` sets."""
  from starjax.parallel import distributed

  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kw: calls.append(kw))
  env = localhost.process_env(1, 2, 4, 1234, base={})
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert parallel.initialize(heartbeat_timeout_s=5) is True
  assert calls == [dict(coordinator_address=None, num_processes=2, process_id=1,
                        initialization_timeout=300, heartbeat_timeout_seconds=5)]
  assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:1234"
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


def test_device_count_flag_is_replaced_or_dropped_and_other_flags_kept():
  from starjax import xla_flags

  flags = "--a=1 --xla_force_host_platform_device_count=8 --b"
  assert xla_flags.with_device_count(flags, 4) == (
      "--a=1 --b --xla_force_host_platform_device_count=4")
  assert xla_flags.with_device_count(flags, None) == "--a=1 --b"
  assert xla_flags.with_device_count("", None) == ""
  env = localhost.process_env(0, 2, 2, 1234, base={"XLA_FLAGS": flags})
  assert env["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=2") == 1
  assert "--xla_force_host_platform_device_count=8" not in env["XLA_FLAGS"]


@pytest.mark.needs_8_devices
def test_helpers_reduce_to_plain_calls_on_one_process():
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  np.testing.assert_array_equal(multihost.process_rows(rows, 16), np.arange(16))
  np.testing.assert_array_equal(multihost.process_rows(NamedSharding(mesh, P()), 5), np.arange(5))
  np.testing.assert_array_equal(step_lib.process_rows(mesh, 12), np.arange(12))
  x = {"a": np.arange(32.0).reshape(16, 2), "k": jax.random.split(jax.random.key(0), 16)}
  g = multihost.global_from_host(x, rows)
  assert g["a"].sharding == rows and g["k"].sharding == rows
  back = multihost.to_host(g)
  np.testing.assert_array_equal(back["a"], x["a"])
  assert multihost.is_primary() and not multihost.is_multiprocess()
  multihost.sync("noop")
  multihost.assert_same(back["a"], "noop")


@pytest.mark.needs_8_devices
def test_device_batch_global_size_argument():
  mesh = parallel.make_mesh(parallel.MeshConfig(data=8))
  rows = {"inputs": np.arange(48, dtype=np.int32).reshape(16, 3)}
  a = step_lib.device_batch(rows, mesh)
  b = step_lib.device_batch(rows, mesh, 16)
  assert a["inputs"].sharding == b["inputs"].sharding == step_lib.batch_sharding(mesh, 2, 16)
  np.testing.assert_array_equal(np.asarray(b["inputs"]), rows["inputs"])
  # A batch too small to split over the mesh is replicated, on one process as before.
  small = step_lib.device_batch({"inputs": rows["inputs"][:4]}, mesh, 4)
  assert small["inputs"].sharding.is_fully_replicated


def test_wait_all_stops_the_others_when_one_fails():
  procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]),
           subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
  t0 = time.monotonic()
  assert localhost.wait_all(procs) == [3, -signal.SIGKILL]
  assert time.monotonic() - t0 < 30
  with pytest.raises(SystemExit):
    localhost.main(["--processes=2"])  # No command.
