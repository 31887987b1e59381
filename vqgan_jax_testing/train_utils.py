"""Helpers for trainer tests: tiny configs, subprocess runs, metric rows."""
import importlib.util
import json
import os
import subprocess
import sys

# The repository root (this package sits next to `vqgan_jax/` and `configs/`).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def env(devices=None, **extra):
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=ROOT)
  if devices:  # kept: the test run's own XLA flags (conftest.py)
    flags = [f for f in e.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    e["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={devices}"])
  e.update(extra)
  return e


def run_python(code_or_args, devices=None, timeout=600, check=True, **kw):
  args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
  r = subprocess.run([sys.executable] + args, cwd=ROOT, env=env(devices),
                     capture_output=True, text=True, timeout=timeout, **kw)
  if check and r.returncode != 0:
    raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
  return r


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]
