"""Backend tuning (`vqgan_jax.backends`): opt-in, and no change of the math.

The XLA:CPU convolution rewrites are off unless a program enters
`xla_cpu.conv_rewrites` while tracing: by default the model's gradient
traces none of them. With them, a tiny VQGAN's parameter gradients agree
with XLA's own within float32 rounding, and its forward pass lowers to the
same program. The start-up helpers import no JAX.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.backends import xla_cpu

# 2 x 64 x 64 images: the 1x1 shortcuts at full resolution (8k positions)
# take the row-block kernel gradient, the decoder's upsample its phase-form
# one (3x3 and strided convs: tests/test_vqgan_parity.py).
_TINY = dict(ch=32, ch_mult=(2, 1), num_res_blocks=1, attn_resolutions=(),
             resolution=64, z_channels=32, n_embed=16, embed_dim=8)


@pytest.fixture(scope="module")
def tiny():
  """The model, random variables and images (variables drawn with numpy:
  compiling the model's initialiser costs more than the test)."""
  model = vqgan_lib.VQGAN(**_TINY)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    bound = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
    return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(draw, shapes), images


def _grad_fn(model, images):
  def loss(params):
    rec, aux = model.apply({"params": params}, images)
    return jnp.mean(jnp.sin(3.0 * rec) * images) + aux["q_loss"]
  return jax.grad(loss)


def _primitives(jaxpr):
  """Names of every primitive in a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          names |= _primitives(sub)
  return names


def test_conv_rewrites_are_traced_only_when_asked_for(tiny):
  model, variables, images = tiny
  params = variables["params"]
  # A new function for each trace: JAX caches a traced function's jaxpr.
  traced = lambda fn: _primitives(jax.make_jaxpr(fn)(params))
  assert not xla_cpu.enabled()
  plain = traced(_grad_fn(model, images))
  assert not plain & {"scan", "while"}, plain  # no row-block lax.map
  with xla_cpu.conv_rewrites():
    assert xla_cpu.enabled()
    assert "scan" in traced(_grad_fn(model, images))
    with xla_cpu.conv_rewrites(False):
      assert "scan" not in traced(_grad_fn(model, images))
    assert xla_cpu.enabled()
  assert not xla_cpu.enabled()
  # A wrapped function is traced inside the context wherever it is called.
  assert "scan" in traced(xla_cpu.with_conv_rewrites(_grad_fn(model, images)))
  assert "scan" not in traced(
      xla_cpu.with_conv_rewrites(_grad_fn(model, images), False))
  assert not xla_cpu.enabled()


def test_conv_rewrites_change_gradients_only_by_float32_rounding(tiny):
  model, variables, images = tiny
  params = variables["params"]
  want = jax.jit(_grad_fn(model, images))(params)
  got = jax.jit(xla_cpu.with_conv_rewrites(_grad_fn(model, images)))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # The forward pass is the plain convolution in either case: one program.
  forward = lambda: lambda v, x: model.apply(v, x)[0]
  plain = jax.jit(forward()).lower(variables, images).as_text()
  rewritten = jax.jit(xla_cpu.with_conv_rewrites(forward())).lower(
      variables, images).as_text()
  assert rewritten == plain


def test_start_up_helpers_import_no_jax():
  """`host_memory`, `compilation_cache` and `threefry` must be usable before
  JAX starts a backend, so importing them imports no JAX at all."""
  code = ("import sys\n"
          "from vqgan_jax.backends import compilation_cache, host_memory, threefry\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'jaxlib', 'numpy')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "[]", out
