"""LPIPS parity with the `lpips` package and the reference's LPIPS class.

Both oracles get the same random VGG16 trunk (torchvision ``vgg16(weights=
None)``, seeded) and the lin heads shipped in the `lpips` package, so the
test needs no download.
"""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax import lpips as jlpips
from vqgan_jax import torch_io


def lin_path():
  torch = oracle.torch()  # noqa: F841  (lpips imports torch)
  import lpips
  return os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1",
                      "vgg.pth")


def random_vgg(seed=0):
  """A seeded torchvision VGG16 with random weights."""
  torch = oracle.torch()
  import torchvision
  torch.manual_seed(seed)
  return torchvision.models.vgg16(weights=None).eval()


def patch_reference_lpips(monkeypatch, vgg):
  """Makes the reference's LPIPS build offline: trunk ``vgg``, lpips heads."""
  torch = oracle.torch()
  oracle.taming()
  import taming.modules.losses.lpips as ref
  monkeypatch.setattr(
      ref, "models",
      types.SimpleNamespace(vgg16=lambda *a, **k: vgg))

  def load_lins(self, name="vgg_lpips"):
    self.load_state_dict(torch.load(lin_path(), map_location="cpu"),
                         strict=False)

  monkeypatch.setattr(ref.LPIPS, "load_from_pretrained", load_lins)
  return ref


def reference_lpips(monkeypatch, vgg):
  """The reference's LPIPS class, built offline, in eval mode."""
  return patch_reference_lpips(monkeypatch, vgg).LPIPS().eval()


def images(seed, shape=(2, 3, 64, 64)):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, shape).astype(np.float32)


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
  torch = oracle.torch()
  vgg = random_vgg(0)
  path = tmp_path_factory.mktemp("lpips") / "vgg16_random.pth"
  torch.save(vgg.state_dict(), path)
  return vgg, str(path)


def test_matches_lpips_package(vgg_file):
  torch = oracle.torch()
  import lpips
  vgg, path = vgg_file
  ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
  # Copy the random trunk into the package model (its slices keep the
  # torchvision feature indices as module names).
  trunk = {}
  for name, _ in ref.net.named_parameters():
    idx = name.split(".")[1]
    trunk[name] = vgg.state_dict()[f"features.{idx}.{name.split('.')[2]}"]
  ref.net.load_state_dict(trunk, strict=True)
  x, y = images(1), images(2)
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)

  model, variables = jlpips.load_lpips(path, lin_path())
  got = jax.jit(model.apply)(variables, nhwc(x), nhwc(y))
  assert got.dtype == jnp.float32 and got.shape == (2,)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Not a trivially small number: the distances differ between images.
  assert abs(want[0] - want[1]) > 1e-4
  same = model.apply(variables, nhwc(x), nhwc(x))
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-7)


def test_matches_reference_and_loads_reference_keys(monkeypatch):
  torch = oracle.torch()
  ref = reference_lpips(monkeypatch, random_vgg(3))
  state = {"loss.perceptual_loss." + k: v.numpy()
           for k, v in ref.state_dict().items()}
  state["encoder.conv_in.weight"] = np.zeros((4, 3, 3, 3), np.float32)
  variables = jlpips.lpips_variables_from_reference(state)
  x, y = images(4, (2, 3, 32, 48)), images(5, (2, 3, 32, 48))
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)
  got = jlpips.LPIPS().apply(variables, nhwc(x), nhwc(y))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_gradient_flows_to_images_not_weights(vgg_file):
  _, path = vgg_file
  model, variables = jlpips.load_lpips(path, lin_path())
  x, y = nhwc(images(6, (1, 3, 32, 32))), nhwc(images(7, (1, 3, 32, 32)))

  def f(v, y):
    return jlpips.lpips_distance(model, v, x, y).sum()

  gv, gy = jax.grad(f, argnums=(0, 1))(variables, y)
  assert all(float(jnp.abs(g).max()) == 0.0
             for g in jax.tree_util.tree_leaves(gv))
  assert float(jnp.abs(gy).max()) > 0.0
  assert bool(jnp.all(jnp.isfinite(gy)))


def test_dropout_is_opt_in_and_unbiased(vgg_file):
  _, path = vgg_file
  model, variables = jlpips.load_lpips(path, lin_path())
  x, y = nhwc(images(10, (1, 3, 16, 16))), nhwc(images(11, (1, 3, 16, 16)))
  plain = jlpips.lpips_distance(model, variables, x, y)
  keys = jax.random.split(jax.random.PRNGKey(0), 64)
  noisy = jax.jit(jax.vmap(
      lambda k: jlpips.lpips_distance(model, variables, x, y, k)))(keys)
  assert float(jnp.abs(noisy[0] - plain).max()) > 1e-4
  assert float(jnp.abs(noisy[0] - noisy[1]).max()) > 1e-4
  np.testing.assert_allclose(np.asarray(noisy.mean(0)), np.asarray(plain),
                             rtol=0.02)


def test_bfloat16_trunk_close_to_float32(vgg_file):
  _, path = vgg_file
  model, variables = jlpips.load_lpips(path, lin_path(), dtype=jnp.bfloat16)
  x, y = nhwc(images(8, (2, 3, 32, 32))), nhwc(images(9, (2, 3, 32, 32)))
  got = model.apply(variables, x, y)
  want = jlpips.LPIPS().apply(variables, x, y)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=5e-2)


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    jlpips.load_lpips(tmp_path / "nope.pth", lin_path())
  msg = str(e.value)
  assert "vgg16-397923af.pth" in msg and "weights/v0.1/vgg.pth" in msg
  assert "perceptual_weight=0" in msg

  lin = torch_io.load_state_dict(lin_path())
  vgg = {k: np.asarray(v) for k, v in random_vgg(0).state_dict().items()}
  vgg["classifier.0.weight"] = np.zeros((2, 2), np.float32)  # ignored
  jlpips.lpips_variables(vgg, lin)  # loads

  broken = dict(vgg)
  del broken["features.28.bias"]
  broken["features.29.weight"] = np.zeros((1,), np.float32)
  broken["features.0.weight"] = np.zeros((64, 1, 3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    jlpips.lpips_variables(broken, lin)
  msg = str(e.value)
  assert "features.28.bias" in msg and "features.29.weight" in msg
  assert "features.0.weight" in msg and "(64, 3, 3, 3)" in msg
  assert "(64, 1, 3, 3)" in msg

  with pytest.raises(ValueError, match="lin4.model.1.weight"):
    jlpips.lpips_variables(vgg, {k: v for k, v in lin.items()
                                 if not k.startswith("lin4")})
  with pytest.raises(ValueError, match="missing keys"):
    jlpips.lpips_variables_from_reference({"loss.perceptual_loss.x": lin[
        "lin0.model.1.weight"]})
