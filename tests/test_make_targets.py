"""Every experiment has a make target that `make help` lists and that honours WORKDIR= and ARGS=.

Only `make help` and `make -n` (print, do not run) are invoked.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# target -> the module its command runs.
EXPERIMENTS = {
    "demo": "starjax.star",
    "star-arithmetic": "starjax.star",
    "star-gsm8k": "starjax.star",
    "star-csqa": "starjax.star",
    "pretrain-tiny": "starjax.train",
    "quiet-star": "starjax.quiet_star.train",
    "quiet-star-demo": "starjax.quiet_star.train",
    "repeated-arithmetic": "starjax.eval.repeated",
    "soup": "starjax.eval.soups",
    "compile-check": "starjax.tools.compile_check",
}

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(*args):
  p = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=60, check=False)
  assert p.returncode == 0, p.stderr
  return p.stdout


def test_help_lists_every_experiment():
  listed = {line.split()[0] for line in _make("help").splitlines() if line.strip()}
  assert set(EXPERIMENTS) <= listed, set(EXPERIMENTS) - listed


def test_phony_names_every_experiment():
  text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
  phony = next(line for line in text.splitlines() if line.startswith(".PHONY:")).split()[1:]
  assert set(EXPERIMENTS) <= set(phony), set(EXPERIMENTS) - set(phony)


@pytest.mark.parametrize("target", sorted(EXPERIMENTS))
def test_workdir_and_args_reach_the_command(target):
  out = _make("-n", target, "WORKDIR=/x/wd", "ARGS=--foo --bar=1").replace("\\\n", " ")
  [cmd] = [line for line in out.splitlines() if f"-m {EXPERIMENTS[target]}" in line]
  assert "/x/wd" in cmd and cmd.rstrip().endswith("--foo --bar=1"), cmd


@pytest.mark.parametrize("target", sorted(EXPERIMENTS))
def test_defaults_without_overrides(target):
  out = _make("-n", target).replace("\\\n", " ")
  [cmd] = [line for line in out.splitlines() if f"-m {EXPERIMENTS[target]}" in line]
  if target != "compile-check":
    assert "runs/" in cmd, cmd  # A default workdir under runs/.
