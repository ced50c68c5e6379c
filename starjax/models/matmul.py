"""Matmuls that stay on XLA CPU's fast path, forward and backward (bf16 on AMX, and f32).

On CPU, XLA hands a bf16 x bf16 dot to YNNPACK (AMX / AVX512-BF16 kernels, f32 accumulation) only
when both operands are row-major with the contraction on the lhs's last and the rhs's first
dimension, and the output is f32. Any other dot, including the transposed ones that autodiff
produces for the backward pass (g @ W^T and X^T @ g) and a tied LM head (h @ E^T), is silently
upcast to f32 and runs 4-6x slower. Measured on a 2-core Intel Xeon (AMX), 4096 x 576 x 1536:
canonical bf16 1,242 GFLOP/s, transposed bf16 222-236, f32 255-289.

`matmul` keeps every dot canonical: the forward accumulates in f32, and its custom backward
materialises the transposed operand first. A transpose alone does not do it: XLA folds it back
into the dot, or gives it a column-major layout that YNNPACK rejects. Flattening it to 1-D behind
an optimization barrier forces a row-major copy (cheap next to the dot).

In f32 the same backward pays too: XLA CPU otherwise fuses an activation's transpose into the
elementwise op that produces it, which ran 20-50x slower than a plain copy.

`dot_general` wraps `matmul` in `lax.dot_general`'s signature for flax's `Dense`/`DenseGeneral`;
the decoder uses it for f32 and bf16 compute on the CPU backend only. `use_fast_bf16(dtype)` says
when the model runs bf16 products with f32 activations (bf16 compute on CPU; see
`starjax.models.llama.activation_dtype`). On GPU and TPU the compilers already pick good layouts,
and the flatten would get in the way of sharding.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


_CPU_KERNELS = [True]


def set_cpu_kernels(enabled: bool) -> None:
  """Turns the CPU-only code paths (this module's products in the decoder, the recompute
  attention) on or off for later traces. Off, a CPU trace is the program accelerators run:
  `starjax.tools.compile_check` uses that to estimate TPU memory on fake CPU devices."""
  _CPU_KERNELS[0] = bool(enabled)


def cpu_kernels() -> bool:
  """Whether traces take the CPU-only code paths: on the CPU backend, unless turned off."""
  return _CPU_KERNELS[0] and jax.default_backend() == "cpu"


def use_fast_bf16(dtype: Any) -> bool:
  """Whether matmuls in `dtype` should go through `matmul` (bf16 compute on CPU)."""
  return jnp.dtype(dtype) == jnp.bfloat16 and cpu_kernels()


def transpose_2d(x: Array) -> Array:
  """x with its last two axes swapped, as a row-major array that XLA cannot fold back into a dot
  (see module docstring). Any rank >= 2: batched products use it too."""
  shape = (*x.shape[:-2], x.shape[-1], x.shape[-2])
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2).reshape(-1)).reshape(shape)


def bf16_dot_ok(m: int, k: int, n: int) -> bool:
  """Whether XLA CPU takes an (m, k) x (k, n) bf16 dot to YNNPACK. It leaves vector products and
  tiny ones to its own dot, which cannot multiply bf16 into f32 (UNIMPLEMENTED), so those are
  computed in f32 instead."""
  return m > 1 and n > 1 and max(m, k, n) >= 8


def dot(a: Array, b: Array) -> Array:
  """a (..., M, K) @ b (..., K, N), accumulated in f32 (bf16 operands only where supported)."""
  if a.dtype == jnp.bfloat16 and not bf16_dot_ok(a.shape[-2], a.shape[-1], b.shape[-1]):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(a: Array, b: Array, operand_dtype: Any = jnp.bfloat16) -> Array:
  """a (M, K) @ b (K, N) on `operand_dtype` operands with f32 accumulation, in a's dtype.

  The operands are cast here, so callers can keep f32 activations and parameters (XLA CPU
  computes bf16 elementwise ops by converting to f32 and back, so bf16 outside the matmuls only
  adds converts). Only the casts are kept for the backward pass, which computes g @ b^T and
  a^T @ g as canonical dots on materialised transposes; the cotangents come back in a's and b's
  dtypes. With f32 operands this still pays: XLA CPU otherwise fuses the transpose of an
  activation into the elementwise op that produces it, which ran 20-50x slower than the copy.
  """
  return _matmul_fwd(a, b, operand_dtype)[0]


def _operand_dtype(a: Array, b: Array, operand_dtype: Any) -> Any:
  """bf16 only where XLA CPU runs the product on bf16 (else a's dtype: no pointless rounding)."""
  if jnp.dtype(operand_dtype) == jnp.bfloat16 and not bf16_dot_ok(*a.shape, b.shape[1]):
    return a.dtype
  return operand_dtype


def pack_residual(x: Array) -> Array:
  """A custom VJP's bf16 residual as uint16 bits (`unpack_residual` undoes it).

  Residuals saved inside a layer scan are stacked across the layers by dynamic-update-slice, and
  XLA CPU computes a bf16 dynamic-update-slice in f32: it converts and rewrites the whole
  (n_layers, ...) stack at every layer. On integer bits the update is in place. SmolLM2-135M bf16
  step at 1024 tokens: these rewrites took 0.9-1.2 s of a ~6 s step (2-core EPYC, 2026-12-04).
  """
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def unpack_residual(x: Array) -> Array:
  """The bf16 array behind `pack_residual`'s bits (other dtypes pass through)."""
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _matmul_fwd(a: Array, b: Array, operand_dtype: Any) -> tuple[Array, tuple[Array, ...]]:
  op = _operand_dtype(a, b, operand_dtype)
  a_c, b_c = a.astype(op), b.astype(op)
  # Empty arrays carry the operands' dtypes to the backward pass (residuals must be arrays).
  dtypes = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))
  return dot(a_c, b_c).astype(a.dtype), (pack_residual(a_c), pack_residual(b_c), *dtypes)


def _matmul_bwd(operand_dtype: Any, res: tuple[Array, ...], g: Array) -> tuple[Array, Array]:
  del operand_dtype  # The forward's choice is in the residuals' dtype.
  a_c, b_c, a_dtype, b_dtype = res
  a_c, b_c = unpack_residual(a_c), unpack_residual(b_c)
  g = g.astype(a_c.dtype)
  da = dot(g, transpose_2d(b_c)).astype(a_dtype.dtype)
  db = dot(transpose_2d(a_c), g).astype(b_dtype.dtype)
  return da, db


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, *,
                operand_dtype: Any = jnp.bfloat16) -> Array:
  """`lax.dot_general` that computes a dense layer's contraction with `matmul`.

  Handles the shape flax's Dense and DenseGeneral produce: the lhs's trailing dimensions
  contracted with the rhs's leading ones, no batch dimensions. Anything else goes to
  `lax.dot_general` unchanged. The result has the lhs's dtype (`preferred_element_type` aside).
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  dense_shaped = (not lhs_batch and not rhs_batch and n == len(rhs_contract)
                  and tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
                  and tuple(rhs_contract) == tuple(range(n)))
  if not dense_shaped:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  batch_shape, out_shape = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
  k = math.prod(lhs.shape[lhs.ndim - n:])
  out = matmul(lhs.reshape(math.prod(batch_shape), k), rhs.reshape(k, math.prod(out_shape)),
               operand_dtype)
  return out.reshape(*batch_shape, *out_shape).astype(preferred_element_type or lhs.dtype)
