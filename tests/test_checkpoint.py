"""Tests for starjax.train.checkpoint on 8 fake CPU devices."""

import glob
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from starjax.train import checkpoint as ckpt_lib


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices"
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(mesh, seed=0):
  """A train-state-like tree: int step, sharded params, replicated optimizer moments."""
  rng = np.random.default_rng(seed)
  sharded = NamedSharding(mesh, P("data", "fsdp"))
  replicated = NamedSharding(mesh, P())
  w = rng.standard_normal((4, 8), dtype=np.float32)
  return {
      "step": jnp.asarray(7 + seed, jnp.int32),
      "params": {
          "dense": {
              "kernel": jax.device_put(w, sharded),
              "bias": jax.device_put(rng.standard_normal(8, dtype=np.float32), replicated),
          },
      },
      "opt_state": {
          "count": jnp.asarray(3, jnp.int32),
          "mu": {"kernel": jax.device_put(w * 0.5, NamedSharding(mesh, P(None, "fsdp")))},
      },
  }


def _ckpt_dir(tmp_path):
  return tmp_path / "workdir" / "checkpoints"


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_one(directory, state, step=10, meta=None, **kwargs):
  with ckpt_lib.Checkpointer(directory, save_every=1, **kwargs) as ckpt:
    assert ckpt.save(step, state, meta)


def test_round_trip_restores_exact_values_onto_requested_shardings(tmp_path, mesh):
  state = _state(mesh)
  _save_one(_ckpt_dir(tmp_path), state, meta={"config": {"lr": 1e-3}, "data_pos": 123})

  # Fresh Checkpointer, as after a restart; target shardings differ from the saved ones.
  specs = {0: P(), 1: P("fsdp"), 2: P("fsdp", "data")}
  targets = jax.tree.map(lambda x: NamedSharding(mesh, specs[x.ndim]), state)
  abstract = ckpt_lib.abstract_like(state, targets)
  with ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), save_every=1) as ckpt:
    assert ckpt.latest_step() == 10
    restored, meta = ckpt.restore(abstract)
  _assert_tree_equal(restored, state)
  for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(targets), strict=True):
    assert leaf.sharding == target, leaf.sharding
  kernel = restored["params"]["dense"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "data")
  assert kernel.addressable_shards[0].data.shape == (1, 4)
  assert meta == {"config": {"lr": 1e-3}, "data_pos": 123}

  # Same checkpoint onto the original shardings, then onto plain replication.
  with ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), save_every=1) as ckpt:
    same, _ = ckpt.restore(ckpt_lib.abstract_like(state))
    replicated = NamedSharding(mesh, P())
    rep, _ = ckpt.restore(ckpt_lib.abstract_like(state, replicated), step=10)
  _assert_tree_equal(same, state)
  for got, want in zip(jax.tree.leaves(same), jax.tree.leaves(state), strict=True):
    assert got.sharding == want.sharding
  _assert_tree_equal(rep, state)
  for leaf in jax.tree.leaves(rep):
    assert leaf.sharding == replicated
    assert leaf.sharding.is_fully_replicated


def test_keep_last_k(tmp_path, mesh):
  state = _state(mesh)
  with ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), save_every=1, keep=2) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.latest_step() == 5
    assert ckpt.all_steps() == [4, 5]
  assert sorted(p for p in os.listdir(_ckpt_dir(tmp_path)) if p.isdigit()) == ["4", "5"]
  with ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), save_every=1, keep=2) as ckpt:
    assert ckpt.latest_step() == 5


def test_save_every_and_force(tmp_path, mesh):
  state = _state(mesh)
  with ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), save_every=2) as ckpt:
    assert ckpt.latest_step() is None
    assert not ckpt.save(3, state)
    ckpt.wait()
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, force=True)
    assert ckpt.save(4, state)
    # A forced save of a step that already exists is a no-op, not an error.
    assert not ckpt.save(4, state, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]


def test_meta_round_trip_and_step_selection(tmp_path, mesh):
  state = _state(mesh)
  with ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), save_every=1, async_save=False) as ckpt:
    ckpt.save(1, state, {"data": {"epoch": 0, "index": 17}, "name": "run", "ids": [1, 2]})
    ckpt.save(2, _state(mesh, seed=1))
    abstract = ckpt_lib.abstract_like(state)
    old, meta1 = ckpt.restore(abstract, step=1)
    new, meta2 = ckpt.restore(abstract)
    with pytest.raises(FileNotFoundError, match="available steps"):
      ckpt.restore(abstract, step=99)
  assert meta1 == {"data": {"epoch": 0, "index": 17}, "name": "run", "ids": [1, 2]}
  assert meta2 == {}
  _assert_tree_equal(old, state)
  _assert_tree_equal(new, _state(mesh, seed=1))


def test_no_checkpoint_raises_file_not_found(tmp_path, mesh):
  with ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), save_every=1) as ckpt:
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
      ckpt.restore(ckpt_lib.abstract_like(_state(mesh)))


# A failed restore can leave an Orbax/TensorStore callback aimed at a closed asyncio loop; it is
# reported as an unraisable exception at GC time and is harmless.
_IGNORE_CLOSED_LOOP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _snapshot(root):
  return sorted(
      (os.path.relpath(p, root), os.path.getsize(p))
      for p in glob.glob(os.path.join(root, "**"), recursive=True)
      if os.path.isfile(p)
  )


@_IGNORE_CLOSED_LOOP
def test_corrupt_latest_step_raises_and_deletes_nothing(tmp_path, mesh):
  directory = _ckpt_dir(tmp_path)
  state = _state(mesh)
  with ckpt_lib.Checkpointer(directory, save_every=1, keep=3) as ckpt:
    ckpt.save(1, state, {"k": 1})
    ckpt.save(2, state, {"k": 2})
  data_files = glob.glob(str(directory / "2" / "state" / "d" / "*"))
  assert data_files, sorted(glob.glob(str(directory / "2" / "**"), recursive=True))
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  before = _snapshot(directory)

  abstract = ckpt_lib.abstract_like(state)
  with ckpt_lib.Checkpointer(directory, save_every=1, keep=3) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError) as info:
      ckpt.restore(abstract)
    # The earlier step is still usable, as the message suggests.
    restored, meta = ckpt.restore(abstract, step=1)
  message = str(info.value)
  assert str(directory) in message
  assert "step 2" in message and "step=N" in message and "[1]" in message
  assert info.value.step == 2 and info.value.directory == str(directory)
  assert isinstance(info.value, RuntimeError)
  assert _snapshot(directory) == before
  _assert_tree_equal(restored, state)
  assert meta == {"k": 1}


@_IGNORE_CLOSED_LOOP
def test_deleted_item_and_stray_files(tmp_path, mesh):
  directory = _ckpt_dir(tmp_path)
  state = _state(mesh)
  _save_one(directory, state, step=3, meta={"k": 3})
  # Stray files/folders that are not checkpoints must be ignored, and never removed.
  (directory / "notes.txt").write_text("hello")
  (directory / "7.bak").mkdir()
  (directory / "5").write_text("not a directory")
  with ckpt_lib.Checkpointer(directory, save_every=1) as ckpt:
    assert ckpt.latest_step() == 3
    restored, meta = ckpt.restore(ckpt_lib.abstract_like(state))
  _assert_tree_equal(restored, state)
  assert meta == {"k": 3}

  os.remove(directory / "3" / "meta" / "metadata")
  with ckpt_lib.Checkpointer(directory, save_every=1) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError, match="step 3"):
      ckpt.restore(ckpt_lib.abstract_like(state))
  assert (directory / "notes.txt").read_text() == "hello"
  assert (directory / "7.bak").is_dir() and (directory / "5").is_file()
  assert (directory / "3" / "state").is_dir()


def test_existing_directory_is_not_cleared(tmp_path, mesh):
  directory = _ckpt_dir(tmp_path)
  directory.mkdir(parents=True)
  (directory / "keep_me.txt").write_text("x")
  (directory / "4.orbax-checkpoint-tmp-123").mkdir()
  with ckpt_lib.Checkpointer(directory, save_every=1):
    pass
  assert (directory / "keep_me.txt").exists()
  assert (directory / "4.orbax-checkpoint-tmp-123").exists()


def test_missing_parent_raises(tmp_path):
  missing = tmp_path / "no_such_parent" / "workdir" / "checkpoints"
  with pytest.raises(FileNotFoundError, match="no_such_parent"):
    ckpt_lib.Checkpointer(missing, save_every=1)
  assert not (tmp_path / "no_such_parent").exists()
  # The workdir itself may be created.
  with ckpt_lib.Checkpointer(tmp_path / "new_workdir" / "checkpoints", save_every=1):
    pass
  assert (tmp_path / "new_workdir" / "checkpoints").is_dir()


def test_preemption_flag_sigterm(mesh):
  previous = signal.getsignal(signal.SIGTERM)
  flag = ckpt_lib.install_sigterm_handler()
  try:
    assert flag.installed and not flag.requested and not flag.should_stop(0)
    assert signal.getsignal(signal.SIGTERM) is not previous
    os.kill(os.getpid(), signal.SIGTERM)  # Would terminate pytest without the handler.
    assert flag.requested
    assert flag.signal_received == signal.SIGTERM
    assert flag.should_stop(1)
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) is previous
  assert not flag.installed


def test_preemption_flag_sigint_context_manager():
  prev_int = signal.getsignal(signal.SIGINT)
  prev_term = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.PreemptionFlag(sigint=True) as flag:
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.requested and flag.signal_received == signal.SIGINT
    # A second Ctrl-C falls through to the previous handler (KeyboardInterrupt by default).
    if prev_int is signal.default_int_handler:
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is prev_int
  assert signal.getsignal(signal.SIGTERM) is prev_term


def test_reached_preemption_sync_point_is_safe_single_process():
  assert ckpt_lib.reached_preemption_sync_point(0) is False
