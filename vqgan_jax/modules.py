"""Encoder and decoder of the VQGAN, built block for block as the reference.

Layout NHWC. Module names mirror the published model (``down_{i}_block_{j}``
is the reference's ``down[i].block[j]``) so that conversion is a rename.
Parameters are initialised as PyTorch initialises its convolutions
(uniform(+-1/sqrt(fan_in)) for kernels and biases), so training from
scratch starts from the same distribution as the reference.

Every convolution goes through `conv2d` (or `upsample_conv`, the decoder's
nearest x2 + 3x3 conv); programs that opt in to XLA:CPU's faster kernel
gradients (`vqgan_jax.backends.xla_cpu`) get them there.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vqgan_jax.backends import xla_cpu

Dtype = Any


def _torch_uniform(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normalize(name: str, dtype: Dtype, param_dtype: Dtype,
              swish: bool = False) -> "GroupNorm":
  """GroupNorm(32 groups, eps 1e-6, affine); statistics in float32; with
  `swish`, followed by swish."""
  return GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype,
                   param_dtype=param_dtype, name=name, swish=swish)


def _group_sum(per_channel, groups: int):
  """(B, C) per-channel sums -> (B, C): each channel gets its group's sum."""
  b, c = per_channel.shape
  sums = per_channel.reshape(b, groups, c // groups).sum(-1)
  return jnp.repeat(sums, c // groups, axis=1)


class GroupNorm(nn.Module):
  """Group normalisation of NHWC features, with `nn.GroupNorm`'s parameters
  (``scale``, ``bias``, one per channel).

  Statistics are float32 and two-pass (the mean, then the mean squared
  deviation, as the reference's torch GroupNorm computes them). Both are
  reduced over height and width per channel first, with channels the
  contiguous axis, and then over each group's channels, which XLA:CPU runs
  (with its derivative) faster than `nn.GroupNorm`'s reduction over a
  (B, H, W, groups, C / groups) view.

  The normalisation (and the swish after it, with `swish=True`) runs under
  one `jax.checkpoint` that keeps only the input and the per-channel
  statistics for the backward pass, which recomputes the rest: autodiff
  would keep ~3 float32 tensors of the input's size per norm, and a
  ResnetBlock keeps 4 full-size tensors instead of 10. BENCHMARKS.md has
  the effect on the training step's memory plan.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # Follow the normalisation with swish (x * sigmoid(x)), under one
  # checkpoint: see `_group_norm`.
  swish: bool = False

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by "
                       f"{self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return _group_norm(x, scale, bias, self.num_groups, self.epsilon,
                       self.dtype, self.swish)


@functools.partial(jax.checkpoint, static_argnums=(3, 4, 5, 6),
                   policy=jax.checkpoint_policies.save_only_these_names(
                       "group_norm_stats"))
def _group_norm(x, scale, bias, groups, epsilon, dtype, with_swish):
  """GroupNorm (and swish) keeping x and the per-channel statistics for the
  backward pass, not the full-size float32 intermediates."""
  b, h, w, c = x.shape
  xf = x.astype(jnp.float32)
  count = h * w * (c // groups)
  mean = _group_sum(jnp.sum(xf, axis=(1, 2)), groups) / count
  centred = xf - mean[:, None, None, :]
  var = _group_sum(jnp.sum(centred * centred, axis=(1, 2)), groups) / count
  mult = jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
  mean, mult = checkpoint_name((mean, mult), "group_norm_stats")
  y = (xf - mean[:, None, None, :]) * mult[:, None, None, :] + bias.astype(
      jnp.float32)
  y = y.astype(dtype)
  return swish(y) if with_swish else y


def swish(x):
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, + skip.

  The skip is a 1x1 ``nin_shortcut`` when the channel count changes.
  """
  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = normalize("norm1", swish=True, **kw)(x)
    h = _conv(self.out_channels, 3, "conv1", **kw)(h)
    h = normalize("norm2", swish=True, **kw)(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = _conv(self.out_channels, 3, "conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "nin_shortcut", padding=0, **kw)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual.

  1x1 ``q``, ``k``, ``v``, ``proj_out``; scale ``C**-0.5``; softmax in
  float32.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    h = normalize("norm", **kw)(x)
    q = _conv(c, 1, "q", padding=0, **kw)(h).reshape(b, hgt * wid, c)
    k = _conv(c, 1, "k", padding=0, **kw)(h).reshape(b, hgt * wid, c)
    v = _conv(c, 1, "v", padding=0, **kw)(h).reshape(b, hgt * wid, c)
    w = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(w * (c**-0.5), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hgt, wid, c)
    return x + _conv(c, 1, "proj_out", padding=0, **kw)(h)


class Downsample(nn.Module):
  """Zero-pad right and bottom by one, then a 3x3 conv with stride 2."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _FlatConv(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)),
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (computed by `upsample_conv`)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _FlatConv(x.shape[-1], 3, dtype=self.dtype,
                     param_dtype=self.param_dtype, upsample=True,
                     name="conv")(x)


def _conv(features, kernel_size, name, padding=1, **kw):
  """A conv whose parameters sit directly under ``name`` (no extra level)."""
  return _FlatConv(features, kernel_size, padding=padding, name=name, **kw)


class _FlatConv(nn.Module):
  """A 2-D convolution with PyTorch's default initialisation."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Any = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upsample: bool = False  # nearest x2 first (`upsample_conv`; 3x3 only)

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1] * self.kernel_size**2
    kernel = self.param("kernel", _torch_uniform(fan_in),
                        (self.kernel_size, self.kernel_size, x.shape[-1],
                         self.features), self.param_dtype)
    bias = self.param("bias", _torch_uniform(fan_in), (self.features,),
                      self.param_dtype)
    if self.upsample:
      return upsample_conv(x, kernel, bias, dtype=self.dtype)
    return conv2d(x, kernel, bias, strides=self.strides, padding=self.padding,
                  dtype=self.dtype)


def conv2d(x, kernel, bias=None, *, strides: int = 1, padding: Any = 1,
           dtype: Dtype = None):
  """NHWC convolution with an HWIO kernel, as a pure function.

  Exposed so that a trainer can differentiate with respect to one kernel
  (the decoder's ``conv_out``) in isolation. Traced inside
  `xla_cpu.conv_rewrites`, large, 1x1 and strided convolutions take their
  kernel gradient by row blocks (see `vqgan_jax.backends.xla_cpu`): the
  same values and derivatives, computed faster by XLA:CPU.
  """
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  padding = tuple(tuple(p) for p in padding)
  dtype = dtype or x.dtype
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if xla_cpu.row_block_kernel_grad_pays(x.shape, kernel.shape, strides):
    y = xla_cpu.conv_row_block_kernel_grad(x, kernel, strides, padding)
  else:
    y = _lax_conv(x, kernel, strides, padding)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


def _lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _nearest_x2(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _phase_kernels(kernel):
  """The 2x2 kernels that the four output phases (row, column parity) of
  "nearest x2, then 3x3 conv" apply to the input, concatenated on the
  output channels in the order (0, 0), (0, 1), (1, 0), (1, 1).

  Along one axis, output 2i reads upsampled rows 2i-1, 2i, 2i+1 = input
  rows i-1, i, i: taps (k0, k1 + k2) on rows (i-1, i); output 2i+1 reads
  input rows i, i, i+1: taps (k0 + k1, k2) on rows (i, i+1).
  """
  def phases(k, axis):
    t = [jax.lax.index_in_dim(k, i, axis) for i in range(3)]
    return (jnp.concatenate([t[0], t[1] + t[2]], axis),
            jnp.concatenate([t[0] + t[1], t[2]], axis))
  return jnp.concatenate(
      [pc for pr in phases(kernel, 0) for pc in phases(pr, 1)], axis=-1)


def _interleave_phases(out, h, w, co):
  """(b, h + 1, w + 1, 4 co) phase outputs -> the (b, 2h, 2w, co) image:
  phase (a, c) of input pixel (i, j) sits at [i + a, j + c] in channel
  block 2a + c."""
  b = out.shape[0]
  rows = [jnp.stack([out[:, a:a + h, c:c + w, (2 * a + c) * co:
                         (2 * a + c + 1) * co] for c in (0, 1)], axis=3)
          for a in (0, 1)]                        # each (b, h, w, 2, co)
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, co)


@jax.custom_jvp
def _upsample_conv_by_phases(x, kernel):
  """`_nearest_x2` then a 3x3 conv in x's dtype, without building the
  upsampled input (the taps are summed in the kernel's dtype)."""
  _, h, w, _ = x.shape
  out = conv2d(x, _phase_kernels(kernel), padding=1)
  return _interleave_phases(out, h, w, kernel.shape[-1])


@_upsample_conv_by_phases.defjvp
def _upsample_conv_jvp(primals, tangents):
  # Linear in the tangents; what matters is how the transpose (the reverse
  # mode) is computed. The input tangent goes through the direct form, whose
  # transpose is the ordinary convolution backward pass (faster than that of
  # the phase form's 2x2 conv). The kernel tangent goes through the direct
  # form too, or, inside `xla_cpu.conv_rewrites`, through the phase form by
  # row blocks, whose transpose XLA:CPU computes faster still.
  x, kernel = primals
  dx, dkernel = tangents
  _, h, w, _ = x.shape
  tangent = conv2d(_nearest_x2(dx), kernel, dtype=x.dtype)
  if xla_cpu.enabled():
    tangent = tangent + _interleave_phases(xla_cpu.conv_by_row_blocks(
        x, _phase_kernels(dkernel).astype(x.dtype), 1, ((1, 1), (1, 1))),
                                           h, w, kernel.shape[-1])
  else:
    tangent = tangent + conv2d(_nearest_x2(x), dkernel, dtype=x.dtype)
  return _upsample_conv_by_phases(x, kernel), tangent


def upsample_conv(x, kernel, bias=None, *, dtype: Dtype = None):
  """Nearest-neighbour x2 upsampling, then a 3x3 conv with padding 1.

  Equal (up to float rounding) to `conv2d(nearest_x2(x), kernel, bias)`,
  computed as one conv at the input's resolution: each output pixel of a
  given row and column parity sees a 2x2 window of the input through summed
  3x3 taps, so the four parities are a 2x2 conv with 4x the output
  channels, 16 instead of 36 multiply-adds per output pixel and channel
  pair, and the upsampled input is never built. Derivatives (forward and
  reverse mode) are those of the direct form.

  Args:
    x: (B, H, W, Ci).
    kernel: (3, 3, Ci, Co), HWIO.
    bias: optional (Co,).
    dtype: compute dtype (default x's).

  Returns:
    (B, 2H, 2W, Co).
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"upsample_conv needs a 3x3 kernel, got {kernel.shape}")
  dtype = dtype or x.dtype
  y = _upsample_conv_by_phases(x.astype(dtype), kernel)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


class Encoder(nn.Module):
  """conv_in -> levels of ResnetBlocks (+ attention) and downsamples -> mid -> out.

  Attention is applied after every block of a level whose resolution (counted
  from the config ``resolution``, not from the input size) is in
  ``attn_resolutions``.
  """
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  dropout: float = 0.0
  double_z: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _conv(self.ch, 3, "conv_in", **kw)(x.astype(self.dtype))
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.dropout, name=f"down_{i}_block_{j}",
                        **kw)(h, deterministic)
        if res in self.attn_resolutions:
          h = AttnBlock(name=f"down_{i}_attn_{j}", **kw)(h)
      if i != len(self.ch_mult) - 1:
        h = Downsample(name=f"down_{i}_downsample", **kw)(h)
        res //= 2
    c = h.shape[-1]
    h = ResnetBlock(c, self.dropout, name="mid_block_1", **kw)(h, deterministic)
    h = AttnBlock(name="mid_attn_1", **kw)(h)
    h = ResnetBlock(c, self.dropout, name="mid_block_2", **kw)(h, deterministic)
    h = normalize("norm_out", swish=True, **kw)(h)
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return _conv(out, 3, "conv_out", **kw)(h)


class Decoder(nn.Module):
  """conv_in -> mid -> levels coarsest to finest (num_res_blocks + 1 blocks) -> out.

  ``up_0`` is the finest level although it runs last, as in the reference.
  No output activation and no clamp. With ``features_only`` the output of
  the last swish (the input of ``conv_out``) is returned instead, which the
  adaptive GAN weight differentiates through.
  """
  ch: int
  out_ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z, deterministic: bool = True, features_only: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(self.ch_mult)
    c = self.ch * self.ch_mult[-1]
    res = self.resolution // 2**(n - 1)
    h = _conv(c, 3, "conv_in", **kw)(z.astype(self.dtype))
    h = ResnetBlock(c, self.dropout, name="mid_block_1", **kw)(h, deterministic)
    h = AttnBlock(name="mid_attn_1", **kw)(h)
    h = ResnetBlock(c, self.dropout, name="mid_block_2", **kw)(h, deterministic)
    for i in reversed(range(n)):
      for j in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[i], self.dropout,
                        name=f"up_{i}_block_{j}", **kw)(h, deterministic)
        if res in self.attn_resolutions:
          h = AttnBlock(name=f"up_{i}_attn_{j}", **kw)(h)
      if i != 0:
        h = Upsample(name=f"up_{i}_upsample", **kw)(h)
        res *= 2
    h = normalize("norm_out", swish=True, **kw)(h)
    conv_out = _conv(self.out_ch, 3, "conv_out", **kw)
    if features_only:
      if self.is_initializing():
        conv_out(h)
      return h
    return conv_out(h)
