"""Quantizer properties and gradients, against the reference VectorQuantizer2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax import quantizers as q


def _case(seed=0, n=64, d=8, k=32):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(2, 4, n // 8, d)).astype(np.float32)
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  w = rng.normal(size=z.shape).astype(np.float32)
  return z, codebook, w


@pytest.mark.parametrize("legacy", [True, False])
def test_gradients_equal_reference(legacy):
  torch = oracle.torch()
  oracle.taming()
  from taming.modules.vqvae.quantize import VectorQuantizer2
  z, codebook, w = _case()
  ref = VectorQuantizer2(codebook.shape[0], codebook.shape[1], beta=0.25,
                         legacy=legacy)
  with torch.no_grad():
    ref.embedding.weight.copy_(torch.from_numpy(codebook))
  zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  z_q, loss, _ = ref(zt)
  total = loss + (z_q * torch.from_numpy(w.transpose(0, 3, 1, 2).copy())).sum()
  total.backward()

  def f(z, codebook):
    zq, l, _, _ = q.vector_quantize(z, codebook, beta=0.25, legacy=legacy)
    return l + jnp.sum(zq * w), l

  (val, l), (gz, gc) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      jnp.asarray(z), jnp.asarray(codebook))
  np.testing.assert_allclose(float(l), float(loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gz),
                             zt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(gc), ref.embedding.weight.grad.numpy(),
                             atol=1e-6)


def test_legacy_and_fixed_weightings_differ_as_specified():
  z, codebook, _ = _case(1)
  _, l_legacy, _, terms = q.vector_quantize(z, codebook, beta=0.25, legacy=True)
  _, l_fixed, _, _ = q.vector_quantize(z, codebook, beta=0.25, legacy=False)
  np.testing.assert_allclose(l_legacy, terms["commitment"] + 0.25 * terms["codebook"], rtol=1e-6)
  np.testing.assert_allclose(l_fixed, 0.25 * terms["commitment"] + terms["codebook"], rtol=1e-6)
  # Forward values of the two terms are equal; their gradients go to different places.
  np.testing.assert_allclose(terms["commitment"], terms["codebook"], rtol=1e-6)


def test_nearest_code_is_exact_argmin_and_ties_take_lowest_index():
  z, codebook, _ = _case(2)
  idx = np.asarray(q.nearest_code(z, codebook))
  d = ((z[..., None, :].astype(np.float64) - codebook.astype(np.float64))**2).sum(-1)
  np.testing.assert_array_equal(idx, d.argmin(-1))
  dup = np.stack([codebook[3], codebook[3], codebook[5]])
  assert int(q.nearest_code(codebook[3][None], dup)[0]) == 0


def test_straight_through_forward_is_codes_and_gradient_is_identity():
  z, codebook, _ = _case(3)
  zq, _, idx, _ = q.vector_quantize(z, codebook)
  np.testing.assert_allclose(np.asarray(zq), codebook[np.asarray(idx)], atol=1e-6)
  g = jax.grad(lambda z: jnp.sum(q.vector_quantize(z, codebook)[0] * 3.0))(jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(g), 3.0)


def test_distances_are_float32_under_bfloat16_inputs():
  z, codebook, _ = _case(4)
  zq, loss, idx, _ = q.vector_quantize(jnp.asarray(z, jnp.bfloat16), codebook)
  assert zq.dtype == jnp.float32 and loss.dtype == jnp.float32
  assert idx.dtype == jnp.int32


def test_usage_and_perplexity_of_known_histograms():
  idx = jnp.array([[0, 0, 1, 1], [2, 2, 3, 3]])
  np.testing.assert_allclose(q.codebook_usage(idx, 8), 0.5)
  np.testing.assert_allclose(q.perplexity(idx, 8), 4.0, rtol=1e-6)
  np.testing.assert_allclose(q.perplexity(jnp.zeros((10,), jnp.int32), 8), 1.0)
  np.testing.assert_allclose(q.codebook_histogram(idx, 5), [2, 2, 2, 2, 0])


def test_gumbel_inference_is_argmax_and_kl_matches_formula():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 3, 3, 16)).astype(np.float32)
  embed = rng.normal(size=(16, 4)).astype(np.float32)
  zq, loss, idx = q.gumbel_quantize(logits, embed, kl_weight=0.1)
  np.testing.assert_array_equal(np.asarray(idx), logits.argmax(-1))
  np.testing.assert_allclose(np.asarray(zq), embed[logits.argmax(-1)], atol=1e-6)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  kl = (p * np.log(p * 16 + 1e-10)).sum(-1).mean()
  np.testing.assert_allclose(float(loss), 0.1 * kl, rtol=1e-5)


def test_gumbel_training_sample_is_one_hot_with_soft_gradients():
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(4, 16)).astype(np.float32))
  embed = jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))
  key = jax.random.PRNGKey(0)
  zq, _, idx = q.gumbel_quantize(logits, embed, rng=key, temperature=0.7)
  np.testing.assert_allclose(np.asarray(zq), np.asarray(embed)[np.asarray(idx)], atol=1e-6)
  g = jax.grad(lambda l: jnp.sum(q.gumbel_quantize(l, embed, rng=key,
                                                   temperature=0.7, kl_weight=0.0)[0]))(logits)
  assert np.abs(np.asarray(g)).max() > 0  # the soft sample carries gradients
  # Sampled indices follow softmax(logits): frequencies over many draws.
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  draws = jax.vmap(lambda k: q.gumbel_quantize(logits[:1], embed, rng=k)[2])(keys)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=16) / 4000
  np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.03)
