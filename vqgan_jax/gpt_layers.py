"""The GPT's feed-forward layers and norms: `MLP`, `SwiGLU`, `make_norm`.

`MLP` is the reference minGPT's (Linear(d, 4d) -> exact GELU ->
Linear(4d, d)); `SwiGLU` is the gated, bias-free MLP of Llama-style blocks.
`gelu_exact` and the lean norms compute the same values as `jax.nn.gelu`
and flax's norms, with backward passes that keep fewer tensors.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any

# The reference's weight initialisation of every Linear and Embedding.
INIT = nn.initializers.normal(stddev=0.02)
_LN_EPS = 1e-5
# The norms `make_norm` builds (the GPT's `norm` option).
NORMS = ("layernorm", "rmsnorm")


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu_exact(x: Array) -> Array:
  """The exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`, with a lean
  derivative.

  The values are `jax.nn.gelu`'s, bit for bit. Differentiating that
  function by autodiff keeps three tensors of the MLP's 4d-wide activations
  for the backward pass (`0.5 x`, `erfc(-x/sqrt 2)` and `exp(-x^2/2)`) and
  computes them in the activations' dtype, constants included (in
  bfloat16, 1/sqrt 2 becomes 0.707 and 2/sqrt pi 1.125). Here the
  derivative `Phi(x) + x phi(x)` is recomputed in the backward pass from
  `x` alone, in float32: one saved tensor instead of three, less memory
  traffic in the element-wise kernels around it, and a bfloat16 gradient
  nearer the float32 one (BENCHMARKS.md, "Lean backward passes", has the
  measured effect on the training step's memory). Forward-mode autodiff
  works (it is a `custom_jvp`).
  """
  return jax.nn.gelu(x, approximate=False)


# Rematerialised (inputs saved, nothing else): reverse mode keeps `x` and
# recomputes the derivative in the backward pass. prevent_cse keeps XLA from
# reusing the forward's erfc there, which would keep it alive instead.
@functools.partial(jax.checkpoint,
                   policy=jax.checkpoint_policies.nothing_saveable)
def _gelu_exact_tangent(x: Array, t: Array) -> Array:
  xf = x.astype(jnp.float32)
  slope = (0.5 * jax.lax.erfc(-xf * _SQRT_HALF)
           + xf * jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI)
  return (t.astype(jnp.float32) * slope).astype(t.dtype)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return gelu_exact(x), _gelu_exact_tangent(x, t)


class MLP(nn.Module):
  """Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout.

  The reference's GELU is the exact one (erf; `gelu_exact`, whose backward
  pass keeps one tensor instead of three); `approximate=True` uses the tanh
  form of GPT-2 (same parameters, outputs within ~1e-3).
  """
  n_embd: int
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  deterministic: bool = True
  approximate: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=INIT,
                              bias_init=nn.initializers.zeros)
    x = dense(4 * self.n_embd, name="fc1")(x)
    x = (nn.gelu(x, approximate=True) if self.approximate
         else gelu_exact(x))
    x = dense(self.n_embd, name="fc2")(x)
    return nn.Dropout(self.resid_pdrop)(x, deterministic=self.deterministic)


def swiglu_hidden(n_embd: int) -> int:
  """SwiGLU width: 8/3 * n_embd rounded up to a multiple of 8, so that its
  three matrices hold about as many weights as the GELU MLP's two."""
  return -(-8 * n_embd // 24) * 8


class SwiGLU(nn.Module):
  """Gated MLP without biases: down(silu(gate(x)) * up(x)) -> dropout."""
  n_embd: int
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=INIT)
    hidden = swiglu_hidden(self.n_embd)
    y = nn.silu(dense(hidden, name="gate")(x)) * dense(hidden, name="up")(x)
    y = dense(self.n_embd, name="down")(y)
    return nn.Dropout(self.resid_pdrop)(y, deterministic=self.deterministic)


# Lean norms: the backward pass keeps a norm's input (in the compute dtype)
# and recomputes its float32 statistics, where autodiff of flax's norms keeps
# three float32 tensors of the residual stream's size per norm. Values and
# gradients are flax's. Not used inside a rematerialised block
# (`Block.lean_norms`): there the remat policy decides what is kept, and in
# unrolled layers the nested checkpoint let XLA merge the block's
# recomputation into its forward pass (remat_policy='full' then saved no
# memory).
@functools.partial(jax.checkpoint, static_argnums=(0,),
                   policy=jax.checkpoint_policies.nothing_saveable)
def _apply_norm(module: nn.Module, params: Params, x: Array) -> Array:
  return module.apply({"params": params}, x)


class _LeanNorm(nn.Module):
  """A flax norm (`kind` 'layernorm' or 'rmsnorm') with the same parameters
  and values, whose backward pass keeps only its input (above)."""
  kind: str
  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    params = {"scale": self.param("scale", nn.initializers.ones, (d,),
                                  self.param_dtype)}
    if self.kind == "layernorm":
      params["bias"] = self.param("bias", nn.initializers.zeros, (d,),
                                  self.param_dtype)
      norm = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype,
                          param_dtype=self.param_dtype)
    else:
      norm = nn.RMSNorm(epsilon=self.epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype)
    return _apply_norm(norm, params, x)


def make_norm(kind: str, dtype: Any, param_dtype: Any, name: str,
              lean: bool = True) -> nn.Module:
  """The reference's LayerNorm (eps 1e-5) or RMSNorm (eps 1e-6, scale only).

  `lean`: keep only the input for the backward pass (`_LeanNorm`); flax's
  module otherwise (same parameters and values).
  """
  if kind not in NORMS:
    raise ValueError(f"norm={kind!r}; valid: {NORMS}")
  eps = _LN_EPS if kind == "layernorm" else 1e-6
  if lean:
    return _LeanNorm(kind, eps, dtype, param_dtype, name=name)
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      name=name)
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      name=name)
