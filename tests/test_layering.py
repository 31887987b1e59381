"""The package's layers point only down.

The layer map, from the bottom, is ``LAYERS`` below:

1. Flax modules and pure functions (models, quantizers, losses, key maps,
   data, backend tuning).
2. inference: sampling, loading and converting checkpoints, code caches,
   the sample / reconstruct / evaluate tools.
3. training: ``vqgan_jax/training/``.
4. scripts (``train_*.py``, ``sample.py``), ``benchmarks/``, ``tests/`` and
   ``vqgan_jax_testing/``.

A module may import from its own layer or the ones below it, at the top of
a file or inside a function alike. Importing a public inference module in a
fresh interpreter loads no training, benchmark or test module.
"""
import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vqgan_jax")
FORBIDDEN = ("vqgan_jax.training", "benchmarks", "tests", "vqgan_jax_testing")

# Every module (or subpackage) of vqgan_jax/ and its layer. A new module must
# be placed here, so that its place in the layers is a decision.
LAYERS = {
    # 1. Flax modules and pure functions.
    1: ("modules", "vqgan", "quantizers", "gpt", "attention", "gpt_layers",
        "kv_cache", "logit_filters", "guidance", "discriminator", "lpips",
        "inception", "losses", "gan_options", "metrics", "digits_judge",
        "conditioning", "data", "backends", "config_io", "keymaps",
        "torch_io", "torch_tensors", "torch_write", "sharding", "digest",
        "image_io"),
    # 2. Inference: sampling, loading and converting checkpoints, the tools.
    2: ("sampling", "speculative", "sliding_window", "checkpoint", "convert",
        "export", "export_transformer", "codes", "sample_lib", "reconstruct",
        "evaluate", "cli", "console"),
    # 3. Training.
    3: ("training",),
}
LAYER_OF = {f"vqgan_jax.{name}": layer for layer, names in LAYERS.items()
            for name in names}

# Public inference modules (and the package itself, with its lazy names).
PUBLIC = ("vqgan_jax", "vqgan_jax.sampling", "vqgan_jax.sample_lib",
          "vqgan_jax.codes", "vqgan_jax.convert", "vqgan_jax.checkpoint",
          "vqgan_jax.reconstruct", "vqgan_jax.evaluate", "vqgan_jax.vqgan",
          "vqgan_jax.gpt", "vqgan_jax.losses", "vqgan_jax.quantizers",
          "vqgan_jax.lpips", "vqgan_jax.conditioning", "vqgan_jax.sharding",
          "vqgan_jax.digest", "vqgan_jax.image_io")


def _forbidden(name: str) -> bool:
  return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
  if rel[-1] == "__init__":
    rel = rel[:-1]
  return ".".join(rel)


def _imported_names(tree: ast.AST, module: str, is_package: bool):
  """(line, name) of every module an import statement or a constant
  ``importlib.import_module`` / ``__import__`` call may load, anywhere in
  the file; ``from A import b`` yields both ``A`` and ``A.b``."""
  package = module if is_package else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      yield node.lineno, base
      for alias in node.names:
        yield node.lineno, f"{base}.{alias.name}"
    elif isinstance(node, ast.Call) and node.args:
      func = node.func
      fname = getattr(func, "attr", None) or getattr(func, "id", None)
      arg = node.args[0]
      if (fname in ("import_module", "__import__") and
          isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        yield node.lineno, arg.value


def _package_files():
  for dirpath, dirnames, filenames in os.walk(PACKAGE):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for f in sorted(filenames):
      if f.endswith(".py"):
        yield os.path.join(dirpath, f)


def test_no_module_below_training_imports_training_benchmarks_or_tests():
  training = os.path.join(PACKAGE, "training") + os.sep
  checked, bad = 0, []
  for path in _package_files():
    if path.startswith(training):
      continue
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    module = _module_name(path)
    checked += 1
    for line, name in _imported_names(tree, module,
                                      path.endswith("__init__.py")):
      if _forbidden(name):
        bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
  assert checked > 10, f"only {checked} modules found under {PACKAGE}"
  assert not bad, "layers must point down:\n" + "\n".join(sorted(set(bad)))


_PROBE = r"""
import importlib, json, sys
forbidden = tuple(sys.argv[2].split(","))
def bad():
  return {m for m in sys.modules
          if any(m == f or m.startswith(f + ".") for f in forbidden)}
out = {}
for name in sys.argv[1].split(","):
  before = bad()
  mod = importlib.import_module(name)
  for attr in getattr(mod, "__all__", ()):  # the package's lazy names
    getattr(mod, attr)
  new = sorted(bad() - before)
  if new:
    out[name] = new
print(json.dumps(out))
"""


def test_public_inference_modules_import_no_training_module():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
             os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3")
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE, ",".join(PUBLIC), ",".join(FORBIDDEN)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not loaded, "importing inference modules loaded " + "; ".join(
      f"{k} -> {', '.join(v)}" for k, v in loaded.items())


def _layer(module: str):
  """The layer of ``vqgan_jax.X[.Y]`` (by its first component), or None."""
  parts = module.split(".")
  return LAYER_OF.get(".".join(parts[:2])) if len(parts) > 1 else None


def test_every_module_imports_only_its_own_layer_or_lower():
  unplaced, bad = set(), []
  for path in _package_files():
    module = _module_name(path)
    if module == "vqgan_jax":
      continue
    own = _layer(module)
    if own is None:
      unplaced.add(module)
      continue
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for line, name in _imported_names(tree, module,
                                      path.endswith("__init__.py")):
      other = _layer(name)
      if other is not None and other > own:
        bad.append(f"{os.path.relpath(path, ROOT)}:{line} (layer {own}) "
                   f"imports {name} (layer {other})")
  assert not unplaced, f"place these modules in LAYERS: {sorted(unplaced)}"
  assert not bad, "layers must point down:\n" + "\n".join(sorted(set(bad)))


def test_the_layer_test_catches_an_upward_import(tmp_path):
  """The import scanner sees a deferred import of a higher layer."""
  tree = ast.parse("def f():\n  from vqgan_jax import sampling\n")
  names = [n for _, n in _imported_names(tree, "vqgan_jax.losses", False)]
  assert any(_layer(n) == 2 for n in names), names
  assert _layer("vqgan_jax.losses") == 1
