"""Tests of vqgan_jax.sampling against the reference samplers (float32, tiny).

Properties protected:
  * greedy sampling with the key/value cache gives exactly the reference's
    tokens (`sample_with_past` and `Net2NetTransformer.sample`);
  * filtered probabilities equal the reference filter's within 1e-5;
  * sampling a known distribution with top-k / top-p reproduces the expected
    frequencies (chi-square goodness of fit at significance level 0.001);
  * the decode loop feeds each token at the right position, across segments;
  * changing temperature / top_k / top_p / guidance does not recompile;
  * classifier-free guidance equals a step-by-step full-forward computation;
  * the sliding window follows the reference's placement rule.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax import gpt as gpt_lib
from vqgan_jax import guidance
from vqgan_jax import sampling
from vqgan_jax import sliding_window
from vqgan_jax.keymaps import gpt as gpt_keymap

CONFIG = dict(vocab_size=23, block_size=24, n_layer=2, n_head=2, n_embd=16)
SIGNIFICANCE = 1e-3  # chi-square tests reject fits with p-value below this


@pytest.fixture(scope="module")
def torch():
  return oracle.torch()


@pytest.fixture(scope="module")
def models(torch):
  """(reference GPT, our GPT, variables) with O(1) activations."""
  oracle.taming()
  from taming.modules.transformer.mingpt import GPT as RefGPT
  torch.manual_seed(0)
  ref = RefGPT(**CONFIG).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name in ("pos_emb", "tok_emb.weight"):
        p.normal_(0.0, 1.0)
      elif p.ndim == 2:
        p.normal_(0.0, p.shape[1] ** -0.5)
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model = gpt_lib.GPT(**CONFIG)
  return ref, model, {"params": gpt_keymap.params_from_state_dict(state)}


def _prefix(batch=3, length=2, seed=0):
  return np.random.RandomState(seed).randint(
      0, CONFIG["vocab_size"], (batch, length)).astype(np.int32)


# ----------------------------------------------------------------------------
# Parity with the reference samplers.
# ----------------------------------------------------------------------------


def test_greedy_matches_reference_samplers(torch, models):
  ref, model, variables = models
  from taming.models.cond_transformer import Net2NetTransformer
  from taming.modules.transformer.mingpt import sample_with_past
  prefix, steps = _prefix(), 20
  c = torch.from_numpy(prefix.astype(np.int64))
  with torch.no_grad():
    with_past = sample_with_past(c, ref, steps=steps,
                                 sample_logits=False).numpy()
  owner = types.SimpleNamespace(transformer=ref, pkeep=1.0)
  no_cache = Net2NetTransformer.sample(
      owner, c[:, :0], c, steps=steps, sample=False).numpy()
  np.testing.assert_array_equal(with_past, no_cache)
  assert len(np.unique(with_past)) > 5  # not a degenerate constant sequence

  key = jax.random.key(0)
  for segments in (1, 3):
    ours = sampling.sample(model, variables, prefix, steps, key, greedy=True,
                           num_segments=segments)
    assert ours.dtype == jnp.int32 and ours.shape == (3, steps)
    np.testing.assert_array_equal(ours, with_past)
  # Stacked (scan) layout samples the same tokens.
  scan_model = model.clone(scan_layers=True)
  stacked = {"params": gpt_keymap.stack_layers(variables["params"], 2)}
  np.testing.assert_array_equal(
      sampling.sample(scan_model, stacked, prefix, steps, key, greedy=True),
      with_past)
  # Filters that keep a single token reduce sampling to greedy decoding.
  np.testing.assert_array_equal(
      sampling.sample(model, variables, prefix, steps, key, top_k=1),
      with_past)
  np.testing.assert_array_equal(
      sampling.sample(model, variables, prefix, steps, key, top_p=1e-6,
                      temperature=0.7),
      with_past)


def _reference_filter(torch, logits, temperature, top_k, top_p):
  """Probabilities after the filter the reference's sample_with_past uses."""
  from transformers import top_k_top_p_filtering
  scaled = torch.from_numpy(np.asarray(logits, np.float32)) / temperature
  filtered = top_k_top_p_filtering(scaled, top_k=top_k, top_p=top_p)
  return torch.softmax(filtered, dim=-1).numpy()


def test_filtered_probabilities_match_reference(torch, models):
  ref, model, variables = models
  from taming.modules.transformer.mingpt import sample_with_past
  prefix, steps = _prefix(seed=1), 21
  with torch.no_grad():
    tokens = sample_with_past(torch.from_numpy(prefix.astype(np.int64)), ref,
                              steps=steps, sample_logits=False).numpy()
  seq = np.concatenate([prefix, tokens[:, :-1]], axis=1)
  # Logits the sampler sees at every step, plus broader random logits.
  step_logits = np.asarray(model.apply(variables, seq))[:, 1:]
  step_logits = step_logits.reshape(-1, CONFIG["vocab_size"])
  random_logits = 3.0 * np.random.RandomState(2).randn(64, 50)
  for logits in (step_logits, random_logits.astype(np.float32)):
    vocab = logits.shape[-1]
    for temperature, top_k, top_p in [(1.0, 5, 0.9), (0.7, 10, 0.5),
                                      (1.3, vocab, 0.95), (1.0, 3, 1.0),
                                      (2.0, 8, 0.3)]:
      expected = _reference_filter(torch, logits, temperature, top_k, top_p)
      ours = jax.nn.softmax(sampling.filter_logits(
          logits, jnp.float32(temperature), jnp.int32(top_k),
          jnp.float32(top_p)))
      np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0,
                                 err_msg=f"T={temperature} k={top_k} "
                                 f"p={top_p}")
      # top-p alone (our API applies it without top-k too).
      expected = _reference_filter(torch, logits, temperature, 0, top_p)
      ours = jax.nn.softmax(sampling.filter_logits(logits, temperature,
                                                   None, top_p))
      np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_top_k_keeps_ties_like_the_reference(torch, models):
  oracle.taming()
  import taming.models.cond_transformer as ref_net  # the oracle; CI installs it
  logits = np.array([[3., 1., 3., 2., 2., 0., 2.],
                     [-1., -1., -1., -1., -1., -1., -1.],
                     [0., -0., 5., -np.inf, 1., 1., -2.]], np.float32)
  for k in range(1, 8):
    expected = ref_net.Net2NetTransformer.top_k_logits(
        None, torch.from_numpy(logits), k).numpy()
    ours = sampling.filter_logits(logits, top_k=k)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected),
                                  err_msg=f"k={k}")


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_top_k_radix_search_is_exact_for_every_digit_width(bits):
  """The k-th largest threshold equals a sort's, with ties, +-0, -inf,
  a constant row, huge and tiny magnitudes, and k below 1 or above V."""
  rng = np.random.default_rng(bits)
  vocab = 300
  logits = rng.standard_normal((8, vocab)).astype(np.float32)
  logits[0, :vocab // 2] = np.round(logits[0, :vocab // 2], 1)  # many ties
  logits[1, :5] = -np.inf
  logits[1, 5], logits[1, 6] = 0.0, -0.0
  logits[2] = 1.5                                                # all equal
  logits[3] *= 1e30
  logits[4] *= 1e-30
  logits[5, :vocab - 1] = -np.inf                                # one finite
  ks = np.array([1, 7, 150, vocab, 0, vocab + 5, 2, 299], np.int32)
  expected = np.stack([
      row >= -np.sort(-row)[np.clip(k, 1, vocab) - 1]
      for row, k in zip(logits, ks)])
  ours = jax.jit(lambda x, k: sampling.top_k_mask(x, k, bits_per_round=bits))(
      logits, ks)
  np.testing.assert_array_equal(np.asarray(ours), expected)
  np.testing.assert_array_equal(  # the backend's default width
      np.asarray(sampling.top_k_mask(logits, ks)), expected)

# ----------------------------------------------------------------------------
# The pure decode loop with fake logits.
# ----------------------------------------------------------------------------


def _fixed_distribution(probs, batch):
  logits = jnp.log(jnp.asarray(probs, jnp.float32))

  def tokens_to_logits(token, state, position):
    del position
    return jnp.broadcast_to(logits, (token.shape[0], logits.shape[0])), state

  return tokens_to_logits, jnp.broadcast_to(logits, (batch, len(probs)))


@pytest.mark.parametrize("case", ["top_k", "top_p", "top_k_top_p_temp"])
def test_sampled_frequencies_follow_filtered_distribution(case):
  probs = np.array([0.3, 0.25, 0.2, 0.15, 0.07, 0.03])
  # Kept sets derived by hand from the rules in API.md.
  if case == "top_k":  # four largest
    kwargs, support, weights = dict(top_k=4), 4, probs
  elif case == "top_p":  # mass before each: 0, .30, .55 < .6; .75 >= .6
    kwargs, support, weights = dict(top_p=0.6), 3, probs
  else:  # T=2: p ~ sqrt(probs); top-5 renormalised; masses before:
    # 0, .255, .488, .696 < .8, then .877 >= .8 -> four kept.
    kwargs, support, weights = (dict(temperature=2.0, top_k=5, top_p=0.8), 4,
                                np.sqrt(probs))
  expected = weights[:support] / weights[:support].sum()
  batch, num_tokens = 500, 10
  fn, first = _fixed_distribution(probs, batch)
  run = jax.jit(lambda rng: sampling.decode_loop(
      fn, None, first, num_tokens, rng,
      **{k: jnp.asarray(v) for k, v in kwargs.items()}))
  tokens = np.asarray(run(jax.random.key(123)))
  counts = np.bincount(tokens.ravel(), minlength=len(probs))
  assert counts[support:].sum() == 0, counts  # filtered tokens never drawn
  n = counts.sum()
  chi2 = float(np.sum((counts[:support] - n * expected) ** 2
                      / (n * expected)))
  p_value = float(jax.scipy.stats.chi2.sf(chi2, support - 1))
  assert p_value > SIGNIFICANCE, (counts, n * expected, p_value)


def test_chi_square_test_has_power():
  """The frequency test rejects a wrong distribution (top-k at T=2 tested
  against the T=1 expectation), so passing it above means something."""
  probs = np.array([0.3, 0.25, 0.2, 0.15, 0.07, 0.03])
  fn, first = _fixed_distribution(probs, 500)
  tokens = np.asarray(sampling.decode_loop(
      fn, None, first, 10, jax.random.key(123), top_k=jnp.int32(4),
      temperature=jnp.float32(2.0)))
  counts = np.bincount(tokens.ravel(), minlength=6)
  assert counts[4:].sum() == 0
  expected = probs[:4] / probs[:4].sum() * counts.sum()
  chi2 = float(np.sum((counts[:4] - expected) ** 2 / expected))
  assert float(jax.scipy.stats.chi2.sf(chi2, 3)) < SIGNIFICANCE


def test_decode_loop_feeds_tokens_at_positions_across_segments():
  vocab, num_tokens, start = 11, 10, 4

  def tokens_to_logits(token, calls, position):
    # The next token is a deterministic function of (token, position).
    target = (3 * token + position) % vocab
    return 10.0 * jax.nn.one_hot(target, vocab), calls + 1

  first = 10.0 * jax.nn.one_hot(jnp.array([2, 5]), vocab)
  seen = []

  def prepare(calls, index):
    seen.append(index)
    return calls

  tokens = sampling.decode_loop(tokens_to_logits, jnp.int32(0), first,
                                num_tokens, jax.random.key(0), greedy=True,
                                start_position=start, segments=(2, 0, 3, 4),
                                prepare_segment=prepare)
  expected = []
  for row in (2, 5):
    seq = [row]
    for t in range(1, num_tokens):
      seq.append((3 * seq[-1] + start + t - 1) % vocab)
    expected.append(seq)
  np.testing.assert_array_equal(tokens, np.array(expected))
  assert seen == [0, 2, 3]
  with pytest.raises(ValueError, match="sum"):
    sampling.decode_loop(tokens_to_logits, jnp.int32(0), first, num_tokens,
                         jax.random.key(0), segments=(3, 3))


def test_segment_plan_covers_every_written_position():
  for steps, segments, prefix_len in [(255, 7, 1), (20, 3, 2), (5, 9, 4)]:
    counts, lengths = sampling.segment_plan(steps, segments, prefix_len)
    assert sum(counts) == steps and min(counts) >= 1
    done = 0
    for count, length in zip(counts, lengths):
      done += count  # last step of the segment writes prefix_len + done - 1
      assert prefix_len + done <= length <= prefix_len + steps
    assert list(lengths) == sorted(lengths)


# ----------------------------------------------------------------------------
# Compilation.
# ----------------------------------------------------------------------------


def test_changing_filters_does_not_recompile(models):
  _, model, variables = models
  prefix = _prefix(batch=2)
  key = jax.random.key(0)
  sampling.sample(model, variables, prefix, 6, key, temperature=1.0,
                  top_k=5, top_p=0.9)
  before = sampling._sample_jit._cache_size()
  outs = [sampling.sample(model, variables, prefix, 6, key, temperature=t,
                          top_k=k, top_p=p)
          for t, k, p in [(0.5, 3, 0.5), (2, 10, 0.99), (1.5, 1, 0.1)]]
  assert sampling._sample_jit._cache_size() == before
  assert not np.array_equal(outs[0], outs[1])  # the values do take effect

  null = _prefix(batch=2, seed=5)
  sampling.sample(model, variables, prefix, 6, key, guidance_scale=1.5,
                  null_prefix=null)
  before = sampling._sample_jit._cache_size()
  sampling.sample(model, variables, prefix, 6, key, guidance_scale=3.0,
                  null_prefix=null, temperature=0.3)
  assert sampling._sample_jit._cache_size() == before


def test_gpu_command_buffers_are_a_compile_option_with_a_fallback(
    models, monkeypatch, caplog):
  """On GPUs `sample` compiles with XLA command buffers (CUDA graphs of the
  decoding loop); the option is per compile, a value XLA rejects falls back
  to a plain compile once and for all, and the tokens are the same."""
  _, model, variables = models
  jits = sampling._SamplerJits()  # its own memory of rejected types
  assert jits.types("cpu") is None
  assert jits.types("gpu") == sampling.GPU_COMMAND_BUFFERS
  assert "WHILE" in sampling.GPU_COMMAND_BUFFERS
  monkeypatch.setattr(sampling, "GPU_COMMAND_BUFFERS", ())
  assert jits.types("gpu") is None
  args = (model, variables, _prefix(batch=2), jax.random.key(3),
          jnp.float32(1.0), jnp.int32(5), jnp.float32(1.0), None, None)
  kw = dict(num_tokens=6, greedy=False, use_top_k=True, use_top_p=False,
            num_segments=2)
  plain = jits(None, *args, **kw)
  # XLA:CPU parses the GPU option (and ignores it): the same program.
  graphs = jits(("FUSION", "WHILE"), *args, **kw)
  np.testing.assert_array_equal(graphs, plain)
  monkeypatch.setattr(sampling, "GPU_COMMAND_BUFFERS", ("FUSION", "BOGUS"))
  bad = jits.types("gpu")
  with caplog.at_level("WARNING"):
    np.testing.assert_array_equal(jits(bad, *args, **kw), plain)
  assert "XLA rejected command buffers FUSION,BOGUS" in caplog.text
  assert jits.types("gpu") is None  # not tried again
  assert jits.rejected == {("FUSION", "BOGUS")}
  # The state is the object's: `sample`'s own and a new one are untouched.
  assert sampling._SamplerJits().types("gpu") == ("FUSION", "BOGUS")
  assert not sampling._SAMPLER_JITS.rejected


# ----------------------------------------------------------------------------
# Classifier-free guidance.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("null_len,schedule", [(2, "constant"), (1, "constant"),
                                              (1, "cosine")])
def test_guidance_matches_step_by_step_computation(models, null_len,
                                                   schedule):
  _, model, variables = models
  prefix = _prefix(batch=2, length=2)
  null = np.zeros((1, null_len), np.int32)
  scale, steps = 2.5, 8
  interval = None if schedule == "constant" else (0.2, 0.9)
  ours = sampling.sample(model, variables, prefix, steps, jax.random.key(0),
                         greedy=True, guidance_scale=scale, null_prefix=null,
                         guidance_schedule=schedule,
                         guidance_interval=interval)
  scales = guidance.guidance_scales(scale, steps, schedule,
                                    interval=interval)
  cond, uncond = prefix, np.repeat(null, 2, axis=0)
  # Full forward passes without a cache; sequences are right-padded to one
  # length (causal attention: the padding does not affect earlier logits).
  forward = jax.jit(lambda seq: model.apply(variables, seq))

  def last_logits(seq):
    padded = np.pad(seq, ((0, 0), (0, CONFIG["block_size"] - seq.shape[1])))
    return np.asarray(forward(padded))[:, seq.shape[1] - 1]

  for t in range(steps):
    lc, lu = last_logits(cond), last_logits(uncond)
    token = np.argmax(lu + scales[t] * (lc - lu), axis=-1).astype(np.int32)
    np.testing.assert_array_equal(ours[:, t], token, err_msg=f"step {t}")
    cond = np.concatenate([cond, token[:, None]], axis=1)
    uncond = np.concatenate([uncond, token[:, None]], axis=1)
  # Guidance really changes the result compared with plain conditioning.
  plain = sampling.sample(model, variables, prefix, steps, jax.random.key(0),
                          greedy=True)
  assert not np.array_equal(plain, ours)
  with pytest.raises(ValueError):
    sampling.sample(model, variables, prefix, steps, jax.random.key(0),
                    guidance_scale=scale)


def test_guidance_schedule_values():
  r = np.arange(5) / 4
  np.testing.assert_allclose(guidance.guidance_scales(3.0, 5), [3.0] * 5)
  np.testing.assert_allclose(guidance.guidance_scales(3.0, 5, "linear"),
                             1 + 2 * r, rtol=1e-6)
  np.testing.assert_allclose(
      guidance.guidance_scales(3.0, 5, "power", power=3.0), 1 + 2 * r ** 3,
      rtol=1e-6)
  np.testing.assert_allclose(guidance.guidance_scales(3.0, 5, "cosine"),
                             [1.0, 1 + (1 - 0.5 ** 0.5), 2.0,
                              1 + (1 + 0.5 ** 0.5), 3.0], rtol=1e-6)
  np.testing.assert_allclose(
      guidance.guidance_scales(3.0, 5, "linear", interval=(0.25, 0.5)),
      [1.0, 1.5, 2.0, 1.0, 1.0], rtol=1e-6)
  assert guidance.guidance_scales(2.0, 1, "linear").tolist() == [1.0]
  for bad in (dict(schedule="exp"), dict(power=0.0),
              dict(interval=(0.5, 0.2)), dict(interval=(0.0, 1.5))):
    with pytest.raises(ValueError):
      guidance.guidance_scales(2.0, 4, **bad)


def test_constant_schedule_as_table_is_bit_identical(models):
  """A per-token table of one scale (interval [0, 1]) samples exactly the
  tokens of the scalar path, with sampling, top-k and top-p."""
  _, model, variables = models
  prefix, null = _prefix(batch=4, length=2), np.zeros((1, 1), np.int32)
  kwargs = dict(guidance_scale=2.0, null_prefix=null, top_k=9, top_p=0.9)
  scalar = sampling.sample(model, variables, prefix, 12, jax.random.key(5),
                           **kwargs)
  table = sampling.sample(model, variables, prefix, 12, jax.random.key(5),
                          guidance_interval=(0.0, 1.0), **kwargs)
  np.testing.assert_array_equal(table, scalar)


# ----------------------------------------------------------------------------
# Sliding window.
# ----------------------------------------------------------------------------


def _reference_rule(i, size, window):
  """The rule as REFERENCE.md states it ("High resolution"), for w = 16:
  local row = i if i <= 8, 16 - (H - i) if H - i < 8, else 8."""
  half = window / 2
  if i <= half:
    local = i
  elif size - i < half:
    local = window - (size - i)
  else:
    local = half
  return int(i - local), int(local)


def test_window_position_equals_reference_rule():
  for window in (16, 8, 4):
    for size in (window, window + 1, window + 7, 2 * window, 3 * window + 5):
      for i in range(size):
        expected = _reference_rule(i, size, window)
        assert sliding_window.window_position(i, size, window) == expected
        traced = jax.jit(sliding_window.window_position, static_argnums=(1, 2))(
            jnp.int32(i), size, window)
        assert tuple(int(v) for v in traced) == expected
        start, local = expected
        assert 0 <= start and start + window <= size and 0 <= local < window


@pytest.fixture(scope="module")
def window_model():
  model = gpt_lib.GPT(vocab_size=11, block_size=256, n_layer=1, n_head=2,
                      n_embd=16)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))
  # Large random weights so that greedy choices depend on the context.
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  leaves = [jax.random.normal(k, x.shape) * (x.shape[0] ** -0.5 if x.ndim == 2
                                             else 1.0)
            for k, x in zip(keys, leaves)]
  return model, jax.tree.unflatten(tree, leaves)


def test_sliding_window_large_grid(window_model):
  model, variables = window_model
  cond = np.array([[7]], np.int32)
  grid = sliding_window.sample_sliding_window(model, variables, cond, (32, 48),
                                        (16, 16), jax.random.key(0), top_k=5)
  assert grid.dtype == jnp.int32 and grid.shape == (1, 32, 48)
  assert int(grid.min()) >= 0 and int(grid.max()) < 11
  assert len(np.unique(np.asarray(grid))) > 3

  greedy = np.asarray(sliding_window.sample_sliding_window(
      model, variables, cond, (32, 48), (16, 16), None, greedy=True))
  # Recompute some targets by hand: crop the window the reference rule
  # places, run the model on [cond | window], argmax at the local position.
  for i, j in [(0, 0), (3, 40), (8, 9), (20, 10), (25, 47), (31, 47)]:
    top, li = _reference_rule(i, 32, 16)
    left, lj = _reference_rule(j, 48, 16)
    window = greedy[:, top:top + 16, left:left + 16].reshape(1, -1)
    seq = np.concatenate([cond, window], axis=1)[:, :-1]
    logits = np.asarray(model.apply(variables, seq))
    assert greedy[0, i, j] == np.argmax(logits[0, li * 16 + lj]), (i, j)


def test_sliding_window_equals_sample_when_grid_fits(window_model):
  model, variables = window_model
  cond = np.array([[2], [9]], np.int32)
  grid = sliding_window.sample_sliding_window(model, variables, cond, (16, 16),
                                        (16, 16), None, greedy=True)
  flat = sampling.sample(model, variables, cond, 256, None, greedy=True)
  np.testing.assert_array_equal(np.asarray(grid).reshape(2, -1), flat)


def test_sliding_window_spatial_conditioning_no_recompile():
  model = gpt_lib.GPT(vocab_size=7, block_size=31, n_layer=1, n_head=1,
                      n_embd=8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  variables = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape)
                                        for k, x in zip(keys, leaves)])
  cond = np.random.RandomState(0).randint(0, 7, (1, 6, 9)).astype(np.int32)
  grid = np.asarray(sliding_window.sample_sliding_window(
      model, variables, cond, (6, 9), (4, 4), None, greedy=True))
  for i, j in [(0, 0), (2, 4), (5, 8), (3, 1)]:
    top, li = _reference_rule(i, 6, 4)
    left, lj = _reference_rule(j, 9, 4)
    crop = lambda a: a[:, top:top + 4, left:left + 4].reshape(1, -1)
    seq = np.concatenate([crop(cond), crop(grid)], axis=1)[:, :-1]
    logits = np.asarray(model.apply(variables, seq))
    assert grid[0, i, j] == np.argmax(logits[0, 15 + li * 4 + lj]), (i, j)
  sliding_window.sample_sliding_window(model, variables, cond, (6, 9), (4, 4),
                                 jax.random.key(0), top_k=3, top_p=0.9)
  before = sliding_window._sliding_jit._cache_size()
  sliding_window.sample_sliding_window(model, variables, cond, (6, 9), (4, 4),
                                 jax.random.key(1), top_k=5, top_p=0.5,
                                 temperature=0.5)
  assert sliding_window._sliding_jit._cache_size() == before
