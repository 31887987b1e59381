"""Tests of speculative Jacobi decoding (vqgan_jax.speculative).

Properties protected:
  * greedy decoding gives exactly the plain sampler's tokens, with a class
    (or SOS) prefix, with conditioning codes and with guidance (a null
    prefix of the same and of another length);
  * sampled tokens follow the model's exact distribution: over 4096 samples
    of a tiny GPT (vocabulary 8, 4 tokens), each position's histogram and
    the joint histogram of the first two positions pass a chi-square test
    against the distribution computed by enumerating all 8**4 sequences,
    with top-k, top-p, temperature and guidance; family-wise false-alarm
    rate 1e-3 (Bonferroni over the tests of a run, fixed seed);
  * the same test rejects a subtly wrong acceptance rule (after a
    rejection, resample from p instead of the residual).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import gpt as gpt_lib
from vqgan_jax import sampling
from vqgan_jax import speculative
from vqgan_jax.keymaps import gpt as gpt_keymap

VOCAB, STEPS, SAMPLES = 8, 4, 4096
FAMILY_ALPHA = 1e-3  # false-alarm rate of all chi-square tests of one run
NULL = 0  # the unconditional token


def _model(vocab, block_size, seed):
  """A tiny GPT with large random weights: peaked, context-dependent
  distributions (the default init gives nearly uniform ones)."""
  model = gpt_lib.GPT(vocab_size=vocab, block_size=block_size, n_layer=2,
                      n_head=2, n_embd=32)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))
  paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rs = np.random.RandomState(seed)
  leaves = []
  for path, x in paths:
    # Embeddings N(0, 1), matrices N(0, 1/fan_in), norms and biases as
    # initialised (scale 1, bias 0).
    name = jax.tree_util.keystr(path)
    if "emb" in name:
      leaves.append(rs.randn(*x.shape).astype(np.float32))
    elif x.ndim == 2:
      leaves.append((rs.randn(*x.shape) / x.shape[0] ** 0.5).astype(
          np.float32))
    else:
      leaves.append(np.full(x.shape, "scale" in name, np.float32))
  return model, jax.tree.unflatten(tree, leaves)


# ----------------------------------------------------------------------------
# Greedy: the plain sampler's tokens.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,window", [("class", 4), ("class_guided", 2),
                                         ("codes_guided", 3)])
def test_greedy_equals_plain_sampler(kind, window):
  """Class (or SOS: the same one-token prefix) and conditioning-code
  prefixes; guidance with a null prefix of the same length and of another
  length (with a scheduled scale); the model with scanned layers."""
  model, variables = _model(vocab=13, block_size=24, seed=3)
  rs = np.random.RandomState(0)
  length = 1 if kind.startswith("class") else 4
  prefix = rs.randint(1, 13, (3, length)).astype(np.int32)
  extra = {}
  if kind.endswith("guided"):
    extra = dict(guidance_scale=4.0,
                 null_prefix=np.full((1, 1), NULL, np.int32))
  if kind == "codes_guided":
    extra.update(guidance_schedule="power", guidance_interval=(0.1, 0.9))
  steps = 24 - length
  plain = np.asarray(sampling.sample(model, variables, prefix, steps, None,
                                     greedy=True, **extra))
  if kind == "class":  # the sampler unstacks scanned layers first
    model = model.clone(scan_layers=True)
    variables = {"params": gpt_keymap.stack_layers(variables["params"],
                                                       2)}
  ours = sampling.sample(model, variables, prefix, steps, None, greedy=True,
                         speculative_window=window, **extra)
  np.testing.assert_array_equal(np.asarray(ours), plain)
  assert len(np.unique(plain)) > 3  # not a degenerate sequence
  if kind == "class_guided":  # guidance changes the tokens here
    assert not np.array_equal(plain, np.asarray(sampling.sample(
        model, variables, prefix, steps, None, greedy=True)))


# ----------------------------------------------------------------------------
# Sampling: the model's exact distribution.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
  return _model(vocab=VOCAB, block_size=8, seed=12)


SETTING = dict(temperature=1.0, top_k=6, top_p=0.97, guidance_scale=1.5)
PREFIX = np.array([[3]], np.int32)


def _filtered_log_probs(logits):
  """SETTING's temperature, top-k and top-p in numpy (float64)."""
  logits = logits.astype(np.float64) / SETTING["temperature"]
  kth = -np.sort(-logits, axis=-1)[..., SETTING["top_k"] - 1:SETTING["top_k"]]
  logits = np.where(logits >= kth, logits, -np.inf)
  order = np.argsort(-logits, axis=-1)
  ordered = np.take_along_axis(logits, order, axis=-1)
  probs = np.exp(ordered - ordered[..., :1])
  probs /= probs.sum(-1, keepdims=True)
  before = np.cumsum(probs, axis=-1) - probs  # mass of more probable tokens
  keep = np.zeros(logits.shape, bool)
  np.put_along_axis(keep, order, before < SETTING["top_p"], axis=-1)
  logits = np.where(keep, logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def exact(small):
  """Exact probabilities of all VOCAB**STEPS sequences under SETTING."""
  model, variables = small
  seqs = np.array(list(itertools.product(range(VOCAB), repeat=STEPS)),
                  np.int32)
  inputs = np.concatenate([np.full((len(seqs), 1), PREFIX[0, 0]),
                           np.full((len(seqs), 1), NULL)])
  inputs = np.concatenate([inputs, np.concatenate([seqs[:, :-1]] * 2)], 1)
  logits = np.asarray(jax.jit(model.apply)(variables, inputs), np.float64)
  cond, uncond = np.split(logits, 2)
  scale = SETTING["guidance_scale"]
  logp = _filtered_log_probs(uncond + scale * (cond - uncond))
  logp = np.take_along_axis(logp, seqs[..., None], -1)[..., 0].sum(1)
  probs = np.exp(logp)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-6)
  return seqs, probs / probs.sum()


def _speculative_samples(small, verify=speculative.verify_drafts):
  model, variables = small
  prefix = np.repeat(PREFIX, SAMPLES, axis=0)
  tokens, passes = speculative.sample_speculative(
      model, variables, prefix, STEPS, jax.random.key(2024), window=3,
      temperature=SETTING["temperature"], top_k=SETTING["top_k"],
      top_p=SETTING["top_p"], guidance_scale=SETTING["guidance_scale"],
      null_prefix=np.full((1, 1), NULL, np.int32), return_passes=True,
      verify=verify)
  return np.asarray(tokens), np.asarray(passes)


def _p_value(observed, expected):
  """Chi-square goodness of fit; cells expecting < 5 counts are pooled."""
  small_cells = expected < 5
  obs = np.append(observed[~small_cells], observed[small_cells].sum())
  exp = np.append(expected[~small_cells], expected[small_cells].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  if len(exp) < 2:
    return 1.0  # a single possible value: nothing to test
  stat = float(np.sum((obs - exp) ** 2 / exp))
  return float(jax.scipy.stats.chi2.sf(stat, len(exp) - 1))


def _p_values(tokens, exact):
  """p-values of each position's histogram and of the first two's joint."""
  seqs, probs = exact
  out = []
  for t in range(STEPS):
    expected = np.bincount(seqs[:, t], probs, VOCAB) * len(tokens)
    out.append(_p_value(np.bincount(tokens[:, t], minlength=VOCAB),
                        expected))
  pair = seqs[:, 0] * VOCAB + seqs[:, 1]
  expected = np.bincount(pair, probs, VOCAB ** 2) * len(tokens)
  observed = np.bincount(tokens[:, 0] * VOCAB + tokens[:, 1],
                         minlength=VOCAB ** 2)
  out.append(_p_value(observed, expected))
  return np.array(out)


# Bonferroni: each run makes STEPS + 1 tests.
ALPHA = FAMILY_ALPHA / (STEPS + 1)


def test_samples_follow_the_exact_distribution(small, exact):
  tokens, passes = _speculative_samples(small)
  p_values = _p_values(tokens, exact)
  assert np.all(p_values > ALPHA), p_values
  # Drafts were accepted: fewer passes than tokens on average.
  assert passes.mean() < STEPS


def _resample_from_p(p, q, drafts, u):
  """Wrong: after a rejection, draws from p instead of the residual."""
  accepted, _ = speculative.verify_drafts(p, q, drafts, u)
  return accepted, jax.vmap(lambda row, i: row[i])(p, accepted)


def test_wrong_acceptance_rule_is_caught(small, exact):
  tokens, _ = _speculative_samples(small, verify=_resample_from_p)
  assert np.min(_p_values(tokens, exact)) < ALPHA


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def test_window_argument_checks(small):
  model, variables = small
  with pytest.raises(ValueError, match="window"):
    speculative.sample_speculative(model, variables, PREFIX, 4, None,
                                   window=0)
  with pytest.raises(ValueError, match="block_size"):
    speculative.sample_speculative(model, variables, PREFIX, 9, None,
                                   window=2)
