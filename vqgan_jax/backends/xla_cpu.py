"""Convolution kernel gradients rewritten for XLA:CPU, opt-in.

XLA:CPU computes a convolution's kernel gradient (the backward-filter
convolution) several times slower than the forward convolution for large
images, for 1x1 kernels and for strided convolutions. Here the same
convolution is written so that its reverse-mode kernel gradient is a
sequence of matrix products over blocks of output rows (`conv_by_row_blocks`,
whose transpose JAX derives), which XLA:CPU runs fast. Values and
derivatives are those of the plain convolution (forward mode, reverse mode,
under vmap); only how the kernel gradient is computed differs, so results
move by float32 rounding at most. The forward pass is the plain convolution
in either case. BENCHMARKS.md has the timings that set the thresholds.

The rewrites are off unless a program asks for them:

    from vqgan_jax.backends import xla_cpu

    with xla_cpu.conv_rewrites():        # while tracing
      grads = jax.jit(jax.grad(loss))(params, images)

    step = jax.jit(xla_cpu.with_conv_rewrites(train_step))  # traced inside

`modules.conv2d` and `modules.upsample_conv` read the setting when they are
traced, so the context has to cover tracing (a jitted function's first call,
or any call that retraces), not just the calls; `with_conv_rewrites` wraps a
function so that it is traced inside the context wherever it is first
called. A function traced once keeps its choice in JAX's caches. The
project's stage-1 trainer opts in when JAX's default backend is the CPU;
code that calls the model directly gets XLA's own convolution gradients.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

_CONV_REWRITES = contextvars.ContextVar("xla_cpu_conv_rewrites",
                                        default=False)

# Output positions (batch x height x width) from which a convolution's
# kernel gradient is taken by row blocks: below them XLA's own is faster.
ROW_BLOCK_MIN_POSITIONS = {"kxk_stride1": 32768, "1x1_or_strided": 8192}
_ROW_BLOCK_POSITIONS = 1024  # output positions per block of rows


@contextlib.contextmanager
def conv_rewrites(enabled: bool = True) -> Iterator[None]:
  """Within the block, the model's convolutions are traced with (or, with
  `enabled=False`, without) the row-block kernel gradients."""
  token = _CONV_REWRITES.set(bool(enabled))
  try:
    yield
  finally:
    _CONV_REWRITES.reset(token)


def with_conv_rewrites(fn: Callable[..., Any], enabled: bool = True
                       ) -> Callable[..., Any]:
  """`fn`, run (and so traced, under `jax.jit`) inside `conv_rewrites`."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with conv_rewrites(enabled):
      return fn(*args, **kwargs)

  return wrapped


def enabled() -> bool:
  """Whether the code being traced asked for the rewrites."""
  return _CONV_REWRITES.get()


def row_block_kernel_grad_pays(x_shape, kernel_shape, strides: int) -> bool:
  """Whether a convolution takes its kernel gradient by row blocks: the
  rewrites are on and the convolution is large enough to gain."""
  if not enabled():
    return False
  positions = x_shape[0] * x_shape[1] * x_shape[2] // strides**2
  plain = kernel_shape[0] > 1 and strides == 1
  return positions >= ROW_BLOCK_MIN_POSITIONS[
      "kxk_stride1" if plain else "1x1_or_strided"]


def _lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_by_row_blocks(x, kernel, strides, padding):
  """The NHWC/HWIO convolution computed one block of ~1,000 output
  positions at a time (`lax.map` over blocks of output rows): each block's
  input windows laid side by side (an im2col) times the flattened kernel.

  It is linear in the kernel, and its transpose with respect to the kernel,
  which JAX derives (the map reversed, each block's im2col transposed times
  the block's cotangent, accumulated in float32), is the fast kernel
  gradient on CPU. The block recomputes its im2col in the backward pass
  (`jax.checkpoint`) instead of keeping 9x the input alive.
  """
  kh, kw, ci, co = kernel.shape
  b, h, w, _ = x.shape
  (top, bottom), (left, right) = padding
  ho = (h + top + bottom - kh) // strides + 1
  wo = (w + left + right - kw) // strides + 1
  rows = max(1, min(ho, _ROW_BLOCK_POSITIONS // (b * wo)))
  blocks = -(-ho // rows)
  extra = blocks * rows - ho  # zero rows past the end, cut off below
  xp = jnp.pad(x, ((0, 0), (top, bottom + extra * strides), (left, right),
                   (0, 0)))
  span = (rows - 1) * strides + kh
  flat_kernel = kernel.reshape(kh * kw * ci, co)

  @jax.checkpoint
  def block(flat_kernel, xp, r):
    xs = jax.lax.dynamic_slice_in_dim(xp, r * rows * strides, span, axis=1)
    cols = jnp.concatenate([
        jax.lax.slice(xs, (0, i, j, 0),
                      (b, i + (rows - 1) * strides + 1,
                       j + (wo - 1) * strides + 1, ci),
                      (1, strides, strides, 1))
        for i in range(kh) for j in range(kw)], axis=-1)
    y = jnp.dot(cols.reshape(-1, kh * kw * ci), flat_kernel,
                preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(b, rows, wo, co)

  ys = jax.lax.map(lambda r: block(flat_kernel, xp, r), jnp.arange(blocks))
  return ys.transpose(1, 0, 2, 3, 4).reshape(b, blocks * rows, wo, co)[:, :ho]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv_row_block_kernel_grad(x, kernel, strides, padding):
  """The plain convolution; its kernel tangent goes through
  `conv_by_row_blocks`, whose transpose is the reverse-mode kernel
  gradient."""
  return _lax_conv(x, kernel, strides, padding)


@conv_row_block_kernel_grad.defjvp
def _conv_row_block_kernel_grad_jvp(strides, padding, primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  return (_lax_conv(x, kernel, strides, padding),
          _lax_conv(dx, kernel, strides, padding) +
          conv_by_row_blocks(x, dkernel, strides, padding))
