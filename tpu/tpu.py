#!/usr/bin/env python3
r"""TPU VM / pod-slice lifecycle for starjax: create, install, run on every worker, logs, relaunch.

Standard library only (runs wherever `gcloud` does). Every subcommand builds `gcloud compute tpus
tpu-vm ...` commands; `--dry-run` prints them instead of running them. See tpu/README.md.

  python tpu/tpu.py create  [--spot | --preemptible]
  python tpu/tpu.py install [--mount_bucket]             # on --worker=all
  python tpu/tpu.py run [--job=NAME] -- COMMAND ...      # on --worker=all, under nohup
  python tpu/tpu.py logs [--worker=0] [--job=NAME]       # tail -F of the job's log
  python tpu/tpu.py status | stop | ssh | delete
  python tpu/tpu.py watch [create/install/run flags] -- COMMAND ...   # relaunch after preemption

Settings come from flags or environment variables; a missing one stops the command before anything
runs, with a message naming both spellings:

  --project  STARJAX_TPU_PROJECT    --zone    STARJAX_TPU_ZONE    --name  STARJAX_TPU_NAME
  --type     STARJAX_TPU_TYPE (create, watch)     --version STARJAX_TPU_VERSION (default: by type)
  --repo     STARJAX_REPO_URL (install, watch)    --branch  STARJAX_REPO_BRANCH (default: main)
  --bucket   STARJAX_BUCKET (with --mount_bucket)

`watch` in dry-run reads the TPU states it would observe from STARJAX_TPU_FAKE_STATES (comma
separated, e.g. "READY,PREEMPTED,READY"; NOT_FOUND = no such TPU) and the job's exit status from
STARJAX_TPU_FAKE_RCS ("running" or an exit code per check); it stops when the states run out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

# Runtime (software) versions for JAX, from Google's "TPU software versions" page (last updated
# 2025-08-11 when looked up). Matched by accelerator-type prefix; override with --version.
RUNTIME_VERSIONS = (
    ("v6e", "v2-alpha-tpuv6e"),
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v5e", "v2-alpha-tpuv5-lite"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v4", "tpu-ubuntu2204-base"),
    ("v3", "tpu-ubuntu2204-base"),
    ("v2", "tpu-ubuntu2204-base"),
)

# States of `gcloud compute tpus tpu-vm describe --format=value(state)` that mean the slice is
# gone for good (a spot/preemptible TPU cannot be restarted): delete it and create it again.
RECREATE_STATES = frozenset({"PREEMPTED", "TERMINATED", "STOPPED", "NOT_FOUND"})
READY = "READY"
RUNNING = "running"

LOG_DIR = "starjax-logs"  # Relative to the remote home directory.
REMOTE_DIR = "starjax"
STAMP = ".venv/.installed-stamp"  # The Makefile's install stamp: make targets skip reinstalling.


class UsageError(Exception):
  """A missing or invalid setting; reported without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class Setting:
  flag: str
  env: str
  default: str | None = None


SETTINGS = {
    "project": Setting("--project", "STARJAX_TPU_PROJECT"),
    "zone": Setting("--zone", "STARJAX_TPU_ZONE"),
    "name": Setting("--name", "STARJAX_TPU_NAME"),
    "type": Setting("--type", "STARJAX_TPU_TYPE"),
    "version": Setting("--version", "STARJAX_TPU_VERSION"),
    "repo": Setting("--repo", "STARJAX_REPO_URL"),
    "branch": Setting("--branch", "STARJAX_REPO_BRANCH", "main"),
    "bucket": Setting("--bucket", "STARJAX_BUCKET"),
}


def setting(args: argparse.Namespace, key: str, required: bool = True) -> str | None:
  """The flag value, else the environment variable, else the default; UsageError if required."""
  s = SETTINGS[key]
  value = getattr(args, key, None) or os.environ.get(s.env) or s.default
  if required and not value:
    raise UsageError(f"missing required setting {key!r}: pass {s.flag}=... or set {s.env}.")
  return value


def runtime_version(args: argparse.Namespace) -> str:
  """--version / $STARJAX_TPU_VERSION, else the documented JAX runtime for the accelerator type."""
  explicit = setting(args, "version", required=False)
  if explicit:
    return explicit
  acc = setting(args, "type")
  for prefix, version in RUNTIME_VERSIONS:
    if acc.startswith(prefix):
      return version
  raise UsageError(f"no known runtime version for accelerator type {acc!r}: pass --version=... or "
                   "set STARJAX_TPU_VERSION.")


# ---------------------------------------------------------------------------------------------
# gcloud commands.


def _base(args: argparse.Namespace, verb: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, setting(args, "name"),
          f"--project={setting(args, 'project')}", f"--zone={setting(args, 'zone')}"]


def create_cmd(args: argparse.Namespace) -> list[str]:
  """`tpu-vm create` with the accelerator type, runtime version and provisioning model."""
  cmd = _base(args, "create") + [f"--accelerator-type={setting(args, 'type')}",
                                 f"--version={runtime_version(args)}"]
  if args.spot:
    cmd.append("--spot")
  if args.preemptible:
    cmd.append("--preemptible")
  if args.data_disk:
    cmd.append(f"--data-disk=source={args.data_disk},mode=read-write")
  return cmd + list(args.create_flag or [])


def delete_cmd(args: argparse.Namespace) -> list[str]:
  return _base(args, "delete") + ["--quiet"]


def describe_cmd(args: argparse.Namespace) -> list[str]:
  return _base(args, "describe") + ["--format=value(state)"]


def ssh_cmd(args: argparse.Namespace, worker: str, command: str | None) -> list[str]:
  cmd = _base(args, "ssh") + [f"--worker={worker}"]
  return cmd + ([f"--command={command}"] if command is not None else [])


def _q(s: str) -> str:
  return shlex.quote(s)


def install_script(args: argparse.Namespace) -> str:
  """Shell run on every worker: clone/update the repo, a Python >= 3.11 venv, `pip install -e`.

  TPU VM images ship Python 3.10, older than jax needs, so uv provides the interpreter. The
  Makefile's install stamp is touched so `make <experiment>` on the VM does not reinstall with the
  CPU-only test extras.
  """
  repo, branch = setting(args, "repo"), setting(args, "branch")
  d = REMOTE_DIR
  lines = [
      "set -euo pipefail",
      f"if [ -d {d}/.git ]; then git -C {d} fetch -q origin {_q(branch)} && "
      f"git -C {d} checkout -q -f -B {_q(branch)} FETCH_HEAD; "
      f"else git clone -q --branch {_q(branch)} {_q(repo)} {d}; fi",
      f"cd {d}",
      "export PATH=$HOME/.local/bin:$PATH PIP_BREAK_SYSTEM_PACKAGES=1",
      "command -v uv >/dev/null || python3 -m pip install -q --user uv",
      f"[ -x .venv/bin/python ] || uv venv -q --python {_q(args.python_version)} .venv",
      f"uv pip install -q --python .venv/bin/python -e {_q('.[' + args.extras + ']')}",
      f"touch {STAMP}",
      "command -v make >/dev/null || sudo apt-get install -y -qq make || true",
  ]
  if args.mount_bucket:
    bucket = setting(args, "bucket").removeprefix("gs://").rstrip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", bucket):
      raise UsageError(f"bucket {bucket!r} is not a bucket name (gs://NAME or NAME).")
    mnt = f"/gcs/{bucket}"
    keyring = "/usr/share/keyrings/cloud.google.gpg"
    lines += [
        "if ! command -v gcsfuse >/dev/null; then "
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
        f"sudo gpg --dearmor --yes -o {keyring} && "
        f"echo \"deb [signed-by={keyring}] https://packages.cloud.google.com/apt "
        "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list "
        ">/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi",
        f"sudo mkdir -p {mnt} && sudo chown $(id -u):$(id -g) {mnt}",
        f"mountpoint -q {mnt} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 "
        f"{_q(bucket)} {mnt}",
    ]
  lines.append("echo \"starjax installed on $(hostname): $(git rev-parse --short HEAD)\"")
  return "\n".join(lines)


def job_paths(job: str) -> tuple[str, str, str]:
  """(log, pid, rc) files of a job, relative to the remote home directory."""
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", job):
    raise UsageError(f"--job={job!r}: use letters, digits, '.', '_' and '-' only.")
  return tuple(f"{LOG_DIR}/{job}.{ext}" for ext in ("log", "pid", "rc"))


def run_script(args: argparse.Namespace, command: str) -> str:
  """Shell run on every worker: start `command` in the repo under nohup/setsid, logging to a file.

  The job's process group id goes to a pid file (for `stop`) and its exit status to an rc file
  (for `watch`); a second start while the job is alive is refused, so `run` is idempotent.
  """
  log, pid, rc = job_paths(args.job)
  env = [] if args.no_distributed else ["STARJAX_DISTRIBUTED=1"]
  env += list(args.env or [])
  setup = [f"cd ~/{REMOTE_DIR}", ". .venv/bin/activate"] + [f"export {_q(e)}" for e in env]
  inner = " && ".join(setup) + f" && ( {command} )"
  body = f"{inner}; echo $? > ~/{rc}"
  if args.foreground:
    return f"mkdir -p ~/{LOG_DIR} && rm -f ~/{rc} && ( {inner} ) 2>&1 | tee ~/{log}"
  return (f"mkdir -p ~/{LOG_DIR}; "
          f"if [ -f ~/{pid} ] && kill -0 \"$(cat ~/{pid})\" 2>/dev/null; then "
          f"echo \"starjax job {args.job!r} is already running on $(hostname)\"; else "
          f"rm -f ~/{rc}; "
          f"setsid nohup bash -c {_q(body)} > ~/{log} 2>&1 < /dev/null & "
          f"echo $! > ~/{pid}; "
          f"echo \"started starjax job {args.job!r} on $(hostname), log ~/{log}\"; fi")


def job_status_script(job: str) -> str:
  """Prints the job's exit code, "running", or "missing" (neither alive nor finished)."""
  _, pid, rc = job_paths(job)
  return (f"if [ -f ~/{rc} ]; then cat ~/{rc}; "
          f"elif [ -f ~/{pid} ] && kill -0 \"$(cat ~/{pid})\" 2>/dev/null; then echo {RUNNING}; "
          "else echo missing; fi")


def stop_script(job: str, signal: str) -> str:
  _, pid, _ = job_paths(job)
  return (f"if [ -f ~/{pid} ]; then kill -{signal} -- -\"$(cat ~/{pid})\" && "
          f"echo \"sent SIG{signal} to starjax job {job!r} on $(hostname)\" || true; fi")


def logs_script(job: str, lines: int, follow: bool) -> str:
  log, _, _ = job_paths(job)
  return f"tail -n {lines}{' -F' if follow else ''} ~/{log}"


# ---------------------------------------------------------------------------------------------
# Execution.


class Runner:
  """Runs gcloud commands, or prints them (`dry_run`) and answers state queries with fakes."""

  def __init__(self, dry_run: bool, states: Sequence[str] | None = None,
               rcs: Sequence[str] | None = None, sleep: Callable[[float], None] = time.sleep):
    self.dry_run = dry_run
    self.states = list(states) if states is not None else None
    self.rcs = list(rcs or [])
    self.sleep = sleep if not dry_run else (lambda s: None)

  def note(self, msg: str) -> None:
    if self.dry_run:
      print(f"# {msg}", flush=True)
    else:
      print(f"[tpu] {msg}", file=sys.stderr, flush=True)

  def call(self, cmd: list[str], check: bool = True) -> int:
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return 0
    rc = subprocess.call(cmd)
    if check and rc:
      raise subprocess.CalledProcessError(rc, cmd[:5])
    return rc

  def output(self, cmd: list[str]) -> tuple[int, str, str]:
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return 0, "", ""
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return p.returncode, p.stdout.strip(), p.stderr.strip()

  def state(self, args: argparse.Namespace) -> str | None:
    """The TPU's state; NOT_FOUND if it does not exist; None when a dry run has no more states."""
    rc, out, err = self.output(describe_cmd(args))
    if self.dry_run:
      if self.states is None:
        self.states = ["NOT_FOUND"]
      return self.states.pop(0) if self.states else None
    if rc:
      if "NOT_FOUND" in err or "not found" in err.lower():
        return "NOT_FOUND"
      self.note(f"describe failed (exit {rc}): {err[-500:]}")
      return "UNKNOWN"
    return out.splitlines()[-1].strip() if out else "UNKNOWN"

  def job_status(self, args: argparse.Namespace) -> str:
    """Worker 0's view of the job: an exit code, "running" or "missing"."""
    _, out, _ = self.output(ssh_cmd(args, "0", job_status_script(args.job)))
    if self.dry_run:
      return self.rcs.pop(0) if self.rcs else RUNNING
    return out.splitlines()[-1].strip() if out else "missing"


def _command(args: argparse.Namespace) -> str:
  cmd = list(args.command or [])
  if cmd and cmd[0] == "--":
    cmd = cmd[1:]
  if not cmd:
    raise UsageError("no command given: put it after --, e.g. "
                     "tpu.py run -- python -m starjax.star --config=... --workdir=...")
  return cmd[0] if len(cmd) == 1 else shlex.join(cmd)


def do_create(args, r: Runner) -> None:
  r.call(create_cmd(args))


def do_delete(args, r: Runner) -> None:
  r.call(delete_cmd(args))


def do_status(args, r: Runner) -> int:
  state = r.state(args)
  if not r.dry_run:
    print(state)
  return 1 if state == "UNKNOWN" else 0


def do_install(args, r: Runner) -> None:
  r.call(ssh_cmd(args, "all", install_script(args)))


def do_run(args, r: Runner) -> None:
  r.call(ssh_cmd(args, "all", run_script(args, _command(args))))


def do_logs(args, r: Runner) -> None:
  r.call(ssh_cmd(args, args.worker, logs_script(args.job, args.lines, not args.no_follow)),
         check=False)


def do_stop(args, r: Runner) -> None:
  r.call(ssh_cmd(args, "all", stop_script(args.job, args.signal)))


def do_ssh(args, r: Runner) -> None:
  cmd = list(args.command or [])
  if cmd and cmd[0] == "--":
    cmd = cmd[1:]
  command = None if not cmd else cmd[0] if len(cmd) == 1 else shlex.join(cmd)
  r.call(ssh_cmd(args, args.worker, command), check=False)


def do_watch(args, r: Runner) -> int:
  """Keeps the job alive across preemptions; returns 0 when it finishes with exit status 0.

  Each poll: a PREEMPTED/TERMINATED/STOPPED/missing slice is deleted and created again, then
  starjax is installed and the same command rerun (it resumes from its workdir's checkpoint);
  a READY slice whose job was never started gets install + run; a finished job's exit status is
  trusted only if the slice is still READY one poll later (a preemption's SIGTERM also ends it).
  A failed gcloud call (e.g. no spot capacity) is retried at the next poll.
  """
  command = _command(args)
  # Check every setting the loop will need before creating anything.
  create_cmd(args)
  install_script(args)
  run_script(args, command)
  launched = False  # The job was started on the current slice.
  started_once = False
  relaunches = 0
  pending = None  # A finished job's status, waiting for confirmation.

  def launch(state: str | None) -> None:
    nonlocal launched, started_once
    try:
      if state is not None:
        if state != "NOT_FOUND":
          r.call(delete_cmd(args))
        r.call(create_cmd(args))
      do_install(args, r)
      do_run(args, r)
    except subprocess.CalledProcessError as e:
      r.note(f"{' '.join(e.cmd)} ... failed (exit {e.returncode}); retrying at the next poll")
      return
    launched = started_once = True

  while True:
    state = r.state(args)
    if state is None:  # Dry run: the fake states are used up.
      r.note("no more states (dry run); stopping")
      return 0
    r.note(f"state {state}")
    if state in RECREATE_STATES:
      if launched:  # The slice running our job is gone.
        if relaunches >= args.max_restarts:
          r.note(f"slice lost after {relaunches} relaunches (--max_restarts); giving up")
          return 1
        relaunches += 1
        r.note(f"relaunch {relaunches}: recreate the slice, reinstall, rerun the same command")
      launched, pending = False, None
      launch(state)
    elif state == READY and not launched:
      if started_once:
        r.note("slice is READY again without our job; reinstalling and rerunning")
      launch(None)
    elif state == READY:
      status = r.job_status(args)
      if status == RUNNING:
        pending = None
      elif status != pending:
        pending = status  # Confirm at the next poll: a preemption may be under way.
      elif status == "0":
        r.note("job finished with exit status 0")
        return 0
      else:
        r.note(f"job ended with status {status!r} on a READY slice; see `tpu.py logs`")
        if not args.rerun_on_failure or relaunches >= args.max_restarts:
          return 1
        relaunches += 1
        r.note(f"rerunning (relaunch {relaunches}, --rerun_on_failure)")
        pending, launched = None, False
        launch(None)
    r.sleep(args.poll_s)


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  g = common.add_argument_group("settings (flag, else environment variable)")
  for key, s in SETTINGS.items():
    g.add_argument(s.flag, dest=key, default=None, help=f"${s.env}" + (
        f" (default {s.default})" if s.default else ""))
  common.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="Print the gcloud commands instead of running them.")

  create = argparse.ArgumentParser(add_help=False)
  pm = create.add_mutually_exclusive_group()
  pm.add_argument("--spot", action="store_true", help="Spot VMs (preemptible, no 24 h limit).")
  pm.add_argument("--preemptible", action="store_true", help="Preemptible VMs (legacy, <= 24 h).")
  create.add_argument("--data_disk", default=None,
                      help="Attach this persistent disk (projects/P/zones/Z/disks/D) read-write.")
  create.add_argument("--create_flag", action="append",
                      help="Extra flag passed to `tpu-vm create` verbatim (repeatable).")

  install = argparse.ArgumentParser(add_help=False)
  install.add_argument("--extras", default="tpu", help="pip extras to install (default tpu).")
  install.add_argument("--python_version", default="3.11", help="Python of the remote venv.")
  install.add_argument("--mount_bucket", action="store_true",
                       help="Install gcsfuse and mount $STARJAX_BUCKET at /gcs/BUCKET on every "
                            "worker (a workdir that survives preemption).")

  job = argparse.ArgumentParser(add_help=False)
  job.add_argument("--job", default="job", help="Job name: ~/starjax-logs/JOB.{log,pid,rc}.")

  run = argparse.ArgumentParser(add_help=False)
  run.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="Environment variable for the job (repeatable).")
  run.add_argument("--no_distributed", action="store_true",
                   help="Do not set STARJAX_DISTRIBUTED=1 (it is set by default; multi-host "
                        "slices need it).")
  run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")

  p = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  sub.add_parser("create", parents=[common, create], help="Create the TPU VM / pod slice.")
  sub.add_parser("delete", parents=[common], help="Delete it.")
  sub.add_parser("status", parents=[common], help="Print its state (READY, PREEMPTED, ...).")
  sub.add_parser("install", parents=[common, install],
                 help="Clone/update starjax and pip install it on --worker=all.")
  r = sub.add_parser("run", parents=[common, job, run],
                     help="Start a command on --worker=all under nohup (log per worker).")
  r.add_argument("--foreground", action="store_true",
                 help="Stay attached and stream the output instead of detaching.")
  lg = sub.add_parser("logs", parents=[common, job], help="tail -F a job's log on one worker.")
  lg.add_argument("--worker", default="0", help="Worker index or 'all' (default 0).")
  lg.add_argument("--lines", type=int, default=100)
  lg.add_argument("--no_follow", action="store_true", help="Print and return (no -F).")
  st = sub.add_parser("stop", parents=[common, job], help="Signal the job on every worker.")
  st.add_argument("--signal", default="TERM", help="TERM (default; saves a checkpoint) or KILL.")
  sh = sub.add_parser("ssh", parents=[common], help="ssh to a worker (optionally run a command).")
  sh.add_argument("--worker", default="0")
  sh.add_argument("command", nargs=argparse.REMAINDER)
  w = sub.add_parser("watch", parents=[common, create, install, job, run],
                     help="Create/install/run, then relaunch whenever the slice is preempted.")
  w.add_argument("--poll_s", type=float, default=60.0, help="Seconds between state checks.")
  w.add_argument("--max_restarts", type=int, default=100,
                 help="Give up after this many relaunches.")
  w.add_argument("--rerun_on_failure", action="store_true",
                 help="Also rerun a job that exits nonzero on a READY slice.")
  w.set_defaults(foreground=False)
  return p


COMMANDS = {"create": do_create, "delete": do_delete, "status": do_status, "install": do_install,
            "run": do_run, "logs": do_logs, "stop": do_stop, "ssh": do_ssh, "watch": do_watch}


def _env_list(name: str) -> list[str] | None:
  v = os.environ.get(name)
  return [s.strip() for s in v.split(",") if s.strip()] if v else None


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
  args = _parser().parse_args(argv)
  if runner is None:
    runner = Runner(args.dry_run, _env_list("STARJAX_TPU_FAKE_STATES") if args.dry_run else None,
                    _env_list("STARJAX_TPU_FAKE_RCS") if args.dry_run else None)
  try:
    return COMMANDS[args.cmd](args, runner) or 0
  except UsageError as e:
    print(f"tpu.py {args.cmd}: error: {e}", file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(f"tpu.py {args.cmd}: {' '.join(e.cmd)} ... failed with exit status {e.returncode}",
          file=sys.stderr)
    return e.returncode or 1
  except FileNotFoundError as e:
    print(f"tpu.py {args.cmd}: {e.filename or 'gcloud'} not found; install the Google Cloud CLI "
          "(https://cloud.google.com/sdk) or use --dry-run.", file=sys.stderr)
    return 127


if __name__ == "__main__":
  sys.exit(main())
