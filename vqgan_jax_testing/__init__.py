"""Test support shared by `tests/` and `benchmarks/`.

* :mod:`vqgan_jax_testing.oracle`: imports the reference implementation
  (taming-transformers) that the parity tests and the benchmarks compare
  against.
* :mod:`vqgan_jax_testing.reference_ckpt`: builds reference models with
  random weights and writes them as the official releases are laid out.
* :mod:`vqgan_jax_testing.train_utils`: tiny configs, subprocess runs and
  metric rows for the trainer tests.

Not part of the library: nothing in `vqgan_jax` imports it.
"""
