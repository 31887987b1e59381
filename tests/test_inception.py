"""The FID Inception: parity with pytorch-fid's module, the loader, FID/IS.

pytorch-fid (the test oracle) builds its network and then downloads the
weights; here its download is replaced by a random state dict saved to a
.pth, which our loader reads without torch. Inputs are 75x75 without the
299 resize (the smallest size the network takes) to keep the test fast; the
resize is checked against torch's on its own.
"""
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax import inception
from vqgan_jax import keymaps
from vqgan_jax import metrics

BATCH = 4


def _random_state_dict(torch, seed=0):
  """pytorch-fid's FID Inception with He-scaled random weights, as tensors."""
  from pytorch_fid import inception as pfi
  net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  for name, block in (
      ("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
      ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
      ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
      ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
      ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
      ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
      ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
      ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
      ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
    setattr(net, name, block)
  rng = np.random.default_rng(seed)
  sd = {}
  for k, v in net.state_dict().items():
    shape = tuple(v.shape)
    if k.endswith("num_batches_tracked"):
      sd[k] = v
      continue
    if k.endswith("conv.weight"):
      a = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif k.endswith("running_var"):
      a = rng.uniform(0.5, 1.5, shape)
    elif k.endswith("bn.weight"):
      a = rng.uniform(0.8, 1.2, shape)
    elif k == "fc.weight":
      a = rng.normal(0, 1 / np.sqrt(2048), shape)
    else:  # running_mean, BN bias, fc bias
      a = rng.normal(0, 0.1, shape)
    sd[k] = torch.tensor(a, dtype=torch.float32)
  return sd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(state dict, .pth path, our model + variables, one jitted apply)."""
  import jax
  torch = oracle.torch()
  torch.set_num_threads(2)
  sd = _random_state_dict(torch)
  path = tmp_path_factory.mktemp("inception") / keymaps.inception.WEIGHTS_FILE
  torch.save(sd, path)
  model, variables = inception.load_inception(path, resize_to=None)
  return sd, path, jax.jit(model.apply), variables


def test_matches_pytorch_fid(setup, monkeypatch):
  sd, _, apply, variables = setup
  torch = oracle.torch()
  from pytorch_fid import inception as pfi
  monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
  pool_net = pfi.InceptionV3([3], resize_input=False,
                             normalize_input=False).eval()
  logit_net = pfi.fid_inception_v3().eval()
  x = np.random.default_rng(1).uniform(-1, 1, (BATCH, 75, 75, 3))
  x = x.astype(np.float32)
  with torch.no_grad():
    xt = torch.tensor(x.transpose(0, 3, 1, 2))
    want_pool = pool_net(xt)[0][:, :, 0, 0].numpy()
    want_logits = logit_net(xt).numpy()
  pool, logits = apply(variables, x)
  assert pool.shape == (BATCH, 2048) and logits.shape == (BATCH, 1008)
  # Activations are O(1-10); float32 round-off over ~95 layers.
  np.testing.assert_allclose(pool, want_pool, atol=5e-5 * np.abs(
      want_pool).max())
  np.testing.assert_allclose(logits, want_logits, atol=5e-5 * np.abs(
      want_logits).max())


@pytest.mark.parametrize("size", [(16, 16), (40, 23), (512, 300)])
def test_resize_matches_torch_bilinear(size):
  torch = oracle.torch()
  import torch.nn.functional as F
  x = np.random.default_rng(2).uniform(-1, 1, (1,) + size + (3,))
  x = x.astype(np.float32)
  want = F.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size=(299, 299),
                       mode="bilinear", align_corners=False)
  got = inception.resize_bilinear(x, 299)
  np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1),
                             atol=2e-5)


def test_fid_of_a_set_with_itself_is_zero_and_shift_scores_higher(setup):
  _, _, apply, variables = setup
  rng = np.random.default_rng(3)
  x = rng.uniform(-0.6, 0.6, (2 * BATCH, 75, 75, 3)).astype(np.float32)
  feats = lambda imgs: np.concatenate([np.asarray(apply(
      variables, imgs[i:i + BATCH])[0]) for i in range(0, len(imgs), BATCH)])
  f = feats(x)
  mu, sigma = metrics.feature_statistics(f)
  self_fid = metrics.frechet_distance(mu, sigma, mu, sigma)
  assert abs(self_fid) < 1e-6 * np.trace(sigma)
  f_shift = feats(x + 0.3)
  shifted = metrics.frechet_distance(
      mu, sigma, *metrics.feature_statistics(f_shift))
  assert shifted > 1e3 * max(abs(self_fid), 1e-9)
  assert shifted > 0.01 * np.trace(sigma)


def test_loader_reports_bad_files(setup, tmp_path):
  sd, _, _, _ = setup
  torch = oracle.torch()
  broken = dict(sd)
  del broken["Mixed_6b.branch7x7_2.conv.weight"]
  broken["extra.weight"] = torch.zeros(3)
  broken["fc.bias"] = torch.zeros(1000)
  with pytest.raises(ValueError) as e:
    inception.inception_variables({k: v.numpy() for k, v in broken.items()})
  msg = str(e.value)
  assert "Mixed_6b.branch7x7_2.conv.weight" in msg and "extra.weight" in msg
  assert "fc.bias" in msg
  with pytest.raises(FileNotFoundError, match="pytorch-fid"):
    inception.load_inception(tmp_path / "nope.pth")


def test_samples_mode_end_to_end(setup, tmp_path):
  """The CLI's FID/IS path (Inception at 75 px to stay fast): self FID 0."""
  from PIL import Image
  from vqgan_jax import evaluate
  _, path, _, _ = setup
  rng = np.random.default_rng(4)
  pix = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
  for i, p in enumerate(pix):
    Image.fromarray(p).save(tmp_path / f"{i % 2}_{i:04d}.png")
  np.savez(tmp_path / "ref.npz", images=pix)
  r = evaluate.evaluate_samples(str(tmp_path), str(tmp_path / "ref.npz"),
                                str(path), batch_size=6, is_splits=1,
                                inception_size=75)
  assert r["num_samples"] == 6 and r["num_reference"] == 6
  assert abs(r["fid"]) < 1e-3
  assert r["inception_score"] >= 1.0 - 1e-6
