"""Tests for starjax.train.metrics."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from starjax.train import metrics as metrics_lib


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _tb_scalars(logdir):
  """(tag, step, value) of every scalar in the TFRecord event files under ``logdir``."""
  out = []
  for path in sorted(glob.glob(str(logdir / "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4  # length, length crc, payload, payload crc.
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.append((value.tag, event.step, value.simple_value))
  return out


def test_write_appends_json_lines_and_tensorboard(tmp_path):
  workdir = tmp_path / "run"
  with metrics_lib.MetricsWriter(workdir) as writer:
    writer.write(1, {"loss": 2.5, "acc": np.float32(0.25), "tokens": 128})
    # Flushed per line: readable before close.
    assert metrics_lib.read_metrics(workdir / "metrics.jsonl") == [
        {"step": 1, "loss": 2.5, "acc": 0.25, "tokens": 128}
    ]
    writer.write(2, {"loss": jnp.asarray(1.5), "grad_norm": float("nan"), "x": np.inf})
    writer.write_text(2, "sample", "Q: 2+2? A: 4")
  assert _lines(workdir / "metrics.jsonl") == [
      {"step": 1, "loss": 2.5, "acc": 0.25, "tokens": 128},
      {"step": 2, "loss": 1.5, "grad_norm": None, "x": None},
  ]
  assert isinstance(_lines(workdir / "metrics.jsonl")[0]["tokens"], int)
  assert _lines(workdir / "samples.jsonl") == [
      {"step": 2, "tag": "sample", "text": "Q: 2+2? A: 4"}
  ]
  assert glob.glob(str(workdir / "tb" / "events.out.tfevents.*"))
  scalars = _tb_scalars(workdir / "tb")
  assert ("loss", 1, 2.5) in scalars and ("tokens", 1, 128.0) in scalars
  assert ("loss", 2, 1.5) in scalars

  # Re-opening appends rather than overwriting; read_metrics accepts the workdir too.
  with metrics_lib.MetricsWriter(workdir) as writer:
    writer.write(3, {"loss": 1.0})
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3]


def test_rejects_non_scalars(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="scalar"):
      writer.write(0, {"v": np.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(0, {"step": 1})


def test_disabled_writer_is_noop(tmp_path):
  workdir = tmp_path / "run"
  with metrics_lib.MetricsWriter(workdir, enabled=False) as writer:
    assert not writer.active
    writer.write(1, {"loss": 1.0})
    writer.write_text(1, "t", "x")
    writer.truncate_after(0)
  assert not workdir.exists()


def _write_steps(workdir, steps):
  with metrics_lib.MetricsWriter(workdir) as writer:
    for step in steps:
      writer.write(step, {"loss": float(step)})
      writer.write_text(step, "s", f"text {step}")


def test_truncate_after_keeps_steps_up_to_n(tmp_path):
  workdir = tmp_path / "run"
  _write_steps(workdir, range(1, 7))
  with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 7, "lo')  # Partial line from a crash.
  with metrics_lib.MetricsWriter(workdir) as writer:
    writer.truncate_after(3)
    writer.write(4, {"loss": 40.0})
  assert [(r["step"], r["loss"]) for r in _lines(workdir / "metrics.jsonl")] == [
      (1, 1.0),
      (2, 2.0),
      (3, 3.0),
      (4, 40.0),
  ]
  assert [r["step"] for r in _lines(workdir / "samples.jsonl")] == [1, 2, 3]
  assert not glob.glob(str(workdir / ".*tmp*"))


def test_truncate_after_is_atomic(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  _write_steps(workdir, range(1, 5))
  before = (workdir / "metrics.jsonl").read_bytes()

  def failing_replace(src, dst):
    raise OSError("disk full")

  writer = metrics_lib.MetricsWriter(workdir)
  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    writer.truncate_after(2)
  monkeypatch.undo()
  assert (workdir / "metrics.jsonl").read_bytes() == before
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl", "samples.jsonl", "tb"]
  writer.close()
