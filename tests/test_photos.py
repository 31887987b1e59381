"""The real-photo path: crops with held-out photos, classical baselines at
the tokenizer's bit budget, and a few training steps scored against them."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from benchmarks.photos import baselines as bl
from benchmarks.photos import report as photo_report
from benchmarks.photos import cli as photos_cli
from vqgan_jax.data import photos
from vqgan_jax_testing import train_utils as tu


def _smooth_image(seed, h=48, w=64):
  """A smooth random colour field (low frequencies only), uint8 RGB."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h),
                                                  Image.Resampling.BICUBIC))


FAKE = {f"p{i}": _smooth_image(i) for i in range(4)}


def _prepare(out, **kw):
  return photos.prepare(str(out), size=16, stride=8, heldout=("p3",),
                        photos=tuple(FAKE), loader=FAKE.__getitem__, **kw)


def test_held_out_photos_never_reach_the_training_crops(tmp_path):
  m = _prepare(tmp_path)
  assert set(m["train"]) == {"p0", "p1", "p2"} and set(m["heldout"]) == {"p3"}
  # 48x64 at stride 8: 5 x 7 training crops; held-out tiles never overlap.
  assert all(v["crops"] == 35 for v in m["train"].values())
  assert m["heldout"]["p3"]["crops"] == 3 * 4
  train = photo_report.read_crops(tmp_path / "train")
  held = photo_report.read_crops(tmp_path / "heldout")
  assert train.shape == (105, 16, 16, 3) and held.shape == (12, 16, 16, 3)
  flat = {c.tobytes() for c in train}
  assert not any(c.tobytes() in flat for c in held)
  # The tiles cover the held-out photo exactly.
  np.testing.assert_array_equal(
      held.reshape(3, 4, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(48, 64, 3),
      FAKE["p3"])
  assert json.loads((tmp_path / "photos.json").read_text()) == m
  with pytest.raises(KeyError, match="not available"):
    photos.prepare(str(tmp_path), heldout=("nope",), photos=tuple(FAKE),
                   loader=FAKE.__getitem__)
  with pytest.raises(ValueError, match="every photo is held out"):
    photos.prepare(str(tmp_path), heldout=tuple(FAKE), photos=tuple(FAKE),
                   loader=FAKE.__getitem__)


def test_max_crops_spreads_a_capped_number_of_crops_over_each_photo(tmp_path):
  offsets = photos.crop_offsets(48, 64, 16, 8)  # 5 rows x 7 columns
  kept = photos.spread(offsets, 12)
  assert len(kept) == 12 and kept[0] == offsets[0] and kept[-1] == offsets[-1]
  assert len({y for y, _ in kept}) == 5  # every row of the photo is sampled
  assert photos.spread(offsets, 0) == offsets == photos.spread(offsets, 99)
  m = _prepare(tmp_path, max_crops=12)
  assert all(v["crops"] == 12 for v in m["train"].values())
  assert m["heldout"]["p3"]["crops"] == 12  # held-out tiles are never capped
  assert len(os.listdir(tmp_path / "train")) == 36 and m["max_crops"] == 12
  with pytest.raises(ValueError, match="max_crops must be >= 0"):
    _prepare(tmp_path, max_crops=-1)


def test_sklearn_photos_load_offline():
  china = photos.load_photo("china")
  assert china.shape == (427, 640, 3) and china.dtype == np.uint8
  assert {"china", "flower"} <= set(photos.available_photos())


def test_shrink_and_enlarge_spends_no_more_bits_than_the_tokenizer():
  # f4, 256 codes on 32x32: an 8x8 grid of 8-bit indices = 512 bits; 4x4 RGB
  # pixels take 384 bits and 5x5 would take 600.
  bits = bl.tokenizer_bits(32, 32, 4, 256)
  assert bits == 512 and bl.shrink_size(32, 32, bits) == (4, 4)
  # f2, 1024 codes: 16x16 x 10 bits = 2560 >= 10x10x24 = 2400 < 11x11x24.
  assert bl.shrink_size(32, 32, bl.tokenizer_bits(32, 32, 2, 1024)) == (10, 10)
  assert bl.shrink_size(32, 64, 24 * 8) == (2, 4)  # the aspect ratio kept
  for h, w, b in [(32, 32, 100.0), (40, 24, 3000.0), (16, 48, 500.0)]:
    sh, sw = bl.shrink_size(h, w, b)
    assert sh * sw * 24 <= b
  with pytest.raises(ValueError, match="no pixel"):
    bl.shrink_size(32, 32, 23)
  img = np.stack([_smooth_image(5, 32, 32)])
  assert np.abs(bl.shrink_enlarge(img, (32, 32)).astype(int) - img).max() <= 1
  assert bl.shrink_enlarge(img, (4, 4)).shape == img.shape


def test_kmeans_vq_improves_with_more_codes_and_round_trips_blocks():
  train = np.stack([_smooth_image(i, 32, 32) for i in range(12)])
  test = np.stack([_smooth_image(i, 32, 32) for i in range(20, 24)])
  blocks = bl.to_blocks(test, 4)
  assert blocks.shape == (4 * 64, 48) and blocks.dtype == np.float32
  np.testing.assert_array_equal(bl.from_blocks(blocks, test.shape, 4), test)
  psnrs = [photo_report.scores(test, bl.kmeans_vq(train, test, 4, k))["psnr"]
           for k in (2, 16, 128)]
  assert psnrs[0] < psnrs[1] < psnrs[2], psnrs
  # Centres fitted on the test blocks themselves, one per distinct block:
  # exact.
  x = bl.to_blocks(test[:1], 8)
  c = bl.kmeans(x, len(x), iters=2)
  np.testing.assert_array_equal(c[bl.nearest(x, c)], x)


def test_cli_mistakes_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
  cases = [
      ([], "give one mode"),
      (["prepare"], "prepare needs --out"),
      (["prepare", f"--out={tmp_path}", "--size=0"], "must be positive"),
      (["prepare", f"--out={tmp_path}", "--max_crops=-2"], "must be >= 0"),
      (["prepare", f"--out={tmp_path}", "--photos=china,flower",
        "--heldout=nope"], "not available"),
      (["report", f"--data={tmp_path}"], "report needs"),
      (["report", f"--data={tmp_path}", f"--vqgan={tmp_path}"],
       "is not a folder"),
      (["prepare", "--bogus=1"], "bogus"),
  ]
  monkeypatch.setattr(photos, "skimage_available", lambda: False)
  cases.append((["prepare", f"--out={tmp_path}"], "pip install"))
  cases.append((["prepare", f"--out={tmp_path}", "--photos=china,moon",
                 "--heldout=china"], "pip install"))
  for argv, message in cases:
    with pytest.raises(SystemExit) as e:
      photos_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, (argv, err)
    assert message in err and len(err.splitlines()) == 1, (argv, err)


def test_photo_presets_train_report_and_sample_a_larger_canvas(tmp_path,
                                                               monkeypatch):
  from vqgan_jax.training import vqgan_trainer
  _prepare(tmp_path / "data")
  c = tu.load_config("folder_vqgan", f"{tmp_path / 'data' / 'train'},photos")
  assert c.model.n_embed == 256 and c.model.resolution == 32
  assert c.loss.disc_start > c.num_train_steps  # no GAN within the run
  c.model.update(resolution=16, n_embed=16)
  # Evaluated on the held-out photo's tiles, not on the training crops.
  c.update(batch_size=4, num_train_steps=3, eval_every=3, eval_batches=0,
           eval_dataset=f"folder:{tmp_path / 'data' / 'heldout'}",
           image_every=0, checkpoint_every=3, log_every=1)
  vqgan_trainer.train_and_evaluate(c, str(tmp_path / "vq"))
  evals = [r for r in tu.rows(tmp_path / "vq") if "eval_psnr" in r]
  assert [(r["step"], r["eval_images"]) for r in evals] == [(3, 12)]
  r = photo_report.report(str(tmp_path / "data"), str(tmp_path / "vq"),
                          kmeans_blocks=512)
  assert r["heldout_crops"] == 12 and r["factor"] == 4 and r["n_embed"] == 16
  # 4x4 codes of 4 bits = 64 bits: one 8-bit RGB pixel (24 bits) fits, two
  # don't, so shrink-and-enlarge keeps one pixel, i.e. the mean colour.
  assert r["bits_per_pixel"] == pytest.approx(64 / 256)
  assert r["shrink_enlarge"]["size"] == [1, 1]
  assert r["shrink_enlarge"]["bits_per_pixel"] <= r["bits_per_pixel"]
  assert abs(r["shrink_enlarge"]["psnr"] - r["mean_colour"]["psnr"]) < 0.5
  # The smooth fields are better coded by 16 block centres than by one
  # colour.
  assert r["kmeans_vq"]["psnr"] > r["mean_colour"]["psnr"] + 1
  assert 0 < r["vqgan"]["codebook_usage"] <= 1
  assert np.isfinite(r["vqgan"]["psnr"]) and -1 <= r["vqgan"]["ssim"] <= 1
  assert os.path.isfile(r["grid"])
  assert Image.open(r["grid"]).size == (2 * 16 * 16, 2 * 2 * 16)
  assert "| VQGAN | 0.250 |" in photo_report.table(r)

  # Stage 2 on the photo codes, sampled on a canvas larger than the crops.
  from vqgan_jax import sample_lib
  from vqgan_jax.training import transformer_trainer
  t = tu.load_config("folder_transformer",
                     f"{tmp_path / 'data' / 'train'},photos")
  assert t.conditioning.kind == "sos" and t.gpt.n_layer == 4
  t.gpt.update(n_layer=1, n_head=2, n_embd=32)
  heldout = f"folder:{tmp_path / 'data' / 'heldout'}"
  t.update(vqgan_workdir=str(tmp_path / "vq"), batch_size=4,
           num_train_steps=2, eval_every=2, eval_batches=0,
           eval_dataset=heldout, sample_every=0, checkpoint_every=2,
           log_every=1)
  encoded, load_codes = [], transformer_trainer.load_codes

  def spy(config, mesh, split, *args, dataset=None, **kw):
    out = load_codes(config, mesh, split, *args, dataset=dataset, **kw)
    encoded.append((dataset or config.dataset, split, len(out["codes"])))
    return out

  monkeypatch.setattr(transformer_trainer, "load_codes", spy)
  transformer_trainer.train_and_evaluate(t, str(tmp_path / "gpt"))
  # Trained on the training crops' codes, evaluated on the held-out tiles'.
  assert encoded == [(t.dataset, "train", len(os.listdir(
      tmp_path / "data" / "train"))), (heldout, "train", 12)]
  evals = [r for r in tu.rows(tmp_path / "gpt") if "eval_loss" in r]
  assert [r["step"] for r in evals] == [2]
  assert np.isfinite(evals[0]["eval_loss"])
  s = sample_lib.sample_images(str(tmp_path / "gpt"), str(tmp_path / "s"),
                               num_samples=2, batch_size=2, grid=(6, 8),
                               progress=False)
  assert s["images"] == 2
  # 6x8 tokens of an f4 VQGAN trained on 16x16 crops (4x4 tokens): 24x32 px.
  for name in ("0000.png", "0001.png"):
    assert Image.open(tmp_path / "s" / name).size == (8 * 4, 6 * 4)
