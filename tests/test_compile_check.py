"""`python -m starjax.tools.compile_check`: abstract compile on fake devices, memory per device."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import xla_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset=tiny", "--devices=8", "--mesh=data=2,fsdp=4", "--batch=8", "--seq_len=32",
        "--qs_n_ahead=4", "--qs_n_ahead_talk=2"]


def _run(*args, timeout=600):
  env = xla_env.env(devices=2)  # The tool must replace the device count.
  p = subprocess.run([sys.executable, "-m", "starjax.tools.compile_check", *args], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=timeout, check=False)
  return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_tiny_on_8_fake_devices_prints_memory(tmp_path):
  out = tmp_path / "sub" / "cc.json"
  rc, stdout, stderr = _run(*TINY, f"--json_out={out}")
  assert rc == 0, stdout + stderr[-3000:]
  assert "on 8 cpu devices, mesh data=2 fsdp=4 tensor=1" in stdout
  assert "train step: batch 8 x 32" in stdout and "quiet_star step: batch 8 x 32" in stdout
  rows = [line.strip() for line in stdout.splitlines()]
  for label in ("arguments", "outputs", "aliased", "temp", "generated code", "peak estimate"):
    assert sum(r.startswith(label + " ") and " GB" in r for r in rows) == 2, label
  assert stdout.count("(budget 16 GB: OK)") == 2
  res = json.loads(out.read_text())
  assert res["devices"] == 8 and res["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  for name in ("train", "quiet_star"):
    mem = res["steps"][name]["memory_gb"]
    assert mem["arguments"] > 0 and mem["temp"] > 0, (name, mem)
    # The old state is donated: its buffers are reused for the new one.
    assert mem["aliased"] > 0 and not res["steps"][name]["exceeds_budget"]
    assert mem["peak_estimate"] == pytest.approx(
        mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temp"])
  # Quiet-STaR adds the thought embeddings and the mixing head to the state.
  assert res["steps"]["quiet_star"]["memory_gb"]["arguments"] > (
      res["steps"]["train"]["memory_gb"]["arguments"])


def test_over_budget_is_flagged_with_exit_status_1():
  rc, stdout, stderr = _run(*TINY, "--steps=train", "--hbm_gb=1e-6")
  assert rc == 1, stdout + stderr[-3000:]
  assert "EXCEEDS BUDGET" in stdout and "exceeds the 1e-06 GB per-device budget" in stdout


@pytest.mark.parametrize("mesh,devices,needs", [("data=2,fsdp=8", 8, "needs 16 devices"),
                                                ("data=3,fsdp=-1", 8, "3 does not divide 8")])
def test_mesh_that_does_not_match_the_devices_is_a_clear_error(mesh, devices, needs):
  rc, stdout, stderr = _run("--preset=tiny", f"--devices={devices}", f"--mesh={mesh}", timeout=120)
  assert rc == 2 and not stdout.strip().count("step")
  assert f"--mesh={mesh} does not fit --devices={devices}" in stderr and needs in stderr, stderr


def test_bad_mesh_spec_and_preset():
  rc, _, stderr = _run("--mesh=model=8", timeout=120)
  assert rc == 2 and "data=N, fsdp=N, tensor=N" in stderr
  rc, _, stderr = _run("--preset=nope", timeout=120)
  assert rc == 2 and "unknown --preset='nope'" in stderr


def test_arguments_are_parsed_before_jax_is_imported():
  code = ("import sys; from starjax.tools import compile_check as c; "
          "a = c.parse_args(['--mesh=fsdp=64', '--devices=64']); "
          "assert a.mesh_axes == {'fsdp': 64}, a; assert 'jax' not in sys.modules; print('ok')")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=60, check=False)
  assert p.stdout.strip() == "ok", p.stderr
