"""tpu/tpu.py: the gcloud commands it would run (--dry-run), missing settings, the relaunch loop,
and the remote job scripts themselves (run locally with bash in a temporary HOME).

No gcloud and no network: dry runs print commands; the remote scripts only need bash.
"""

import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tpu" / "tpu.py"

_spec = importlib.util.spec_from_file_location("starjax_tpu_cli", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tpu  # dataclasses look their module up while the file executes.
_spec.loader.exec_module(tpu)

ENV = {
    "STARJAX_TPU_PROJECT": "my-proj",
    "STARJAX_TPU_ZONE": "us-central2-b",
    "STARJAX_TPU_NAME": "sj-test",
    "STARJAX_TPU_TYPE": "v4-8",
    "STARJAX_REPO_URL": "https://example.com/starjax.git",
    "STARJAX_BUCKET": "gs://my-bucket",
}
LOCATION = ["sj-test", "--project=my-proj", "--zone=us-central2-b"]


def _run(*args, env=None, drop=()):
  """Runs tpu.py in a subprocess with a clean STARJAX_* environment; returns (rc, lines, err)."""
  base = {k: v for k, v in os.environ.items() if not k.startswith("STARJAX_")}
  base.update(ENV if env is None else env)
  for k in drop:
    base.pop(k, None)
  p = subprocess.run([sys.executable, str(SCRIPT), *args], env=base, capture_output=True,
                     text=True, timeout=60, check=False)
  return p.returncode, p.stdout.splitlines(), p.stderr


def _commands(lines):
  """Printed gcloud commands as argv lists (comment lines dropped)."""
  return [shlex.split(line) for line in _join_continued(lines) if line.startswith("gcloud ")]


def _join_continued(lines):
  # Multi-line --command values are printed quoted over several lines; rejoin them.
  out, buf = [], None
  for line in lines:
    buf = line if buf is None else buf + "\n" + line
    try:
      shlex.split(buf)
    except ValueError:
      continue
    out.append(buf)
    buf = None
  assert buf is None, buf
  return out


def _verb(cmd):
  assert cmd[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], cmd
  return cmd[4]


def _flag(cmd, name):
  vals = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(vals) == 1, (name, cmd)
  return vals[0]


# ---------------------------------------------------------------------------------------------
# Dry-run commands.


def test_create_dry_run():
  rc, lines, err = _run("create", "--dry-run")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert cmd[4:8] == ["create", *LOCATION]
  assert "--accelerator-type=v4-8" in cmd and "--version=tpu-ubuntu2204-base" in cmd
  assert "--spot" not in cmd and "--preemptible" not in cmd


@pytest.mark.parametrize("flag", ["--spot", "--preemptible"])
def test_create_provisioning_model(flag):
  rc, lines, err = _run("create", flag, "--dry-run")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert cmd[-1] == flag


def test_create_spot_and_preemptible_are_exclusive():
  rc, _, err = _run("create", "--spot", "--preemptible", "--dry-run")
  assert rc != 0 and "not allowed with" in err


@pytest.mark.parametrize("acc,version", [("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                         ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
                                         ("v4-32", "tpu-ubuntu2204-base")])
def test_runtime_version_follows_type(acc, version):
  rc, lines, err = _run("create", f"--type={acc}", "--dry-run")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert _flag(cmd, "--accelerator-type") == acc and _flag(cmd, "--version") == version


def test_flags_override_env_and_version_override():
  rc, lines, err = _run("create", "--project=other", "--name=n2", "--version=custom-rt",
                        "--data_disk=projects/p/zones/z/disks/d", "--dry-run")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert cmd[5] == "n2" and _flag(cmd, "--project") == "other"
  assert _flag(cmd, "--version") == "custom-rt"
  assert _flag(cmd, "--data-disk") == "source=projects/p/zones/z/disks/d,mode=read-write"


def test_delete_and_status_dry_run():
  rc, lines, err = _run("delete", "--dry-run")
  assert rc == 0, err
  assert _commands(lines) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", *LOCATION,
                               "--quiet"]]
  rc, lines, err = _run("status", "--dry-run")
  assert rc == 0, err
  assert _commands(lines) == [["gcloud", "compute", "tpus", "tpu-vm", "describe", *LOCATION,
                               "--format=value(state)"]]


def test_install_on_all_workers():
  rc, lines, err = _run("install", "--branch=dev", "--dry-run")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert cmd[4:8] == ["ssh", *LOCATION] and "--worker=all" in cmd
  script = _flag(cmd, "--command")
  assert "git clone -q --branch dev https://example.com/starjax.git starjax" in script
  assert "fetch -q origin dev" in script  # An existing checkout is updated instead.
  assert "pip install" in script and "-e '.[tpu]'" in script
  assert "touch .venv/.installed-stamp" in script
  assert "gcsfuse" not in script


def test_install_mount_bucket():
  rc, lines, err = _run("install", "--mount_bucket", "--dry-run")
  assert rc == 0, err
  script = _flag(_commands(lines)[0], "--command")
  assert "gcsfuse --implicit-dirs" in script and "my-bucket /gcs/my-bucket" in script


def test_run_on_all_workers_under_nohup():
  rc, lines, err = _run("run", "--env", "STARJAX_DATA_DIR=/gcs/b/data", "--dry-run", "--",
                        "python", "-m", "starjax.star", "--config=experiments/star_gsm8k.py",
                        "--workdir=/gcs/my-bucket/runs/gsm8k")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert cmd[4:8] == ["ssh", *LOCATION] and "--worker=all" in cmd
  script = _flag(cmd, "--command")
  assert "nohup" in script and "~/starjax-logs/job.log" in script
  assert "export STARJAX_DISTRIBUTED=1" in script
  assert "export STARJAX_DATA_DIR=/gcs/b/data" in script
  assert ("python -m starjax.star --config=experiments/star_gsm8k.py "
          "--workdir=/gcs/my-bucket/runs/gsm8k") in script


def test_run_single_string_command_and_no_distributed():
  rc, lines, err = _run("run", "--no_distributed", "--job=gsm8k", "--dry-run", "--",
                        "make star-gsm8k WORKDIR=/gcs/b/r ARGS='--config.star.iterations=2'")
  assert rc == 0, err
  script = _flag(_commands(lines)[0], "--command")
  assert "STARJAX_DISTRIBUTED" not in script and "~/starjax-logs/gsm8k.log" in script
  words = shlex.split(script)
  body = words[words.index("bash") + 2]  # The job: setsid nohup bash -c BODY.
  assert "( make star-gsm8k WORKDIR=/gcs/b/r ARGS='--config.star.iterations=2' )" in body


def test_run_without_command_is_an_error():
  rc, _, err = _run("run", "--dry-run")
  assert rc == 2 and "no command given" in err


def test_logs_and_stop():
  rc, lines, err = _run("logs", "--dry-run")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert "--worker=0" in cmd and _flag(cmd, "--command") == "tail -n 100 -F ~/starjax-logs/job.log"
  rc, lines, err = _run("logs", "--worker=all", "--no_follow", "--lines=5", "--dry-run")
  [cmd] = _commands(lines)
  assert "--worker=all" in cmd and _flag(cmd, "--command") == "tail -n 5 ~/starjax-logs/job.log"
  rc, lines, err = _run("stop", "--dry-run")
  assert rc == 0, err
  [cmd] = _commands(lines)
  assert "--worker=all" in cmd and "kill -TERM --" in _flag(cmd, "--command")


# ---------------------------------------------------------------------------------------------
# Missing settings.


@pytest.mark.parametrize("sub,var,flag", [
    ("create", "STARJAX_TPU_PROJECT", "--project"),
    ("create", "STARJAX_TPU_ZONE", "--zone"),
    ("create", "STARJAX_TPU_NAME", "--name"),
    ("create", "STARJAX_TPU_TYPE", "--type"),
    ("delete", "STARJAX_TPU_ZONE", "--zone"),
    ("install", "STARJAX_REPO_URL", "--repo"),
    ("logs", "STARJAX_TPU_NAME", "--name"),
])
def test_missing_setting_names_it(sub, var, flag):
  rc, lines, err = _run(sub, "--dry-run", drop=[var])
  assert rc == 2, (lines, err)
  assert var in err and flag in err
  assert not _commands(lines)  # Nothing was printed, let alone run.


def test_missing_bucket_for_mount():
  rc, _, err = _run("install", "--mount_bucket", "--dry-run", drop=["STARJAX_BUCKET"])
  assert rc == 2 and "STARJAX_BUCKET" in err


def test_watch_checks_settings_before_doing_anything():
  rc, lines, err = _run("watch", "--dry-run", "--", "echo", drop=["STARJAX_REPO_URL"])
  assert rc == 2 and "STARJAX_REPO_URL" in err and not _commands(lines)


# ---------------------------------------------------------------------------------------------
# The relaunch loop.


def _watch(states, rcs=None, *extra):
  env = dict(ENV, STARJAX_TPU_FAKE_STATES=",".join(states))
  if rcs is not None:
    env["STARJAX_TPU_FAKE_RCS"] = ",".join(rcs)
  rc, lines, err = _run("watch", "--spot", "--dry-run", *extra, "--",
                        "python -m starjax.star --config=experiments/star_gsm8k.py "
                        "--workdir=/gcs/my-bucket/r", env=env)
  steps = []
  for cmd in _commands(lines):
    verb = _verb(cmd)
    if verb == "ssh":
      script = _flag(cmd, "--command")
      verb = ("install" if "git clone" in script else "run" if "nohup" in script
              else "job_status" if "echo running" in script else "ssh?")
    steps.append(verb)
  return rc, steps, lines, err


def test_watch_relaunches_after_preemption():
  rc, steps, lines, err = _watch(["READY", "PREEMPTED", "READY"])
  assert rc == 0, err
  assert steps == ["describe", "install", "run",
                   "describe", "delete", "create", "install", "run",
                   "describe", "job_status", "describe"]
  assert any("relaunch 1" in line for line in lines)
  # The same command, on --worker=all, both times; the recreated slice is spot again.
  cmds = _commands(lines)
  runs = [c for c in cmds if _verb(c) == "ssh" and "nohup" in _flag(c, "--command")]
  assert len(runs) == 2 and runs[0] == runs[1] and "--worker=all" in runs[0]
  assert "--spot" in next(c for c in cmds if _verb(c) == "create")


def test_watch_creates_a_missing_slice_without_deleting():
  rc, steps, _, err = _watch(["NOT_FOUND", "CREATING", "READY"])
  assert rc == 0, err
  assert steps == ["describe", "create", "install", "run", "describe", "describe", "job_status",
                   "describe"]


def test_watch_stops_when_the_job_succeeds():
  rc, steps, lines, err = _watch(["READY"] * 5, ["running", "0", "0"])
  assert rc == 0, err
  assert steps[-2:] == ["describe", "job_status"]  # The second "0" confirmed it: no more polls.
  assert steps.count("run") == 1 and "job finished with exit status 0" in lines[-1]


def test_watch_reports_a_failed_job():
  rc, steps, _, _ = _watch(["READY"] * 5, ["1", "1"])
  assert rc == 1 and steps.count("run") == 1
  rc, steps, _, _ = _watch(["READY"] * 4, ["1", "1"], "--rerun_on_failure")
  assert rc == 0 and steps.count("run") == 2


def test_watch_does_not_trust_an_exit_seen_just_before_preemption():
  rc, steps, _, err = _watch(["READY", "READY", "PREEMPTED", "READY"], ["143"])
  assert rc == 0, err
  assert steps.count("create") == 1 and steps.count("run") == 2


def test_watch_gives_up_after_max_restarts():
  rc, steps, lines, _ = _watch(["READY", "PREEMPTED", "PREEMPTED"], None, "--max_restarts=1")
  assert rc == 1 and steps.count("create") == 1
  assert "giving up" in lines[-1]


def test_injected_state_provider():
  """main() takes a Runner: a fake one drives the loop without the environment variables."""
  import contextlib
  import io

  calls = []

  class Fake(tpu.Runner):
    def call(self, cmd, check=True):
      calls.append(cmd[4])
      return 0

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = tpu.main(["watch", *[f"--{k}={v}" for k, v in
                              (("project", "p"), ("zone", "z"), ("name", "n"), ("type", "v4-8"),
                               ("repo", "r"))], "--", "true"],
                  runner=Fake(True, states=["PREEMPTED", "READY"]))
  assert rc == 0 and calls == ["delete", "create", "ssh", "ssh"]


# ---------------------------------------------------------------------------------------------
# The remote scripts, run locally.


def _args(**kw):
  base = dict(job="job", env=None, no_distributed=False, foreground=False)
  base.update(kw)
  return type("Args", (), base)()


def _bash(script, home):
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}
  return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                        timeout=30, check=False)


def _wait_for(path, timeout=20.0):
  end = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < end, f"{path} never appeared"
    time.sleep(0.05)
  time.sleep(0.05)
  return path.read_text()


@pytest.fixture
def home(tmp_path):
  venv = tmp_path / "starjax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "activate").write_text("export ACTIVATED=yes\n")
  return tmp_path


def test_remote_run_script_logs_and_records_exit_status(home):
  script = tpu.run_script(_args(env=["FOO=bar baz"]),
                          "echo dir=$(basename $PWD) $ACTIVATED $STARJAX_DISTRIBUTED \"$FOO\"; "
                          "exit 3")
  p = _bash(script, home)
  assert p.returncode == 0 and "started starjax job 'job'" in p.stdout, p.stderr
  assert _wait_for(home / "starjax-logs" / "job.rc").strip() == "3"
  assert (home / "starjax-logs" / "job.log").read_text() == "dir=starjax yes 1 bar baz\n"
  assert _bash(tpu.job_status_script("job"), home).stdout.strip() == "3"


def test_remote_run_is_idempotent_and_stop_signals_the_group(home):
  script = tpu.run_script(_args(job="long"), "sleep 30")
  assert "started" in _bash(script, home).stdout
  pid = int(_wait_for(home / "starjax-logs" / "long.pid"))
  try:
    assert _bash(tpu.job_status_script("long"), home).stdout.strip() == "running"
    assert "already running" in _bash(script, home).stdout
    p = _bash(tpu.stop_script("long", "TERM"), home)
    assert "sent SIGTERM" in p.stdout, p.stderr
    end = time.monotonic() + 10
    while _bash(tpu.job_status_script("long"), home).stdout.strip() == "running":
      assert time.monotonic() < end, "the job survived SIGTERM"
      time.sleep(0.05)
  finally:  # The job's own process group (setsid): never left running.
    subprocess.run(["kill", "-KILL", "--", f"-{pid}"], capture_output=True, check=False)


def test_remote_scripts_parse(monkeypatch):
  for k, v in ENV.items():
    monkeypatch.setenv(k, v)
  ns = type("NS", (), dict(project=None, zone=None, name=None, type=None, version=None,
                           repo=None, branch=None, bucket=None, extras="tpu",
                           python_version="3.11", mount_bucket=True))()
  for script in (tpu.install_script(ns), tpu.run_script(_args(), "make demo"),
                 tpu.run_script(_args(foreground=True), "make demo"),
                 tpu.job_status_script("job"), tpu.stop_script("job", "TERM"),
                 tpu.logs_script("job", 10, True)):
    p = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, check=False)
    assert p.returncode == 0, (script, p.stderr)
