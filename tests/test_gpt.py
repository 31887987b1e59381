"""Parity of vqgan_jax.gpt with the reference minGPT (float32, tiny configs).

Properties protected:
  * logits equal the reference GPT's within 1e-4 (both layer layouts, with
    and without n_unmasked), after converting its state dict;
  * decoding with the key/value cache reproduces the full-forward logits at
    every position within 1e-4;
  * the weight-decay mask equals the reference's decay / no-decay grouping;
  * conversion errors name the offending keys and shapes;
  * the loss helpers equal torch's cross-entropy;
  * the gradients of the token loss equal the reference's (loss.backward())
    within 1e-4 of each tensor's largest entry;
  * `gelu_exact` has jax.nn.gelu's values bit for bit, its gradient and
    forward-mode derivative within 1e-6 (float32), keeps one tensor for the
    backward pass where autodiff keeps three, and in bfloat16 gives a
    gradient nearer the float32 one than autodiff's;
  * the lean norms give flax's values and gradients (1e-6) and keep no
    float32 tensor of the residual stream's size for the backward pass of a
    bfloat16 block (flax's keep six).
"""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax import convert
from vqgan_jax import gpt as gpt_lib
from vqgan_jax import gpt_layers
from vqgan_jax import kv_cache
from vqgan_jax import losses
from vqgan_jax.keymaps import gpt as gpt_keymap
from vqgan_jax.training import transformer_trainer as tt

TOL = 1e-4
CONFIG = dict(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def torch():
  return oracle.torch()


def reference_gpt(torch, seed=0, **overrides):
  """A random reference minGPT whose activations are O(1).

  The reference's own init (N(0, 0.02), zero pos_emb, unit LayerNorms) keeps
  activations so small that e.g. a tanh-GELU or a wrong LayerNorm eps would
  stay below the tolerance; weights of scale 1/sqrt(fan_in), a random
  pos_emb and perturbed LayerNorms/biases make such mistakes visible.
  """
  oracle.taming()
  from taming.modules.transformer.mingpt import GPT as RefGPT
  torch.manual_seed(seed)
  ref = RefGPT(**{**CONFIG, **overrides}).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name in ("pos_emb", "tok_emb.weight"):
        p.normal_(0.0, 1.0)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif ".ln" in name or name.startswith("ln_f"):
        p.normal_(1.0, 0.2)
      else:  # Linear weights (out, in)
        p.normal_(0.0, p.shape[1] ** -0.5)
  return ref


def state_dict_numpy(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def reference_logits(torch, ref, tokens):
  with torch.no_grad():
    return ref(torch.from_numpy(np.asarray(tokens, np.int64)))[0].numpy()


@pytest.mark.parametrize("n_unmasked", [0, 5])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_reference(torch, n_unmasked, scan_layers):
  ref = reference_gpt(torch, n_unmasked=n_unmasked)
  model = gpt_lib.GPT(**CONFIG, n_unmasked=n_unmasked,
                      scan_layers=scan_layers)
  params = gpt_keymap.params_from_state_dict(state_dict_numpy(ref),
                                             scan_layers=scan_layers)
  # The converted tree has exactly the structure and shapes of model.init.
  tokens = np.random.RandomState(1).randint(0, CONFIG["vocab_size"], (2, 24))
  init = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  assert (jax.tree.structure(init) == jax.tree.structure(params))
  assert all(jax.tree.leaves(
      jax.tree.map(lambda a, b: a.shape == b.shape, init, params)))

  ours = model.apply({"params": params}, tokens)
  assert ours.dtype == jnp.float32 and ours.shape == (2, 24, 37)
  theirs = reference_logits(torch, ref, tokens)
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  # Shorter sequences use the first positions of pos_emb.
  np.testing.assert_allclose(model.apply({"params": params}, tokens[:, :7]),
                             reference_logits(torch, ref, tokens[:, :7]),
                             atol=TOL, rtol=0)


def test_n_unmasked_is_not_causal(torch):
  """With n_unmasked, early logits depend on later tokens inside the block."""
  ref = reference_gpt(torch, n_unmasked=5)
  model = gpt_lib.GPT(**CONFIG, n_unmasked=5)
  params = {"params": gpt_keymap.params_from_state_dict(
      state_dict_numpy(ref))}
  a = np.zeros((1, 10), np.int32)
  b = a.copy()
  b[0, 4] = 3
  la, lb = model.apply(params, a), model.apply(params, b)
  assert np.abs(la[0, 0] - lb[0, 0]).max() > 1e-4  # position 0 sees 4
  np.testing.assert_allclose(la[0, 0], reference_logits(torch, ref, a)[0, 0],
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("scan_layers,n_unmasked", [(False, 0), (True, 3)])
def test_cached_decoding_matches_full_forward(torch, scan_layers, n_unmasked):
  ref = reference_gpt(torch, seed=2, n_unmasked=n_unmasked)
  model = gpt_lib.GPT(**CONFIG, n_unmasked=n_unmasked,
                      scan_layers=scan_layers)
  variables = {"params": gpt_keymap.params_from_state_dict(
      state_dict_numpy(ref), scan_layers=scan_layers)}
  tokens = np.random.RandomState(3).randint(0, 37, (3, 24)).astype(np.int32)
  full = np.asarray(model.apply(variables, tokens))
  prefix_len = 4  # >= n_unmasked, as in the reference's cached sampler
  cache = kv_cache.init_cache(model, 3, 24)
  step = jax.jit(lambda tok, cache, pos: model.apply(
      variables, tok, cache=cache, position=pos))
  logits, cache = model.apply(variables, tokens[:, :prefix_len], cache=cache,
                              position=0)
  np.testing.assert_allclose(logits, full[:, :prefix_len], atol=TOL, rtol=0)
  for pos in range(prefix_len, 24):
    logits, cache = step(tokens[:, pos:pos + 1], cache, pos)
    np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=TOL, rtol=0,
                               err_msg=f"position {pos}")
  # A shorter buffer (what segmented sampling uses) gives the same logits.
  short = kv_cache.resize_cache(cache, 12)
  assert kv_cache.cache_length(short) == 12
  logits, _ = model.apply(variables, tokens[:, 11:12],
                          cache=kv_cache.resize_cache(short, 12), position=11)
  np.testing.assert_allclose(logits[:, 0], full[:, 11], atol=TOL, rtol=0)
  np.testing.assert_allclose(reference_logits(torch, ref, tokens), full,
                             atol=TOL, rtol=0)


def test_layer_layouts_round_trip(torch):
  params = gpt_keymap.params_from_state_dict(state_dict_numpy(reference_gpt(
      torch)))
  stacked = gpt_keymap.stack_layers(params, CONFIG["n_layer"])
  assert stacked["blocks"]["attn"]["query"]["kernel"].shape == (2, 32, 32)
  back = gpt_keymap.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, params)))


def test_conversion_uses_prefix_and_transposes(torch):
  ref = reference_gpt(torch)
  sd = state_dict_numpy(ref)
  wrapped = {"transformer." + k: v for k, v in sd.items()}
  wrapped["first_stage_model.encoder.conv_in.weight"] = np.zeros((1,))
  params = gpt_keymap.params_from_state_dict(wrapped)
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                sd["blocks.1.mlp.0.weight"].T)
  np.testing.assert_array_equal(params["head"]["kernel"], sd["head.weight"].T)
  np.testing.assert_array_equal(params["blocks_0"]["ln2"]["scale"],
                                sd["blocks.0.ln2.weight"])


def test_conversion_errors_are_explicit(torch):
  sd = state_dict_numpy(reference_gpt(torch))
  bad = dict(sd)
  del bad["blocks.1.attn.value.bias"]
  bad["blocks.0.attn.extra.weight"] = np.zeros((3,))
  bad["blocks.0.mlp.2.weight"] = np.zeros((32, 100), np.float32)
  with pytest.raises(ValueError) as err:
    gpt_keymap.params_from_state_dict(bad)
  msg = str(err.value)
  assert "blocks.1.attn.value.bias" in msg and "missing" in msg
  assert "blocks.0.attn.extra.weight" in msg and "unexpected" in msg
  assert "blocks.0.mlp.2.weight" in msg
  assert "(32, 128)" in msg and "(32, 100)" in msg
  # Checked against a model's own sizes.
  with pytest.raises(ValueError, match="n_layer=3"):
    gpt_keymap.params_from_state_dict(sd, model=gpt_lib.GPT(**{**CONFIG,
                                                               "n_layer": 3}))


def test_weight_decay_mask_matches_reference_groups(torch):
  """The reference's configure_optimizers grouping, mapped by conversion."""
  ref = reference_gpt(torch)
  from taming.models.cond_transformer import Net2NetTransformer
  owner = types.SimpleNamespace(transformer=ref, learning_rate=1e-3)
  optimizer = Net2NetTransformer.configure_optimizers(owner)
  names = {id(p): n for n, p in ref.named_parameters()}
  decayed = set()
  for group in optimizer.param_groups:
    if group["weight_decay"] > 0:
      decayed |= {names[id(p)] for p in group["params"]}
  assert decayed and len(decayed) < len(names)
  # A state dict of ones (decayed) and zeros (not decayed), converted.
  flags = {n: np.full(p.shape, float(n in decayed), np.float32)
           for n, p in ref.named_parameters()}
  for scan_layers in (False, True):
    expected = gpt_keymap.params_from_state_dict(flags,
                                                 scan_layers=scan_layers)
    mask = tt.weight_decay_mask(expected)
    assert jax.tree.structure(mask) == jax.tree.structure(expected)

    def agrees(flag, decay):
      flag = np.asarray(flag)
      assert flag.min() == flag.max()  # one group per tensor
      return bool(flag.max() == 1.0) == decay
    assert all(jax.tree.leaves(jax.tree.map(agrees, expected, mask)))


def test_config_from_reference_builds_the_reference_model(torch):
  yaml_params = {"vocab_size": 37, "block_size": 24, "n_layer": 2,
                 "n_head": 4, "n_embd": 32, "n_unmasked": 5}
  cfg = convert.gpt_config_from_reference(yaml_params)
  assert cfg == {**yaml_params, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
                 "attn_pdrop": 0.0}
  cfg_wrapped = convert.gpt_config_from_reference(
      {"target": "taming.modules.transformer.mingpt.GPT",
       "params": yaml_params})
  assert cfg_wrapped == cfg
  defaults = convert.gpt_config_from_reference({"vocab_size": 5,
                                                "block_size": 7})
  assert (defaults["n_layer"], defaults["n_head"], defaults["n_embd"]) == (
      12, 8, 256)  # the reference GPT's defaults
  with pytest.raises(ValueError, match="bogus"):
    convert.gpt_config_from_reference({**yaml_params, "bogus": 1})
  model = gpt_lib.GPT(**cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  ref = reference_gpt(torch, n_unmasked=5)
  assert count == sum(p.numel() for p in ref.parameters())


def test_dropout_only_in_training(torch):
  model = gpt_lib.GPT(**CONFIG, embd_pdrop=0.1, resid_pdrop=0.1,
                      attn_pdrop=0.1)
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = model.init(jax.random.key(0), tokens)
  a = model.apply(variables, tokens)
  b = model.apply(variables, tokens)
  c = model.apply(variables, tokens, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-6
  init = model.init(jax.random.key(0), tokens)["params"]
  assert np.all(init["pos_emb"] == 0)  # zero-initialised like the reference
  assert abs(float(np.std(init["blocks_0"]["attn"]["query"]["kernel"]))
             - 0.02) < 0.005


def test_token_loss_and_accuracy_match_torch(torch):
  rs = np.random.RandomState(0)
  logits = rs.randn(3, 5, 11).astype(np.float32)
  targets = rs.randint(0, 11, (3, 5))
  expected = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).reshape(-1, 11),
      torch.from_numpy(targets).reshape(-1)).item()
  loss = losses.token_loss(jnp.asarray(logits, jnp.bfloat16), targets)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(losses.token_loss(logits, targets), expected,
                             rtol=1e-6)
  acc = losses.token_accuracy(logits, targets)
  np.testing.assert_allclose(acc, np.mean(logits.argmax(-1) == targets))
  mask = np.zeros((3, 5), np.float32)
  mask[0] = 1
  np.testing.assert_allclose(
      losses.token_loss(logits, targets, mask),
      torch.nn.functional.cross_entropy(torch.from_numpy(logits[0]),
                                        torch.from_numpy(targets[0])).item(),
      rtol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_keeps_logits_and_gradients(torch, scan_layers):
  ref = reference_gpt(torch, seed=4)
  sd = state_dict_numpy(ref)
  params = gpt_keymap.params_from_state_dict(sd, scan_layers=scan_layers)
  tokens = np.random.RandomState(5).randint(0, 37, (2, 12))
  plain = gpt_lib.GPT(**CONFIG, scan_layers=scan_layers)
  remat = plain.clone(remat=True)

  def loss(model, p):
    logits = model.apply({"params": p}, tokens[:, :-1])
    return losses.token_loss(logits, tokens[:, 1:])

  l1, g1 = jax.value_and_grad(functools.partial(loss, plain))(params)
  l2, g2 = jax.value_and_grad(functools.partial(loss, remat))(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert all(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.allclose(a, b, atol=1e-6), g1, g2)))
  # The loss equals the reference's cross-entropy on its own logits.
  with torch.no_grad():
    logits = ref(torch.from_numpy(tokens[:, :-1]))[0]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 37), torch.from_numpy(tokens[:, 1:]).reshape(-1))
  np.testing.assert_allclose(l1, expected.item(), rtol=1e-5)


def test_gradients_match_reference(torch):
  ref = reference_gpt(torch, seed=6).train()  # dropout probabilities are 0
  tokens = np.random.RandomState(7).randint(0, 37, (3, 20))
  logits = ref(torch.from_numpy(tokens[:, :-1]))[0]
  loss_t = torch.nn.functional.cross_entropy(
      logits.reshape(-1, 37), torch.from_numpy(tokens[:, 1:]).reshape(-1))
  loss_t.backward()
  grads_t = {k: p.grad.numpy() for k, p in ref.named_parameters()}
  want = gpt_keymap.params_from_state_dict(grads_t)
  params = gpt_keymap.params_from_state_dict(state_dict_numpy(ref))
  model = gpt_lib.GPT(**CONFIG)

  def loss(p):
    logits = model.apply({"params": p}, tokens[:, :-1])
    return losses.token_loss(logits, tokens[:, 1:])

  value, got = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(value, loss_t.item(), rtol=1e-5)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = np.asarray(flat_want[path])
    # The key bias's gradient is zero up to round-off (a shift shared by a
    # row of scores leaves the softmax unchanged), hence the floor.
    scale = max(float(np.abs(w).max()), 1e-3)
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=TOL * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_gelu_exact_values_derivatives_and_residuals():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 96)) * 3
  t = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  autodiff = functools.partial(jax.nn.gelu, approximate=False)
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = x.astype(dtype)
    np.testing.assert_array_equal(gpt_layers.gelu_exact(xd), autodiff(xd))
  # float32: the same derivative, reverse and forward mode.
  _, vjp_ours = jax.vjp(gpt_layers.gelu_exact, x)
  _, vjp_auto = jax.vjp(autodiff, x)
  np.testing.assert_allclose(vjp_ours(t)[0], vjp_auto(t)[0], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(jax.jvp(gpt_layers.gelu_exact, (x,), (t,))[1],
                             jax.jvp(autodiff, (x,), (t,))[1], rtol=1e-6,
                             atol=1e-6)
  # What the backward pass keeps: x alone, against autodiff's three tensors.
  def kept(vjp):
    return sum(leaf.shape == x.shape for leaf in jax.tree.leaves(vjp))
  assert kept(vjp_ours) == 1 and kept(vjp_auto) == 3
  # bfloat16: the derivative is computed in float32 from x.
  xb, tb = x.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
  truth = jax.vjp(autodiff, xb.astype(jnp.float32))[1](
      tb.astype(jnp.float32))[0]
  def error(fn):
    g = jax.vjp(fn, xb)[1](tb)[0]
    assert g.dtype == jnp.bfloat16
    return float(jnp.mean(jnp.abs(g.astype(jnp.float32) - truth)))
  assert error(gpt_layers.gelu_exact) < 0.8 * error(autodiff)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_lean_norms_keep_values_and_only_their_inputs(norm):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 32))
  lean = gpt_lib.Block(n_head=4, n_embd=32, norm=norm)
  plain = lean.clone(lean_norms=False)
  variables = lean.init(jax.random.PRNGKey(1), x)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(plain.init(jax.random.PRNGKey(1), x)))

  def run(block, dtype):
    block = block.clone(dtype=dtype)
    return jax.vjp(lambda v, x: block.apply(v, x)[0], variables,
                   x.astype(dtype))

  (y1, vjp1), (y2, vjp2) = run(lean, jnp.float32), run(plain, jnp.float32)
  np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
  g = jax.random.normal(jax.random.PRNGKey(2), y1.shape)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               vjp1(g), vjp2(g))

  def kept_float32(vjp):
    return sum(leaf.shape == x.shape and leaf.dtype == jnp.float32
               for leaf in jax.tree.leaves(vjp))
  assert kept_float32(run(lean, jnp.bfloat16)[1]) == 0
  assert kept_float32(run(plain, jnp.bfloat16)[1]) >= 4
