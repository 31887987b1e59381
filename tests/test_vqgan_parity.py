"""Parity of the Flax VQGAN with the reference VQModel / GumbelVQ.

Random weights, converted through a real Lightning-format ``.ckpt`` and YAML
with ``load_taming_vqgan``; float32. Tolerances: reconstructions 1e-4 max
abs, q_loss 1e-5 relative, indices identical at every position.

The decoder's upsampling conv runs in phase form (`modules.upsample_conv`);
its values, gradients and forward-mode derivatives equal the direct form
(nearest x2, then the 3x3 conv) within 1e-5 relative in float32, and XLA
counts well under half the direct form's FLOPs. `modules.GroupNorm` equals
a float64 two-pass group norm (also far from zero mean, where a one-pass
variance loses digits) and `nn.GroupNorm` on ordinary inputs, alone and
followed by swish, whose backward pass keeps only its input and statistics
(a ResnetBlock keeps 4 full-size tensors, not 10); `conv2d`'s
row-block kernel gradient (`xla_cpu.conv_rewrites`) equals XLA's for 3x3,
1x1, strided and unevenly sized convolutions, in reverse and forward mode
and under vmap.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax_testing import reference_ckpt as rc
from vqgan_jax import convert
from vqgan_jax import keymaps
from vqgan_jax import modules
from vqgan_jax.backends import xla_cpu

F16_SMALL = dict(ch=32, out_ch=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1,
                 attn_resolutions=[16], dropout=0.0, in_channels=3,
                 resolution=64, z_channels=32)
GUMBEL_F8 = dict(ch=32, out_ch=3, ch_mult=[1, 1, 2, 4], num_res_blocks=1,
                 attn_resolutions=[32], dropout=0.0, in_channels=3,
                 resolution=64, z_channels=32)
DEPTH = dict(F16_SMALL, in_channels=1, out_ch=1, ch_mult=[1, 2, 2],
             attn_resolutions=[16], resolution=32)
SEGMENTATION = dict(ch=32, out_ch=182, ch_mult=[1, 2], num_res_blocks=1,
                    attn_resolutions=[], dropout=0.0, in_channels=182,
                    resolution=16, z_channels=32)

CASES = {
    "f16": (F16_SMALL, 64, 16, (2, 64, 64), False),
    "f16_nonsquare": (F16_SMALL, 64, 16, (2, 64, 96), False),
    "gumbel_f8": (GUMBEL_F8, 128, 32, (2, 64, 64), True),
    "depth_1ch": (DEPTH, 64, 16, (2, 32, 32), False),
    "segmentation_182ch": (SEGMENTATION, 32, 16, (1, 16, 16), False),
}


def _images(shape, channels, seed):
  rng = np.random.default_rng(seed)
  b, h, w = shape
  if channels > 3:  # one-hot segmentation maps
    labels = rng.integers(0, channels, size=(b, h, w))
    return np.eye(channels, dtype=np.float32)[labels]
  base = rng.uniform(-1, 1, size=(b, h // 8, w // 8, channels))
  img = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
  return (0.7 * img + 0.3 * rng.uniform(-1, 1, size=img.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def torch():
  return oracle.torch()


@pytest.mark.parametrize("case", sorted(CASES))
def test_reconstruction_and_indices_match_reference(case, tmp_path, torch):
  dd, n_embed, embed_dim, shape, gumbel = CASES[case]
  cfg = rc.vq_model_config(dd, n_embed, embed_dim, gumbel=gumbel, kl_weight=1e-3)
  ref = rc.build_reference(cfg, seed=1)
  x = _images(shape, dd["in_channels"], seed=2)
  xt = rc.to_nchw(x)
  rc.spread_codebook(ref, xt)
  ckpt, yml = rc.save_reference(tmp_path, ref, cfg)

  with torch.no_grad():
    h = ref.quant_conv(ref.encoder(xt))
    if gumbel:  # the reference adds Gumbel noise at eval: compare argmax paths
      logits = ref.quantize.proj(h)
      ref_idx = logits.argmax(1)
      qy = torch.softmax(logits, 1)
      ref_loss = 1e-3 * torch.sum(qy * torch.log(qy * n_embed + 1e-10), 1).mean()
      z_q = ref.quantize.embed(ref_idx).permute(0, 3, 1, 2)
    else:
      z_q, ref_loss, (_, _, ref_idx) = ref.quantize(h)
    ref_rec = rc.to_nhwc(ref.decode(z_q))
  ref_idx = ref_idx.numpy().reshape(shape[0], shape[1] // 2**(len(dd["ch_mult"]) - 1), -1)

  model, variables = convert.load_taming_vqgan(ckpt, yml)
  rec, aux = jax.jit(model.apply)(variables, jnp.asarray(x))
  idx = np.asarray(aux["indices"])

  assert idx.dtype == np.int32 and idx.shape == ref_idx.shape
  assert len(np.unique(ref_idx)) > 8, "codebook spread too narrow for a real test"
  np.testing.assert_array_equal(idx, ref_idx)
  assert rec.dtype == jnp.float32 and rec.shape == ref_rec.shape
  np.testing.assert_allclose(np.asarray(rec), ref_rec, atol=1e-4, rtol=0)
  np.testing.assert_allclose(float(aux["q_loss"]), float(ref_loss), rtol=1e-5)

  # The index path round-trips: decode_indices(encode_to_indices(x)) == rec.
  codes = model.apply(variables, jnp.asarray(x), method=model.encode_to_indices)
  np.testing.assert_array_equal(np.asarray(codes), ref_idx)
  dec = model.apply(variables, codes, method=model.decode_indices)
  np.testing.assert_allclose(np.asarray(dec), ref_rec, atol=1e-4, rtol=0)


def test_first_stage_of_a_transformer_checkpoint(tmp_path, torch):
  cfg = rc.vq_model_config(DEPTH, 64, 16)
  ref = rc.build_reference(cfg, seed=3)
  x = _images((1, 32, 32), 1, seed=4)
  rc.spread_codebook(ref, rc.to_nchw(x))
  sd = {"first_stage_model." + k: v for k, v in ref.state_dict().items()}
  sd["transformer.tok_emb.weight"] = torch.zeros(3, 4)
  ckpt = rc.lightning_checkpoint(tmp_path / "t.ckpt", sd)
  yml = rc.write_yaml(tmp_path / "t.yaml", {
      "target": "taming.models.cond_transformer.Net2NetTransformer",
      "params": {"first_stage_config": cfg}})
  model, variables = convert.load_taming_vqgan(ckpt, yml)
  with torch.no_grad():
    ref_rec = rc.to_nhwc(ref(rc.to_nchw(x))[0])
  rec, _ = model.apply(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(rec), ref_rec, atol=1e-4, rtol=0)


def test_state_dict_round_trip_is_exact(tmp_path, torch):
  cfg = rc.vq_model_config(DEPTH, 64, 16)
  ref = rc.build_reference(cfg, seed=5)
  ckpt, yml = rc.save_reference(tmp_path, ref, cfg)
  _, variables = convert.load_taming_vqgan(ckpt, yml)
  back = keymaps.vqgan.state_dict_from_params(variables["params"])
  ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(back) == set(ref_sd)
  for k, v in ref_sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.fixture(params=[False, True], ids=["xla_grads", "cpu_rewrites"])
def conv_rewrites(request):
  """Runs the test with `xla_cpu.conv_rewrites` off, then on."""
  with xla_cpu.conv_rewrites(request.param):
    yield request.param


@pytest.mark.usefixtures("conv_rewrites")
def test_upsample_conv_equals_nearest_upsampling_then_conv():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 8)), jnp.float32)  # odd, non-square
  kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 6)) / 8, jnp.float32)
  bias = jnp.asarray(rng.standard_normal((6,)), jnp.float32)

  def direct(x, kernel, bias):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return modules.conv2d(up, kernel, bias)

  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))

  ours = jax.jit(modules.upsample_conv)(x, kernel, bias)
  assert ours.shape == (2, 10, 14, 6)
  close(ours, direct(x, kernel, bias))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for g, e in zip(jax.grad(loss(modules.upsample_conv), (0, 1, 2))(x, kernel, bias),
                  jax.grad(loss(direct), (0, 1, 2))(x, kernel, bias)):
    close(g, e)
  tangents = (jnp.ones_like(x), jnp.full_like(kernel, 0.1), jnp.ones_like(bias))
  close(jax.jvp(modules.upsample_conv, (x, kernel, bias), tangents)[1],
        jax.jvp(direct, (x, kernel, bias), tangents)[1])
  # bfloat16 compute with float32 taps stays within bfloat16 rounding.
  bf = modules.upsample_conv(x, kernel, bias, dtype=jnp.bfloat16)
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf, np.float32), direct(x, kernel, bias),
                             atol=0.05 * float(jnp.max(jnp.abs(ours))))
  # bfloat16 compute: the kernel gradient (with the CPU rewrites by row
  # blocks of the phase form) stays within bfloat16 rounding of the float32
  # direct form's.
  bf_grad = jax.grad(lambda k: jnp.sum(jnp.sin(modules.upsample_conv(
      x, k, bias, dtype=jnp.bfloat16).astype(jnp.float32))))(kernel)
  assert bf_grad.dtype == jnp.float32
  want = jax.grad(loss(direct), 1)(x, kernel, bias)
  np.testing.assert_allclose(bf_grad, want, atol=0.03 * float(jnp.max(jnp.abs(want))))
  # Per-example kernel gradients (vmap of grad) equal the direct form's.
  per_example = lambda f: jax.vmap(lambda xi: jax.grad(loss(f), 1)(
      xi[None], kernel, bias))(x)
  close(per_example(modules.upsample_conv), per_example(direct))

  def flops(f):
    cost = jax.jit(f).lower(x, kernel, bias).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  assert flops(modules.upsample_conv) < 0.6 * flops(direct)
  with pytest.raises(ValueError, match="3x3 kernel"):
    modules.upsample_conv(x, kernel[:1, :1], bias)


def _group_norm_f64(x, scale, bias, groups, eps):
  b, h, w, c = x.shape
  g = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
  return y * scale + bias


@pytest.mark.parametrize("offset", [0.0, 3000.0])
def test_group_norm_equals_float64_two_pass_statistics(offset):
  rng = np.random.default_rng(1)
  x = (offset + rng.standard_normal((2, 6, 5, 64))).astype(np.float32)
  norm = modules.normalize("n", jnp.float32, jnp.float32)
  variables = norm.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(
      lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), variables)
  p = variables["params"]
  expected = _group_norm_f64(x, np.asarray(p["scale"]), np.asarray(p["bias"]), 32, 1e-6)
  flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-6)
  error = np.max(np.abs(norm.apply(variables, x) - expected))
  if offset:  # float32 rounding of the input alone is ~2e-4 here
    assert error < 2e-3, error
    flax_error = np.max(np.abs(flax_norm.apply(variables, x) - expected))
    assert flax_error > 10 * error, (flax_error, error)  # one-pass variance
  else:  # same parameters and values as flax's GroupNorm
    assert error < 2e-6, error
    np.testing.assert_allclose(norm.apply(variables, x), flax_norm.apply(variables, x),
                               atol=2e-6)
    grad = lambda f: jax.grad(lambda v: jnp.sum(jnp.sin(f(v, x))))(variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 grad(norm.apply), grad(flax_norm.apply))
  bf = modules.normalize("n", jnp.bfloat16, jnp.float32).apply(variables, x)
  assert bf.dtype == jnp.bfloat16


def test_group_norm_swish_equals_flax_and_keeps_only_its_input():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 6, 5, 64)).astype(np.float32)
  norm = modules.normalize("n", jnp.float32, jnp.float32, swish=True)
  variables = norm.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(
      lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), variables)
  flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-6)
  ours = lambda v, x: norm.apply(v, x)
  theirs = lambda v, x: modules.swish(flax_norm.apply(v, x))
  np.testing.assert_allclose(ours(variables, x), theirs(variables, x), atol=2e-6)
  plain = modules.normalize("n", jnp.float32, jnp.float32)
  np.testing.assert_array_equal(ours(variables, x),
                                modules.swish(plain.apply(variables, x)))
  for argnums in (0, 1):
    grad = lambda f: jax.grad(lambda v, x: jnp.sum(jnp.sin(f(v, x))),
                              argnums)(variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 grad(ours), grad(theirs))
  block = modules.ResnetBlock(out_channels=64)
  xb = jnp.asarray(rng.standard_normal((1, 16, 16, 64)), jnp.float32)
  vb = block.init(jax.random.PRNGKey(1), xb)
  _, vjp = jax.vjp(lambda v, x: block.apply(v, x), vb, xb)
  kept = [leaf for leaf in jax.tree.leaves(vjp) if leaf.shape == xb.shape]
  assert len(kept) == 4, [leaf.shape for leaf in jax.tree.leaves(vjp)]


@pytest.mark.parametrize("shape,ksize,strides,padding", [
    ((2, 128, 128, 4), 3, 1, 1),               # 3x3 over >= 32k positions
    ((1, 256, 256, 3), 3, 2, ((0, 1), (0, 1))),  # the encoder's downsample
    ((1, 100, 90, 5), 1, 1, 0),                # 1x1, rows not a block multiple
    ((3, 131, 97, 2), 3, 1, 1),                # odd sizes, padded blocks
])
def test_conv2d_row_block_kernel_gradient_equals_xla(shape, ksize, strides, padding):
  assert jax.default_backend() == "cpu"
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((ksize, ksize, shape[-1], 6)) * 0.2, jnp.float32)
  assert not xla_cpu.row_block_kernel_grad_pays(x.shape, kernel.shape, strides)
  with xla_cpu.conv_rewrites():
    _check_row_block_kernel_gradient(x, kernel, strides, padding)


def _check_row_block_kernel_gradient(x, kernel, strides, padding):
  assert xla_cpu.row_block_kernel_grad_pays(x.shape, kernel.shape, strides)
  pads = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  plain = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (strides, strides), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = lambda x, k: modules.conv2d(x, k, strides=strides, padding=padding)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  for a, b in zip(jax.jit(jax.grad(loss(ours), (0, 1)))(x, kernel),
                  jax.jit(jax.grad(loss(plain), (0, 1)))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(b))))
  tangents = (jnp.ones_like(x), jnp.full_like(kernel, 0.5))
  np.testing.assert_allclose(jax.jvp(ours, (x, kernel), tangents)[1],
                             jax.jvp(plain, (x, kernel), tangents)[1], atol=1e-4)
  # Per-example kernel gradients (vmap of grad) agree too.
  pair = jnp.stack([x, x[::-1]])
  np.testing.assert_allclose(
      jax.vmap(jax.grad(loss(ours), 1), (0, None))(pair, kernel),
      jax.vmap(jax.grad(loss(plain), 1), (0, None))(pair, kernel), rtol=1e-5, atol=1e-4)
