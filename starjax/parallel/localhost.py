"""Run a command as several JAX CPU processes on this machine: a pod in miniature.

  python -m starjax.parallel.localhost --processes=2 --devices=4 -- \
      python -m starjax.train --config=experiments/pretrain_tiny.py --workdir=runs/mh

Each process gets `devices` fake CPU devices and the variables `starjax.parallel.initialize()`
reads (STARJAX_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS on a free localhost port, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), so any starjax entry point runs multi-process unchanged. This is how multi-host
code is tested without a pod (`tests/test_multihost.py`). If one process fails, the others are
stopped and the exit code of the lowest-numbered failing process is returned.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from starjax import xla_flags


def free_port() -> int:
  """A TCP port on localhost that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices: int, port: int,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
  """Environment of one process: fake CPU devices plus the multi-process variables."""
  env = dict(os.environ if base is None else base)
  env.update({
      "XLA_FLAGS": xla_flags.with_device_count(env.get("XLA_FLAGS", ""), devices),
      "JAX_PLATFORMS": "cpu",
      "STARJAX_DISTRIBUTED": "1",
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
  })
  return env


def launch(cmd: Sequence[str], num_processes: int, devices: int, *,
           env: Mapping[str, str] | None = None, cwd: str | None = None,
           stdout=None, stderr=None) -> list[subprocess.Popen]:
  """Starts `cmd` once per process; returns the Popen objects (process i at index i).

  `stdout` / `stderr` may be a single value for all processes or a list with one per process.
  """
  port = free_port()
  procs = []
  for i in range(num_processes):
    out = stdout[i] if isinstance(stdout, (list, tuple)) else stdout
    err = stderr[i] if isinstance(stderr, (list, tuple)) else stderr
    procs.append(subprocess.Popen(list(cmd), env=process_env(i, num_processes, devices, port, env),
                                  cwd=cwd, stdout=out, stderr=err))
  return procs


def wait_all(procs: Sequence[subprocess.Popen], timeout_s: float | None = None) -> list[int]:
  """Waits for every process; once one fails (or time runs out) the rest are killed.

  Returns the exit codes in process order (negative: killed by that signal).
  """
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while any(p.poll() is None for p in procs):
    failed = any(p.returncode not in (None, 0) for p in procs)
    late = deadline is not None and time.monotonic() > deadline
    if failed or late:
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.1)
  return [p.wait() for p in procs]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   usage="%(prog)s [--processes N] [--devices D] -- CMD ...")
  parser.add_argument("--processes", type=int, default=2, help="number of JAX processes")
  parser.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
  parser.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run (after --)")
  args = parser.parse_args(argv)
  cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
  if not cmd:
    parser.error("no command given (put it after --)")
  if args.processes < 1 or args.devices < 1:
    parser.error("--processes and --devices must be >= 1")
  codes = wait_all(launch(cmd, args.processes, args.devices))
  bad = [c for c in codes if c != 0]
  return 0 if not bad else (bad[0] if bad[0] > 0 else 128 - bad[0])


if __name__ == "__main__":
  sys.exit(main())
