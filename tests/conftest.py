"""Test setup: keep logs quiet and run JAX on the CPU unless told otherwise.

The helpers shared with the benchmarks (the reference oracle, reference
checkpoints, trainer-test utilities) live in the `vqgan_jax_testing`
package at the repository root.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
