"""bf16 matmuls on XLA CPU's fast path: values and gradients against float64, and the compiled
HLO really does run every product on bf16 operands."""

import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from starjax import models
from starjax.models import llama
from starjax.models import matmul as mm


def _bf16_f64(x):
  """The float64 value of x rounded to bf16 (what the fast path multiplies)."""
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_matmul_and_its_gradients_match_float64():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
  out, vjp = jax.vjp(mm.matmul, a, b)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _bf16_f64(a) @ _bf16_f64(b), rtol=1e-5, atol=1e-5)
  da, db = vjp(g)
  assert da.dtype == db.dtype == jnp.float32
  g64 = _bf16_f64(g)
  np.testing.assert_allclose(np.asarray(da), g64 @ _bf16_f64(b).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(db), _bf16_f64(a).T @ g64, rtol=1e-5, atol=1e-5)


def test_transpose_2d_is_a_transpose():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(np.asarray(jax.jit(mm.transpose_2d)(x)), np.asarray(x).T)


@pytest.mark.parametrize("features,axis", [((3, 5), -1), (7, (-2, -1)), (6, -1)])
def test_dot_general_in_dense_layers(features, axis):
  """DenseGeneral with a multi-axis kernel and Dense give bf16-rounded float64 products."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 4, 3, 8) if axis == (-2, -1) else (2, 4, 8)), jnp.float32)
  layer = nn.DenseGeneral(features, axis=axis, use_bias=False, dot_general=mm.dot_general)
  params = layer.init(jax.random.key(0), x)
  out = layer.apply(params, x)
  kernel = _bf16_f64(params["params"]["kernel"])
  n = 2 if axis == (-2, -1) else 1
  ref = np.tensordot(_bf16_f64(x), kernel, axes=n)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_dot_general_leaves_other_contractions_to_xla():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)
  dims = (((2,), (1,)), ((0,), (0,)))  # Batched: not a dense layer's shape.
  np.testing.assert_array_equal(np.asarray(mm.dot_general(a, b, dims)),
                                np.asarray(jax.lax.dot_general(a, b, dims)))


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
  """Element types of both operands of every dot in compiled HLO text."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  return [(types[x], types[y]) for x, y in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fast path is CPU-only")
def test_forward_and_backward_dots_all_run_on_bf16_operands():
  """Without the materialised transposes, XLA upcasts the backward dots to f32 (4-6x slower)."""
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 48), jnp.float32)
  grad = jax.jit(jax.grad(lambda a, b: (mm.matmul(a, b) ** 2).sum(), (0, 1)))
  dots = _dot_operand_types(grad.lower(a, b).compile().as_text())
  assert len(dots) == 3, dots
  assert all(t == ("bf16", "bf16") for t in dots), dots
  naive = jax.jit(jax.grad(lambda a, b: (jnp.dot(
      a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
      preferred_element_type=jnp.float32) ** 2).sum(), (0, 1)))
  naive_dots = _dot_operand_types(naive.lower(a, b).compile().as_text())
  assert any(t != ("bf16", "bf16") for t in naive_dots), "XLA no longer upcasts: drop the trick?"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fast path is CPU-only")
def test_bf16_model_uses_the_fast_path_and_tracks_f32():
  """A bf16 model on CPU: f32 activations, bf16 products; loss and gradients close to f32."""
  cfg = models.preset("tiny", dtype="bfloat16")
  assert llama.activation_dtype(cfg) == jnp.float32
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)

  def loss(cfg, params):
    logits = models.forward(cfg, params, tokens).logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], -1))

  l16, g16 = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
  l32, g32 = jax.jit(jax.value_and_grad(lambda p: loss(cfg.replace(dtype="float32"), p)))(params)
  np.testing.assert_allclose(float(l16), float(l32), rtol=1e-2)
  for x, y in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == np.float32
    cos = (x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30)
    assert cos > 0.99, cos
  hlo = jax.jit(jax.grad(lambda p: loss(cfg, p))).lower(params).compile().as_text()
  dots = _dot_operand_types(hlo)
  assert dots and all(t == ("bf16", "bf16") for t in dots), [t for t in dots if "f32" in t]


def test_cpu_kernels_can_be_turned_off_for_accelerator_traces():
  """compile_check turns them off so fake CPU devices compile what a TPU would run."""
  cfg = models.preset("tiny", dtype="bfloat16")
  try:
    mm.set_cpu_kernels(False)
    assert not mm.cpu_kernels() and not mm.use_fast_bf16(jnp.bfloat16)
    assert llama.activation_dtype(cfg) == jnp.bfloat16
    params = models.init_params(cfg, jax.random.key(0))
    out = models.forward(cfg, params, jnp.zeros((1, 4), jnp.int32))
    assert out.logits.dtype == jnp.bfloat16
  finally:
    mm.set_cpu_kernels(True)
  assert mm.cpu_kernels() == (jax.default_backend() == "cpu")


def _scan_outputs(jaxpr):
  """(dtype, shape) of every output of every scan in `jaxpr`, nested jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      out += [(v.aval.dtype, v.aval.shape) for v in eqn.outvars]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _scan_outputs(sub)
  return out


def test_bf16_residuals_are_stacked_across_layers_as_integer_bits():
  """XLA CPU rewrites a whole bf16 stack at every dynamic-update-slice, so the layer scan must
  stack the bf16 residuals of the products and of attention as uint16 bits."""
  cfg = models.preset("tiny", dtype="bfloat16").replace(n_layers=3)
  params = llama.init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((2, 16), jnp.int32)

  def loss(p):
    return jnp.sum(llama.forward(cfg, p, tokens).logits.astype(jnp.float32))

  stacked = [(dt, shape) for dt, shape in _scan_outputs(jax.make_jaxpr(jax.grad(loss))(
      params).jaxpr) if shape and shape[0] == cfg.n_layers]
  assert any(dt == jnp.uint16 for dt, _ in stacked)
  assert not [s for s in stacked if s[0] == jnp.bfloat16]
