"""Key maps from external (PyTorch) checkpoints to this package's parameters.

One module per network. Each maps a flat ``{torch key: array}`` state dict
(as :func:`vqgan_jax.torch_io.load_state_dict` returns) onto the Flax
variables of this package's model:

* :mod:`~vqgan_jax.keymaps.vqgan`: taming-transformers VQModel / GumbelVQ
  (first and conditioning stages), both directions;
* :mod:`~vqgan_jax.keymaps.gpt`: the minGPT of a Net2NetTransformer (both
  directions), and the unrolled <-> scanned layer layouts of
  :class:`vqgan_jax.GPT`;
* :mod:`~vqgan_jax.keymaps.discriminator`: the PatchGAN of the VQGAN loss,
  both directions;
* :mod:`~vqgan_jax.keymaps.lpips`: torchvision's VGG16 with the lpips heads,
  or the perceptual loss stored in a reference VQGAN checkpoint (that one
  both directions);
* :mod:`~vqgan_jax.keymaps.inception`: pytorch-fid's FID Inception;
* :mod:`~vqgan_jax.keymaps.optimizer`: the Adam states a reference VQGAN
  checkpoint carries, onto the trees of the parameters they belong to.

The maps import no model: the caller passes the target's shapes (the
model's abstract variables, ``jax.eval_shape`` of its ``init``), or for the
GPT the model itself or nothing (the sizes are then read from the state
dict). The inverse maps (``state_dict_from_*``, ``reference_state_dict``)
serve :mod:`vqgan_jax.export`. The model modules' loaders (``lpips.load_lpips``,
``inception.load_inception``, ``discriminator.params_from_state_dict``,
``convert.load_taming_*``) build those shapes and call the maps.

The maps share the torch conventions: a convolution weight (out, in, kh, kw)
becomes a Flax kernel (kh, kw, in, out), a Linear weight (out, in) is
transposed, norm ``weight`` is Flax's ``scale``, and running statistics live
in ``batch_stats``. Every map checks the whole state dict first and raises
one ValueError naming the missing keys, the unexpected keys and each shape
mismatch.
"""
from vqgan_jax.keymaps import discriminator
from vqgan_jax.keymaps import gpt
from vqgan_jax.keymaps import inception
from vqgan_jax.keymaps import lpips
from vqgan_jax.keymaps import optimizer
from vqgan_jax.keymaps import vqgan
