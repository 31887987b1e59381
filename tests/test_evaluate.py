"""The evaluation tool: metrics on known cases, the digits judge, the CLI."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqgan_jax_testing import oracle
from vqgan_jax_testing import reference_ckpt as rc
from vqgan_jax import digits_judge
from vqgan_jax import evaluate
from vqgan_jax import metrics
from vqgan_jax import quantizers

TINY = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
            attn_resolutions=[], dropout=0.0, in_channels=3, resolution=16,
            z_channels=32)


# --- PSNR / SSIM --------------------------------------------------------------

def test_psnr_of_known_mse():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 0.8, (3, 16, 16, 3)).astype(np.float32)
  signs = rng.choice([-1.0, 1.0], x.shape).astype(np.float32)
  y = x + 0.1 * signs  # every pixel off by exactly 0.1: MSE 0.01 -> 20 dB
  np.testing.assert_allclose(metrics.psnr(x, y), 20.0, atol=1e-4)
  # The same error on [-1, 1] images with peak-to-peak 2 is the same PSNR.
  np.testing.assert_allclose(metrics.psnr(2 * x - 1, 2 * y - 1, max_value=2.0),
                             20.0, atol=1e-4)


def _ssim_numpy(x, y, window=11, sigma=1.5, k1=0.01, k2=0.03):
  """Direct float64 SSIM: an explicit 2-D window at every valid position."""
  r = np.arange(window) - (window - 1) / 2
  g = np.exp(-r**2 / (2 * sigma**2))
  w2 = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = k1**2, k2**2
  h, wd = x.shape[:2]
  vals = []
  for c in range(x.shape[2]):
    for i in range(h - window + 1):
      for j in range(wd - window + 1):
        a = x[i:i + window, j:j + window, c].astype(np.float64)
        b = y[i:i + window, j:j + window, c].astype(np.float64)
        ma, mb = (w2 * a).sum(), (w2 * b).sum()
        va = (w2 * (a - ma)**2).sum()
        vb = (w2 * (b - mb)**2).sum()
        cov = (w2 * (a - ma) * (b - mb)).sum()
        vals.append((2 * ma * mb + c1) * (2 * cov + c2) /
                    ((ma**2 + mb**2 + c1) * (va + vb + c2)))
  return np.mean(vals)


def test_ssim_identical_is_one_and_degraded_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (2, 16, 14, 2)).astype(np.float32)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-6)
  y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
  got = np.asarray(metrics.ssim(x, y))
  want = [_ssim_numpy(x[i], y[i]) for i in range(2)]
  assert np.all(got < 0.99)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # A constant offset keeps structure and contrast: only luminance drops.
  z = x * 0.5 + 0.25
  np.testing.assert_allclose(metrics.ssim(z, z + 0.1),
                             [_ssim_numpy(z[i], z[i] + 0.1) for i in range(2)],
                             atol=2e-5)


def test_ssim_rejects_images_smaller_than_window():
  x = np.zeros((1, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match="11x11"):
    metrics.ssim(x, x)


# --- codebook usage / perplexity ----------------------------------------------

def test_usage_and_perplexity_of_known_histograms():
  # 4 of 8 codes, equally often: usage 1/2, perplexity 4.
  idx = jnp.array([0, 1, 2, 3] * 5)
  assert float(quantizers.codebook_usage(idx, 8)) == 0.5
  np.testing.assert_allclose(float(quantizers.perplexity(idx, 8)), 4.0,
                             rtol=1e-6)
  # Counts (3, 1) of 16 codes: perplexity exp(H(3/4, 1/4)).
  idx = jnp.array([5, 5, 5, 9])
  p = np.array([0.75, 0.25])
  np.testing.assert_allclose(float(quantizers.perplexity(idx, 16)),
                             np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  assert float(quantizers.codebook_usage(idx, 16)) == 2 / 16


# --- FID / Inception Score (pure functions) -----------------------------------

def test_frechet_distance_known_cases_and_pytorch_fid():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
  mu, sigma = metrics.feature_statistics(f)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(
      sigma)
  # Same covariance, mean moved by d: FID = |d|^2 exactly.
  d = rng.normal(size=16)
  np.testing.assert_allclose(
      metrics.frechet_distance(mu, sigma, mu + d, sigma), d @ d, rtol=1e-8)
  # General case: pytorch-fid's scipy.linalg.sqrtm computation agrees.
  oracle.torch()
  from pytorch_fid import fid_score
  g = rng.normal(size=(300, 16)) * 1.5 + 0.3
  mu2, sigma2 = metrics.feature_statistics(g)
  np.testing.assert_allclose(
      metrics.frechet_distance(mu, sigma, mu2, sigma2),
      fid_score.calculate_frechet_distance(mu, sigma, mu2, sigma2), rtol=1e-7)
  # Rank-deficient covariances (fewer samples than dimensions) stay finite.
  few = rng.normal(size=(5, 32))
  m3, s3 = metrics.feature_statistics(few)
  assert abs(metrics.frechet_distance(m3, s3, m3, s3)) < 1e-6 * np.trace(s3)


def test_inception_score_known_cases():
  uniform = np.zeros((40, 1008))
  assert metrics.inception_score(uniform) == pytest.approx((1.0, 0.0))
  # Confident, evenly spread over K classes: IS = K.
  k = 8
  confident = np.full((4 * k, 20), -50.0)
  confident[np.arange(4 * k), np.arange(4 * k) % k] = 50.0
  np.testing.assert_allclose(metrics.inception_score(confident)[0], k,
                             rtol=1e-6)
  mean, std = metrics.inception_score(confident, num_splits=4)
  np.testing.assert_allclose([mean, std], [k, 0.0], atol=1e-5)


# --- the digits judge ---------------------------------------------------------

def test_label_parsing_and_sample_loading(tmp_path):
  assert digits_judge.label_from_name("3_0007.png") == 3
  assert digits_judge.label_from_name("/x/y/12_0001.png") == 12
  with pytest.raises(ValueError, match="class id"):
    digits_judge.label_from_name("0007.png")
  rng = np.random.default_rng(0)
  pix = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
  for i, (c, n) in enumerate([(0, 0), (0, 1), (7, 0), (9, 0)]):
    Image.fromarray(pix[i]).save(tmp_path / f"{c}_{n:04d}.png")
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "grid.png")
  images, labels, names = digits_judge.load_sample_images(str(tmp_path))
  assert names == ["0_0000.png", "0_0001.png", "7_0000.png", "9_0000.png"]
  np.testing.assert_array_equal(labels, [0, 0, 7, 9])
  np.testing.assert_array_equal(images, pix)
  # sample.py --npz layout.
  np.savez(tmp_path / "samples.npz", images=pix, tokens=np.zeros((4, 64)),
           labels=np.array([1, 2, 3, 4]))
  images, labels, _ = digits_judge.load_sample_images(
      str(tmp_path / "samples.npz"))
  np.testing.assert_array_equal(images, pix)
  np.testing.assert_array_equal(labels, [1, 2, 3, 4])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no sample images"):
    digits_judge.load_sample_images(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def judge():
  return digits_judge.train_judge(16, seed=0)


def test_judge_recognises_real_held_out_digits(judge, tmp_path):
  assert judge.val_accuracy >= 0.95
  # Real validation digits written as RGB sample PNGs, through the CLI path.
  x, y = digits_judge.real_digits("validation", 16)
  pix = np.round((np.repeat(x, 3, -1) + 1) * 127.5).astype(np.uint8)
  counts = {}
  for img, c in zip(pix, y):
    counts[c] = counts.get(c, 0) + 1
    Image.fromarray(img).save(tmp_path / f"{c}_{counts[c]:04d}.png")
  images, labels, _ = digits_judge.load_sample_images(str(tmp_path))
  report = digits_judge.score_samples(judge, images, labels)
  assert report["num_samples"] == len(y) == 180
  assert report["accuracy"] == pytest.approx(judge.val_accuracy)
  assert sorted(report["per_class_accuracy"]) == [str(c) for c in range(10)]
  assert sum(report["per_class_count"].values()) == 180
  confusion = np.array(report["confusion"])
  assert confusion.trace() == round(report["accuracy"] * 180)
  # The same images labelled with the wrong digits score near zero.
  wrong = digits_judge.score_samples(judge, images, (labels + 1) % 10)
  assert wrong["accuracy"] < 0.1


def test_judge_is_reproducible_with_a_seed():
  import jax
  a, b, c = (digits_judge.train_judge(16, seed=s, steps=30) for s in (0, 0, 1))
  same = jax.tree.map(np.array_equal, a.params, b.params)
  assert all(jax.tree.leaves(same))
  assert not np.array_equal(a.params["params"]["logits"]["kernel"],
                            c.params["params"]["logits"]["kernel"])


def test_judge_cli_writes_json(tmp_path, monkeypatch, judge):
  monkeypatch.setattr(digits_judge, "train_judge", lambda *a, **k: judge)
  x, y = digits_judge.real_digits("validation", 16)
  pix = np.round((x + 1) * 127.5).astype(np.uint8)
  np.savez(tmp_path / "samples.npz", images=pix[:30], labels=y[:30],
           tokens=np.zeros((30, 64)))
  from absl import flags
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  fv(["evaluate", f"--samples={tmp_path / 'samples.npz'}"])
  assert evaluate.run(["evaluate", "digits-judge"], fv) == 0
  report = json.load(open(tmp_path / "judge.json"))
  assert report["num_samples"] == 30 and 0.9 <= report["accuracy"] <= 1.0


def test_judge_rejects_unlabelled_samples(tmp_path):
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "0001.png")
  with pytest.raises(ValueError, match="class labels"):
    evaluate.evaluate_digits_judge(str(tmp_path))


# --- reconstruction mode ------------------------------------------------------

def test_reconstruction_metrics_equal_the_models_own(tmp_path):
  oracle.torch()
  from vqgan_jax import convert
  cfg = rc.vq_model_config(TINY, 32, 8)
  ckpt, yml = rc.save_reference(tmp_path, rc.build_reference(cfg, seed=0), cfg)
  convert.main(["--checkpoint", str(ckpt), "--config", str(yml),
                "--out", str(tmp_path / "model")])
  r = evaluate.evaluate_reconstruction(str(tmp_path / "model"), "digits",
                                       batch_size=8, num_examples=12)
  assert r["examples"] == 12 and r["n_embed"] == 32 and "lpips" not in r
  # The same numbers by hand on the first 12 validation digits.
  model, variables = convert.load_taming_vqgan(ckpt, yml)
  x, _ = digits_judge.real_digits("validation", 16)
  x = np.repeat(x[:12], 3, -1)
  codes = model.apply(variables, jnp.asarray(x),
                      method=model.encode_to_indices)
  rec = np.clip(np.asarray(model.apply(variables, codes,
                                       method=model.decode_indices)), -1, 1)
  mse = np.mean(((x + 1) / 2 - (rec + 1) / 2)**2, axis=(1, 2, 3))
  np.testing.assert_allclose(r["psnr"], np.mean(10 * np.log10(1 / mse)),
                             rtol=1e-4)
  np.testing.assert_allclose(
      r["ssim"], np.mean([_ssim_numpy((x[i] + 1) / 2, (rec[i] + 1) / 2)
                          for i in range(12)]), atol=1e-4)
  used = np.unique(np.asarray(codes))
  assert r["codes_used"] == len(used)
  assert r["codebook_usage"] == pytest.approx(len(used) / 32)
  with pytest.raises(ValueError, match="lpips_lin"):
    evaluate.evaluate_reconstruction(str(tmp_path / "model"), lpips_vgg="x")
