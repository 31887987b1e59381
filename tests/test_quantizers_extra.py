"""Quantizer options beyond the reference: each defining property.

FSQ values lie on the grid and every code is reachable; LFQ codes are sign
patterns with the right index; an EMA update equals a numpy hand
computation; restarted codes are encoder outputs of the batch; the rotation
trick has the straight-through forward and the analytic rotated gradient;
the default model keeps the reference quantizer; the EMA train step ends with
the same codebook on 8 simulated devices as on 1, identical on every replica.
"""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import quantizers as q
from vqgan_jax import vqgan as vqgan_lib

# ----------------------------------------------------------------------------
# FSQ


@pytest.mark.parametrize("levels", [(4, 4, 4), (8, 5, 5, 5), (3, 2, 6)])
def test_fsq_values_on_grid_every_code_reachable_and_roundtrip(levels):
  k = int(np.prod(levels))
  half = np.array(levels) // 2
  # Values on the grid: (j - L//2) / (L//2), j = 0..L-1, for any input.
  z = jnp.asarray(np.random.default_rng(0).normal(0, 3, (512, len(levels))),
                  jnp.float32)
  z_q, idx = q.fsq_quantize(z, levels)
  for i, n in enumerate(levels):
    grid = (np.arange(n, dtype=np.float32) - n // 2) / np.float32(n // 2)
    assert np.isin(np.asarray(z_q)[:, i], grid).all(), (i, np.unique(z_q[:, i]))
  # Every code reachable: a sweep of each channel hits exactly its L levels,
  # and the product of one input per level gives every index exactly once.
  t = np.linspace(-8, 8, 4001, dtype=np.float32)
  reps = []
  for i, n in enumerate(levels):
    sweep = np.zeros((t.size, len(levels)), np.float32)
    sweep[:, i] = t
    vals = np.asarray(q.fsq_quantize(jnp.asarray(sweep), levels)[0])[:, i]
    uniq, first = np.unique(vals, return_index=True)
    np.testing.assert_array_equal(
        uniq, (np.arange(n, dtype=np.float32) - n // 2) / np.float32(n // 2))
    reps.append(t[first])
  grid = np.array(list(itertools.product(*reps)), np.float32)
  codes, all_idx = q.fsq_quantize(jnp.asarray(grid), levels)
  assert sorted(np.asarray(all_idx).tolist()) == list(range(k))
  # index <-> code bijection, both ways.
  np.testing.assert_array_equal(
      q.fsq_indices_to_codes(all_idx, levels), np.asarray(codes))
  back = q.fsq_codes_to_indices(q.fsq_indices_to_codes(jnp.arange(k), levels),
                                levels)
  np.testing.assert_array_equal(back, np.arange(k))
  np.testing.assert_array_equal(idx, q.fsq_codes_to_indices(z_q, levels))


def test_fsq_gradient_is_straight_through_of_the_rounding():
  levels = (8, 5, 5, 5)
  z = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(16, 4)), jnp.float32)
  half = jnp.asarray(np.array(levels) // 2, jnp.float32)
  g = jax.grad(lambda z: jnp.sum(q.fsq_quantize(z, levels)[0] * w))(z)
  want = jax.grad(lambda z: jnp.sum(q.fsq_bound(z, levels) / half * w))(z)
  np.testing.assert_allclose(g, want, rtol=1e-6)
  assert float(jnp.min(jnp.abs(g))) > 0  # the gradient is not cut


# ----------------------------------------------------------------------------
# LFQ


def test_lfq_codes_are_sign_patterns_with_the_bit_index():
  z = jnp.array([[0.3, -1.0, 2.0, -0.1, 0.5, -2.0]], jnp.float32)
  codes, idx = q.lfq_quantize(z)
  np.testing.assert_array_equal(codes, [[1, -1, 1, -1, 1, -1]])
  assert int(idx[0]) == 1 + 4 + 16
  z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 6)), jnp.float32)
  codes, idx = q.lfq_quantize(z)
  np.testing.assert_array_equal(codes, np.where(np.asarray(z) >= 0, 1.0, -1.0))
  bits = (np.asarray(idx)[..., None] >> np.arange(6)) & 1
  np.testing.assert_array_equal(bits, np.asarray(z) > 0)
  np.testing.assert_array_equal(q.lfq_indices_to_codes(idx, 6), codes)
  book = np.asarray(q.lfq_codebook(6))
  assert len({tuple(r) for r in book}) == 64
  np.testing.assert_array_equal(q.lfq_quantize(jnp.asarray(book))[1],
                                np.arange(64))


def test_lfq_entropy_logits_equal_negative_distances_up_to_a_constant():
  z = jnp.asarray(np.random.default_rng(3).normal(size=(32, 4)), jnp.float32)
  book = q.lfq_codebook(4)
  a = q.entropy_penalty(2.0 * z @ book.T, 0.5)[0]
  b = q.entropy_penalty(q.codebook_logits(z, book), 0.5)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Entropy penalty


def test_entropy_penalty_equals_numpy_and_its_extremes():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  t = 0.7
  p = np.exp(logits / t)
  p /= p.sum(-1, keepdims=True)
  sample = np.mean(-np.sum(p * np.log(p), -1))
  avg = p.mean(0)
  want = sample + np.sum(avg * np.log(avg))
  got, terms = q.entropy_penalty(jnp.asarray(logits), t)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(terms["sample_entropy"], sample, rtol=1e-5)
  # Confident and spread over all K codes: -log K; all on one code: 0.
  spread = 100.0 * np.eye(4, dtype=np.float32)
  np.testing.assert_allclose(q.entropy_penalty(spread, 1.0)[0], -np.log(4),
                             atol=1e-5)
  one = np.tile(spread[:1], (4, 1))
  np.testing.assert_allclose(q.entropy_penalty(one, 1.0)[0], 0.0, atol=1e-5)


# ----------------------------------------------------------------------------
# EMA codebook and dead-code restart


def _ema_numpy(codebook, size, total, z, idx, decay, eps):
  k = codebook.shape[0]
  counts = np.bincount(idx, minlength=k).astype(np.float64)
  sums = np.zeros_like(codebook, np.float64)
  for i, j in enumerate(idx):
    sums[j] += z[i]
  size = decay * size + (1 - decay) * counts
  total = decay * total + (1 - decay) * sums
  n = size.sum()
  smoothed = (size + eps) / (n + k * eps) * n
  return total / smoothed[:, None], size, total


def test_ema_update_equals_hand_computation():
  codebook = np.array([[0., 0.], [1., 1.], [5., -5.]], np.float32)
  size = np.array([2.0, 1.0, 0.5], np.float32)
  total = np.array([[0.2, 0.0], [1.0, 0.8], [2.5, -2.5]], np.float32)
  z = np.array([[0.1, -0.1], [0.9, 1.2], [1.1, 0.8], [0.0, 0.3], [1.0, 1.0]],
               np.float32)
  idx = np.asarray(q.nearest_code(jnp.asarray(z), jnp.asarray(codebook)))
  np.testing.assert_array_equal(idx, [0, 1, 1, 0, 1])
  want = _ema_numpy(codebook, size, total, z, idx, 0.9, 1e-5)
  got = q.ema_codebook_update(jnp.asarray(codebook), size, total, z, idx,
                              decay=0.9, eps=1e-5)
  for g, w in zip(got[:3], want):
    np.testing.assert_allclose(g, w, rtol=1e-5)
  np.testing.assert_array_equal(got[3], 0.0)
  # By hand for code 1: N = 0.9 + 0.3 = 1.2, m = [0.9 + 0.3, 0.72 + 0.3].
  np.testing.assert_allclose(got[1][1], 1.2, rtol=1e-6)
  np.testing.assert_allclose(got[2][1], [1.2, 1.02], rtol=1e-6)


def test_dead_codes_restart_from_the_batch_encoder_outputs():
  rng = np.random.default_rng(0)
  k, d = 16, 4
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  size = np.full((k,), 1.0, np.float32)
  size[:3] = 0.01  # will stay under the threshold unless used
  z = (rng.normal(size=(40, d)) * 0.1 + codebook[5]).astype(np.float32)
  idx = np.asarray(q.nearest_code(jnp.asarray(z), jnp.asarray(codebook)))
  assert set(idx.tolist()) == {5}
  kw = dict(decay=0.9, eps=1e-5, dead_threshold=0.5)
  new, n, m, dead = q.ema_codebook_update(
      jnp.asarray(codebook), size, codebook, z, idx,
      rng=jax.random.PRNGKey(1), **kw)
  ref = q.ema_codebook_update(jnp.asarray(codebook), size, codebook, z, idx,
                              decay=0.9, eps=1e-5)
  dead = np.asarray(dead).astype(bool)
  want_dead = np.asarray(ref[1]) < 0.5
  np.testing.assert_array_equal(dead, want_dead)
  assert dead[:3].all() and not dead[5]
  for j in np.flatnonzero(dead):  # each restarted code is a row of z
    assert np.min(np.max(np.abs(z - np.asarray(new)[j]), axis=1)) == 0.0
    np.testing.assert_array_equal(np.asarray(m)[j], np.asarray(new)[j])
    assert float(n[j]) == 1.0
  keep = ~dead
  np.testing.assert_allclose(np.asarray(new)[keep], np.asarray(ref[0])[keep])
  # Deterministic given the rng.
  again = q.ema_codebook_update(jnp.asarray(codebook), size, codebook, z, idx,
                                rng=jax.random.PRNGKey(1), **kw)
  np.testing.assert_array_equal(again[0], new)
  with pytest.raises(ValueError, match="rng"):
    q.ema_codebook_update(jnp.asarray(codebook), size, codebook, z, idx, **kw)


def test_ema_module_writes_the_pure_update_and_commitment_only():
  mod = q.FactorizedQuantizer(8, 6, code_dim=3, l2=True, update="ema",
                              dead_threshold=0.5, ema_decay=0.8)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 6)),
                  jnp.float32)
  v = mod.init(jax.random.PRNGKey(0), z)
  assert set(v["quantizer_stats"]) == {"cluster_size", "embed_sum", "codebook"}
  rngs = {"quantizer": jax.random.PRNGKey(3)}
  (z_q, loss, idx), upd = mod.apply(v, z, train=True, mutable=["quantizer_stats"],
                                    rngs=rngs)
  p = v["params"]
  ze = q.l2_normalize(z @ p["proj"]["proj_in"]["kernel"] +
                      p["proj"]["proj_in"]["bias"])
  st = v["quantizer_stats"]
  want = q.ema_codebook_update(
      q.l2_normalize(p["embedding"]), st["cluster_size"], st["embed_sum"], ze,
      idx, decay=0.8, eps=1e-5, dead_threshold=0.5, l2=True,
      rng=jax.random.PRNGKey(3))
  s = upd["quantizer_stats"]
  np.testing.assert_allclose(s["codebook"], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s["cluster_size"], want[1], rtol=1e-6)
  # The codebook gets no gradient: the EMA owns it.
  g = jax.grad(lambda p: mod.apply({**v, "params": p}, z)[1])(p)
  assert float(jnp.max(jnp.abs(g["embedding"]))) == 0.0
  # Inference needs the parameters only.
  out = mod.apply({"params": p}, z)
  np.testing.assert_array_equal(out[2], idx)
  merged = q.with_ema_codebooks({"quantize": p}, {"quantize": s})
  np.testing.assert_array_equal(merged["quantize"]["embedding"], s["codebook"])


def test_ema_stats_follow_codes_loaded_from_a_checkpoint():
  cb = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  stats = {"quantize": {"cluster_size": jnp.full((8,), 7.0),
                        "embed_sum": jnp.zeros((8, 3)),
                        "codebook": jnp.zeros((8, 3))}}
  out = q.ema_stats_from_params({"quantize": {"embedding": cb}}, stats, l2=True)
  np.testing.assert_array_equal(out["quantize"]["codebook"], cb)
  np.testing.assert_allclose(out["quantize"]["embed_sum"], q.l2_normalize(cb))
  np.testing.assert_array_equal(out["quantize"]["cluster_size"], np.ones(8))


# ----------------------------------------------------------------------------
# Rotation trick


def test_rotation_trick_hand_example():
  z = jnp.array([[1.0, 0.0]])
  z_q = jnp.array([[0.0, 2.0]])
  np.testing.assert_allclose(q.rotation_trick(z, z_q), z_q, atol=1e-6)
  # R maps e=(1,0) to q=(0,1): R = [[0,-1],[1,0]]; lambda = |z_q|/|z| = 2.
  # d<g, out>/dz = lambda R^T g = 2 (0, -1) for g = (1, 0); straight-through
  # would give g itself.
  g = jax.grad(lambda z: jnp.sum(q.rotation_trick(z, z_q) * jnp.array([1., 0.])))(z)
  np.testing.assert_allclose(g, [[0.0, -2.0]], atol=1e-6)
  g_ste = jax.grad(lambda z: jnp.sum(q.straight_through(z, z_q) * jnp.array([1., 0.])))(z)
  np.testing.assert_allclose(g_ste, [[1.0, 0.0]])


def test_rotation_trick_forward_equals_straight_through_and_gradient_is_rotated():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(10, 5)).astype(np.float32)
  z_q = rng.normal(size=(10, 5)).astype(np.float32)
  w = rng.normal(size=(10, 5)).astype(np.float32)
  np.testing.assert_allclose(q.rotation_trick(z, z_q),
                             q.straight_through(z, z_q), atol=2e-5)
  g = np.asarray(jax.grad(lambda z: jnp.sum(q.rotation_trick(z, z_q) * w))(
      jnp.asarray(z)))
  for i in range(10):
    e = z[i] / np.linalg.norm(z[i])
    c = z_q[i] / np.linalg.norm(z_q[i])
    r = (e + c) / np.linalg.norm(e + c)
    rot = np.eye(5) - 2 * np.outer(r, r) + 2 * np.outer(c, e)
    np.testing.assert_allclose(rot @ rot.T, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(rot @ e, c, atol=1e-5)
    lam = np.linalg.norm(z_q[i]) / np.linalg.norm(z[i])
    np.testing.assert_allclose(g[i], lam * rot.T @ w[i], rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(g - w)) > 0.1  # not straight-through


# ----------------------------------------------------------------------------
# The VQGAN and its config


def test_default_vqgan_keeps_the_reference_quantizer():
  model = vqgan_lib.VQGAN(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), resolution=16, z_channels=32,
                          n_embed=16, embed_dim=8)
  v = jax.jit(lambda r: vqgan_lib.init_variables(model, r))(
      jax.random.PRNGKey(0))
  assert set(v) == {"params"}
  assert set(v["params"]["quantize"]) == {"embedding"}
  # The general module with default options is the same function.
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 8)),
                  jnp.float32)
  params = {"embedding": v["params"]["quantize"]["embedding"]}
  ref = q.VectorQuantizer(16, 8).apply({"params": params}, z)
  gen = q.FactorizedQuantizer(16, 8).apply({"params": params}, z)
  for a, b in zip(ref, gen):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("opts", [
    dict(quantizer="fsq", quantizer_options=dict(levels=(4, 4, 4)),
         n_embed=64),
    dict(quantizer="lfq", n_embed=64,
         quantizer_options=dict(entropy_weight=0.1)),
    dict(quantizer_options=dict(codebook_dim=8, l2_codes=True,
                                codebook_update="ema", dead_code_threshold=0.5,
                                quantizer_grad="rotation"), n_embed=64),
])
def test_option_models_encode_and_decode_indices_consistently(opts):
  model = vqgan_lib.VQGAN(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), resolution=16, z_channels=32,
                          embed_dim=8, **opts)
  params = jax.jit(lambda r: vqgan_lib.init_variables(model, r))(
      jax.random.PRNGKey(0))["params"]
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)),
                  jnp.float32)
  z_q, aux = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                              method=model.encode))(params, x)
  idx = aux["indices"]
  assert idx.shape == (2, 8, 8) and int(idx.max()) < 64
  np.testing.assert_allclose(
      model.apply({"params": params}, idx, method=model.indices_to_latents),
      z_q, atol=1e-5)
  cfg = vqgan_lib.model_config(model)
  assert vqgan_lib.from_config(cfg) == model


@pytest.mark.parametrize("opts, message", [
    (dict(quantizer="fsq", quantizer_options=dict(fsq=dict(levels=(4, 4))),
          n_embed=64), r"quantizer_options\.fsq\.levels"),
    (dict(quantizer="lfq", n_embed=48), "power of two"),
    (dict(quantizer="gumbel", quantizer_options=dict(gumbel=dict(
        l2_codes=True))), r"quantizer_options\.gumbel\.l2_codes"),
    (dict(quantizer="fsq", n_embed=500, quantizer_options=dict(fsq=dict(
        codebook_update="ema"))), "codebook_update"),
    (dict(quantizer_options=dict(vq=dict(quantizer_grad="straight"))),
     "quantizer_grad"),
    (dict(quantizer_options=dict(vq=dict(codebook_update="kmeans"))),
     "codebook_update"),
    # A quantizer option set where it sat before it moved names its place.
    (dict(codebook_update="ema"),
     r"config\.model\.codebook_update is now "
     r"config\.model\.quantizer_options\.vq\.codebook_update"),
    (dict(quantizer="fsq", fsq_levels=(4, 4, 4)),
     r"quantizer_options\.fsq\.levels"),
])
def test_bad_quantizer_options_are_named(opts, message):
  c = tu.load_config("digits_vqgan", "test")
  c.model.update(opts)
  from vqgan_jax.training import schema
  with pytest.raises(ValueError, match=message):
    schema.check_vqgan(c)


# ----------------------------------------------------------------------------
# The registry of families and the model.json of older runs


def test_registry_declares_each_family_once_and_the_config_holds_its_options():
  from vqgan_jax.training import schema
  assert q.names() == ("vq", "gumbel", "fsq", "lfq")
  model_cfg = schema.vqgan_config().model
  assert model_cfg.quantizer_options.to_dict() == q.config_defaults()
  for name, spec in q.REGISTRY.items():
    assert spec.name == name
    hash(tuple(spec.options.items()))  # hashable defaults (module fields)
    n = 1000 if name == "fsq" else 1024  # prod of fsq's default levels
    spec.check(q.resolve(name, {}), n, q.options_path(name))
    # Building the model from the config form keeps only this family's
    # options, all of them, and the model round-trips through its config.
    model = vqgan_lib.VQGAN(quantizer=name, n_embed=n,
                            quantizer_options=q.config_defaults())
    assert dict(model.quantizer_options) == dict(spec.options)
    assert vqgan_lib.from_config(vqgan_lib.model_config(model)) == model
    hash(model)


def _old_model_json(**quantizer_fields):
  """The model config of a model.json written when the quantizer options
  were flat VQGAN fields (every one of them present, as to_config wrote)."""
  cfg = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
             attn_resolutions=[], dropout=0.0, in_channels=3, resolution=16,
             z_channels=32, n_embed=64, embed_dim=8, quantizer="vq", beta=0.25,
             legacy_loss=True, kl_weight=1e-8, temperature=1.0,
             gumbel_noisy_inference=False, codebook_dim=0, l2_codes=False,
             codebook_update="loss", codebook_ema_decay=0.99,
             codebook_ema_eps=1e-5, dead_code_threshold=0.0,
             entropy_weight=0.0, entropy_temperature=0.01,
             fsq_levels=[8, 5, 5, 5], quantizer_grad="ste", dtype="float32",
             param_dtype="float32")
  cfg.update(quantizer_fields)
  return cfg


@pytest.mark.parametrize("fields, options", [
    (dict(legacy_loss=False, codebook_update="ema", l2_codes=True,
          codebook_dim=4, fsq_levels=[4, 4, 4]),
     dict(q.vq.OPTIONS, legacy_loss=False, codebook_update="ema",
          l2_codes=True, codebook_dim=4)),
    (dict(quantizer="fsq", fsq_levels=[4, 4, 4], legacy_loss=False,
          quantizer_grad="rotation"),
     dict(q.fsq.OPTIONS, levels=(4, 4, 4), quantizer_grad="rotation")),
    (dict(quantizer="gumbel", embed_dim=32, kl_weight=1e-3,
          gumbel_noisy_inference=True),
     dict(kl_weight=1e-3, temperature=1.0, noisy_inference=True)),
])
def test_flat_old_style_model_json_loads_into_quantizer_options(
    tmp_path, fields, options):
  from vqgan_jax import checkpoint as ckpt_lib
  cfg = _old_model_json(**fields)
  built = vqgan_lib.from_config(cfg)
  variables = jax.jit(lambda r: vqgan_lib.init_variables(built, r))(
      jax.random.PRNGKey(0))
  ckpt_lib.save_pretrained(str(tmp_path), "vqgan", cfg,
                           {"params": variables["params"]}, {})
  assert "fsq_levels" in json.load(open(tmp_path / "model.json"))["config"]
  model, loaded = ckpt_lib.load_vqgan(str(tmp_path))
  assert model.quantizer == cfg["quantizer"]
  assert dict(model.quantizer_options) == options
  assert model == built
  # The parameter tree is the one the model builds.
  assert jax.tree.structure(loaded["params"]) == jax.tree.structure(
      variables["params"])
  # The new model.json has the options grouped, and reads back the same.
  new = vqgan_lib.model_config(model)
  assert "codebook_update" not in new and new["quantizer_options"] == {
      k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
  assert vqgan_lib.from_config(new) == model


# ----------------------------------------------------------------------------
# Replica agreement of the EMA codebook under 8 simulated devices

REPLICAS = r"""
import json
import jax, numpy as np, optax
from vqgan_jax_testing import train_utils as tu
from vqgan_jax import sharding
from vqgan_jax.training import vqgan_trainer as vt
c = tu.load_config("digits_vqgan", "test")
c.model.quantizer_options.vq.update(dict(
    codebook_update="ema", codebook_dim=4, l2_codes=True,
    dead_code_threshold=12.0, codebook_ema_decay=0.5, entropy_weight=0.05,
    entropy_temperature=1.0))
# (At temperature 0.01 the entropy term is stiff enough that SGD amplifies
# float round-off between the two meshes to ~1e-2 within three steps; one
# step still agrees to 1e-6.)
rng = np.random.default_rng(0)
batches = [rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32) for _ in range(3)]
out = {}
for name, spec, devs in [("one", {"data": 1}, jax.devices()[:1]),
                         ("mesh", {"data": 8}, jax.devices())]:
  mesh = sharding.make_mesh(spec, devs)
  run = vt.create(c, mesh, tx=(optax.sgd(0.05), optax.sgd(0.05)))
  state = run.init_fn(jax.random.PRNGKey(0))
  start = np.asarray(state["params"]["quantize"]["embedding"])
  for b in batches:
    state, m = run.step_fn(state, {"image": jax.device_put(b, run.batch_sharding)},
                           run.lpips_vars)
  book = state["params"]["quantize"]["embedding"]
  shards = [np.asarray(s.data) for s in book.addressable_shards]
  stats = state["quantizer_stats"]["quantize"]
  out[name] = dict(
      book=np.asarray(book).tolist(), moved=float(np.max(np.abs(np.asarray(book) - start))),
      n_shards=len(shards), same=all(np.array_equal(s, shards[0]) for s in shards),
      full=all(s.shape == np.asarray(book).shape for s in shards),
      stats_book=np.asarray(stats["codebook"]).tolist(),
      sizes=np.asarray(stats["cluster_size"]).tolist())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_ema_codebook_agrees_on_8_devices_and_across_replicas():
  r = tu.run_python(REPLICAS, devices=8)
  res = json.loads(r.stdout.strip().splitlines()[-1])
  one, mesh = res["one"], res["mesh"]
  assert mesh["n_shards"] == 8 and mesh["full"] and mesh["same"], mesh["n_shards"]
  assert one["moved"] > 1e-3  # the EMA (and restarts) changed the codebook
  np.testing.assert_array_equal(mesh["book"], mesh["stats_book"])
  np.testing.assert_allclose(mesh["book"], one["book"], atol=1e-5)
  np.testing.assert_allclose(mesh["sizes"], one["sizes"], rtol=1e-5, atol=1e-6)
  # Some codes were restarted in the last step: their EMA count fell under
  # 12 (about the mean count, 512 vectors over 32 codes) and was reset to 1.
  assert 1.0 in one["sizes"] and 1.0 in mesh["sizes"]


# ----------------------------------------------------------------------------
# The digits comparison script


@pytest.mark.parametrize("arg", ["", "test"])
def test_comparison_options_are_valid_configs_with_the_same_codebook_size(arg):
  from benchmarks.ablations import digits_quantizers as dq
  from vqgan_jax.training import schema
  n = dq.make_config(arg, {}, 10, 0).model.n_embed
  for name, opt in dq.options(n).items():
    c = dq.make_config(arg, opt, 10, 0)
    schema.check_vqgan(c)
    assert c.model.n_embed == n and c.num_train_steps == 10, name
  assert dq.fsq_levels_for(64) == (4, 4, 4) and dq.fsq_levels_for(32) == (4, 4, 2)


@pytest.mark.slow
def test_comparison_script_runs_and_reports_the_eval_rows(tmp_path):
  r = tu.run_python(["-m", "benchmarks.ablations.digits_quantizers",
                     f"--workdir={tmp_path}", "--steps=2", "--config_arg=test",
                     "--options=l2_ema_restart"])
  results = json.load(open(tmp_path / "results.json"))
  assert [x["name"] for x in results] == ["l2_ema_restart"]
  for x in results:
    row = [m for m in tu.rows(str(tmp_path / x["name"])) if "eval_psnr" in m][-1]
    assert x["step"] == 2 and x["eval_psnr"] == row["eval_psnr"]
    assert 0 < x["eval_codebook_usage"] <= 1 and x["eval_perplexity"] >= 1
    assert f"| {x['name']} |" in r.stdout
