"""Meshes, the rules table, and equality of sharded and single-device computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from starjax import models, parallel
from starjax.train import optim
from starjax.train import state as state_lib
from starjax.train import step as step_lib

pytestmark = pytest.mark.needs_8_devices

MESHES = {
    "1x8": parallel.MeshConfig(data=1, fsdp=8),
    "2x4": parallel.MeshConfig(data=2, fsdp=4),
    "2x2x2": parallel.MeshConfig(data=2, fsdp=2, tensor=2),
    "tensor8": parallel.MeshConfig(data=1, fsdp=1, tensor=8),
}


def test_mesh_config_shapes_and_errors():
  assert parallel.MeshConfig().shape(8) == (8, 1, 1)
  assert parallel.MeshConfig(data=2, fsdp=-1).shape(8) == (2, 4, 1)
  with pytest.raises(ValueError, match="At most one"):
    parallel.MeshConfig(data=-1, fsdp=-1).shape(8)
  with pytest.raises(ValueError, match="cannot be split"):
    parallel.MeshConfig(data=-1, fsdp=3).shape(8)
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.MeshConfig(data=2, fsdp=3).shape(8)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_rules_resolution():
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
  spec = parallel.logical_to_spec
  assert spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert spec(("activation_batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
  # A batch of 2 cannot use data x fsdp = 4: only the first axis that divides is kept.
  assert spec(("activation_batch", None), (2, 3), mesh) == P("data", None)
  # Odd sizes fall back to replication rather than failing.
  assert spec(("embed", "vocab"), (63, 261), mesh) == P(None, None)
  # A mesh axis is never used twice in one spec.
  assert spec(("q_heads", "kv_heads"), (4, 4), mesh) == P("tensor", None)
  assert spec(None, (3,), mesh) == P()
  with pytest.raises(ValueError, match="logical names"):
    spec(("embed",), (3, 4), mesh)


def test_every_param_has_logical_names():
  cfg = models.preset("tiny", qkv_bias=True)
  names = state_lib.param_logical_names(cfg)
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes)
  assert len(flat_names) == len(flat_shapes)
  for n, s in zip(flat_names, flat_shapes):
    assert isinstance(n, tuple) and len(n) == len(s.shape) and n[0] == "layers" or len(
        s.shape) <= 2


def _batch(cfg, b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  mask = (rng.random((b, t)) > 0.3).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
          "segment_ids": np.ones((b, t), np.int32), "loss_mask": mask}


def _run(cfg, mesh_cfg, steps=3):
  devices = jax.devices() if mesh_cfg is not None else jax.devices()[:1]
  mesh = parallel.make_mesh(mesh_cfg or parallel.MeshConfig(data=1), devices=devices)
  tx = optim.make_optimizer(optim.OptimizerConfig(lr=1e-2, warmup_steps=1,
                                                  weight_decay=0.1), 10)
  state = state_lib.create_train_state(cfg, tx, mesh, jax.random.key(0))
  shardings = state_lib.state_shardings(cfg, tx, mesh)
  step = step_lib.jit_train_step(cfg, tx, mesh, shardings, 8)
  with parallel.use_mesh(mesh):
    logits = jax.jit(lambda p, t: models.forward(cfg, p, t).logits)(
        state.params, jnp.asarray(_batch(cfg)["inputs"]))
  losses = []
  for i in range(steps):
    state, m = step(state, step_lib.device_batch(_batch(cfg, seed=i), mesh))
    losses.append(float(m["loss"]))
  return state, np.asarray(logits), losses


@pytest.fixture(scope="module")
def single_device():
  cfg = models.preset("tiny", vocab_size=256)
  return cfg, _run(cfg, None)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_equals_single_device(single_device, mesh_name):
  cfg, (ref_state, ref_logits, ref_losses) = single_device
  state, logits, losses = _run(cfg, MESHES[mesh_name])
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  # The state really is distributed: some parameter is split across devices.
  leaves = jax.tree.leaves(state.params)
  assert any(len({str(s.index) for s in x.addressable_shards}) > 1 for x in leaves)
  # Optimizer moments follow their parameters' shardings.
  emb = state.params["embed"]["embedding"].sharding.spec
  mu = state.opt_state[1][0].mu["embed"]["embedding"].sharding.spec
  assert emb == mu


def test_params_created_sharded_without_replica():
  cfg = models.preset("tiny", vocab_size=256)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=8))
  tx = optim.make_optimizer(optim.OptimizerConfig(), 10)
  state = state_lib.create_train_state(cfg, tx, mesh, jax.random.key(0))
  emb = state.params["embed"]["embedding"]
  assert emb.sharding.spec == P(None, "fsdp")
  assert emb.addressable_shards[0].data.shape == (256, 8)


def test_initialize_is_a_noop_unless_asked(monkeypatch):
  monkeypatch.delenv("STARJAX_DISTRIBUTED", raising=False)
  assert parallel.initialize() is False
  assert parallel.initialize(False) is False
  assert not jax.distributed.is_initialized()
