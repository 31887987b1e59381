"""Test setup: keep logs quiet, run JAX on the CPU unless told otherwise, and
share one persistent compilation cache across the run.

Many tests start the training scripts several times with the same tiny
config (kill and resume, SIGTERM, two hosts, bad resumes); with the cache the
later processes load the initialiser and the step instead of compiling them
again. The cache is keyed by the program and the compiler flags, so it does
not change any result. All pytest-xdist workers of one run share the
directory; set ``JAX_COMPILATION_CACHE_DIR`` to
use another, or to ``""`` to compile everything afresh.

Tests compile with XLA's backend optimisation level 0 (``XLA_FLAGS``, set
here unless the environment already sets it; subprocesses inherit it). Most
of the suite's time is XLA:CPU compiling tiny programs once, and level 0
compiles them in about two thirds of the CPU time. What the tests check
holds at any level: parity with the reference is within stated tolerances,
and the exact comparisons (resume, sharding, skipped steps) compare runs of
the same build. Tests that measure the optimised build itself (the host
allocator's page faults) pass ``XLA_FLAGS=""`` to their subprocess. Every
compiled program, however quick to compile, goes into the cache.

The helpers shared with the benchmarks (the reference oracle, reference
checkpoints, trainer-test utilities) live in the `vqgan_jax_testing`
package at the repository root.
"""
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Set by the first process that loads this file (the pytest-xdist controller,
# or plain pytest); the workers and every subprocess inherit the variable.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="vqgan-jax-tests-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


def pytest_sessionfinish(session):
  del session
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
