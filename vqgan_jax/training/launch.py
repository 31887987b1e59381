"""The command line shared by train_vqgan.py and train_transformer.py.

Flags: ``--config`` (an ml_collections config file, ``FILE.py[:ARG]``, with
``--config.FIELD=VALUE`` overrides), ``--workdir``, the multi-host options,
``--compilation_cache_dir`` and ``--host_malloc``. The trainer module's
``train_and_evaluate(config, workdir)`` runs.
Exit codes: 0 done (or stopped by SIGTERM after saving), 2 a bad config,
path or dataset, or a workdir whose checkpoints hold another model or
optimizer than the config (one ``error:`` line on stderr; nothing in the
workdir is touched), 3 too many non-finite steps in a row. ``--help``
prints the script's docstring and these flags (`vqgan_jax.cli`).
"""
import importlib
import logging
import os
import sys
from typing import Optional

from absl import flags
from ml_collections import config_flags

from vqgan_jax import cli
from vqgan_jax.backends import compilation_cache  # stdlib only: no JAX backend yet
from vqgan_jax.backends import host_memory
from vqgan_jax.training import runtime

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Directory for checkpoints, metrics and images.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_bool("distributed_auto", False,
                  "Let JAX detect the cluster (TPU pods, SLURM, Open MPI).")
flags.DEFINE_string("compilation_cache_dir", None,
                    "Keep compiled programs here across runs, so a resumed "
                    "or restarted run skips compiling (JAX's persistent "
                    "cache; JAX_COMPILATION_CACHE_DIR works too).")
flags.DEFINE_enum("host_malloc", "default", list(host_memory.HOST_MALLOC_MODES),
                  "keep: glibc malloc reuses freed memory instead of "
                  "unmapping it: on CPU it saves XLA's page faults on every "
                  "step, but resident memory never shrinks and can grow with "
                  "fragmentation (BENCHMARKS.md has the measurements).")


def run(trainer_module: str) -> None:
  """Parses flags and runs ``trainer_module.train_and_evaluate``."""
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    from vqgan_jax.training import schema  # pylint: disable=g-import-not-at-top
    host_memory.keep_freed_host_memory(FLAGS.host_malloc)
    try:
      compilation_cache.enable_compilation_cache(FLAGS.compilation_cache_dir)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(schema.EXIT_CONFIG)
    runtime.maybe_initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        auto=FLAGS.distributed_auto)
    config = _loaded_config()
    trainer = importlib.import_module(trainer_module)
    try:
      last = trainer.train_and_evaluate(config, FLAGS.workdir)
    except (schema.ConfigError, FileNotFoundError) as e:
      # A bad config, path or dataset, or a workdir of another architecture
      # (checkpoints.CheckpointMismatchError): one line, no traceback.
      print(f"error: {e}", file=sys.stderr)
      sys.exit(schema.EXIT_CONFIG)
    except FloatingPointError as e:  # max_bad_steps non-finite steps in a row
      print(f"error: {e}", file=sys.stderr)
      sys.exit(schema.EXIT_NONFINITE)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                        if isinstance(v, float))
    print(f"done: {FLAGS.workdir} ({summary})")

  cli.run(main, sys.modules["__main__"].__doc__, field_hint=_moved_field)


def _loaded_config():
  """``FLAGS.config``, or one error line when its file could not be loaded
  (ml_collections defers that error to the first use of the config)."""
  config = FLAGS.config
  try:
    config.to_dict()
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    cli.fail(f"--config: cannot load the config file ({reason}); pass "
             "--config=configs/FILE.py[:ARG]")
  return config


def _moved_field(name: str) -> Optional[str]:
  """Where a model field that held a quantizer option now lives."""
  from vqgan_jax import quantizers  # pylint: disable=g-import-not-at-top
  families = quantizers.flat_fields().get(name)
  if not families:
    return None
  where = " or ".join(f"{quantizers.options_path(kind)}.{option}"
                      for kind, option in sorted(families.items()))
  return f"quantizer options moved: set {where}"
