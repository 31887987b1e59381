"""The reconstruct tool: codes and PNGs for a folder, equal to the model's own output."""

import jax.numpy as jnp
import numpy as np
from PIL import Image

from vqgan_jax_testing import oracle
from vqgan_jax_testing import reference_ckpt as rc
from vqgan_jax import convert
from vqgan_jax import reconstruct

TINY = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
            attn_resolutions=[], dropout=0.0, in_channels=3, resolution=16,
            z_channels=32)


def test_reconstruct_folder(tmp_path):
  oracle.torch()
  cfg = rc.vq_model_config(TINY, 32, 8)
  ref = rc.build_reference(cfg, seed=0)
  ckpt, yml = rc.save_reference(tmp_path, ref, cfg)
  model_dir = tmp_path / "model"
  convert.main(["--checkpoint", str(ckpt), "--config", str(yml), "--out", str(model_dir)])

  imgs = tmp_path / "imgs"
  (imgs / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i, size in enumerate([(16, 16), (20, 24), (16, 32)]):
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
        imgs / ("sub" if i else "") / f"im{i}.png")
  (imgs / "broken.png").write_bytes(b"not an image")

  out = tmp_path / "out"
  s = reconstruct.reconstruct_folder(str(model_dir), str(imgs), str(out),
                                     batch_size=2, progress=False)
  assert s["images"] == 3 and len(s["skipped"]) == 1 and "broken.png" in s["skipped"][0]
  codes = np.load(out / "codes" / "sub" / "im1.npy")
  assert codes.shape == (8, 8) and codes.dtype == np.int32
  assert (out / "reconstructions" / "sub" / "im2.png").exists()

  # The written codes and PNG are those of the model on the preprocessed image.
  model, variables = convert.load_taming_vqgan(ckpt, yml)
  from vqgan_jax.data import images as image_lib
  x, _ = image_lib.preprocess(image_lib.open_image(str(imgs / "sub" / "im1.png")), 16, 3)
  want = model.apply(variables, jnp.asarray(x[None]), method=model.encode_to_indices)
  np.testing.assert_array_equal(codes, np.asarray(want)[0])
  rec = model.apply(variables, want, method=model.decode_indices)
  png = np.asarray(Image.open(out / "reconstructions" / "sub" / "im1.png"))
  np.testing.assert_array_equal(png, reconstruct.to_uint8(np.asarray(rec)[0]))
  assert 0 < s["codebook_usage"] <= 1


def test_psnr_of_known_noise():
  rng = np.random.default_rng(0)
  a = rng.uniform(-0.5, 0.5, size=(4, 32, 32, 3))
  sigma = 0.02
  b = a + rng.normal(0, sigma, size=a.shape)
  # PSNR with peak-to-peak 2: 10 log10(4 / sigma^2).
  np.testing.assert_allclose(reconstruct.psnr(a, b), 10 * np.log10(4 / sigma**2), atol=0.3)
