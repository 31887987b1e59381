"""The command line shared by train_vqgan.py and train_transformer.py.

Flags: ``--config`` (an ml_collections config file, ``FILE.py[:ARG]``, with
``--config.FIELD=VALUE`` overrides), ``--workdir``, the multi-host options,
``--compilation_cache_dir``, ``--host_malloc`` and ``--config_help`` (every
config field with its value and domain). The trainer module's
``train_and_evaluate(config, workdir)`` runs; its first call checks the whole
config (`training/schema.py`), so a bad value exits 2 before the workdir,
the data or any device is touched.
Exit codes: 0 done (or stopped by SIGTERM after saving), 2 a bad config,
path or dataset, or a workdir whose checkpoints hold another model or
optimizer than the config (one ``error:`` line on stderr; nothing in the
workdir is touched; also a workdir that is a file, cannot be written or
has no room for a checkpoint), 3 too many non-finite steps in a row, 4 a
checkpoint could not be saved (the last complete one stays). ``--help``
prints the script's docstring and these flags (`vqgan_jax.cli`).
"""
import importlib
import logging
import os
import shlex
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
config_flags.DEFINE_config_file(
    "config", None,
    "Training config file, FILE.py[:ARG]. Override any field with "
    "--config.FIELD=VALUE: numbers and strings as they are "
    "(--config.optim.learning_rate=2e-4, --config.dataset=folder:/data/x), "
    "booleans --config.gpt.remat=true or =false, tuples quoted for the "
    "shell: --config.model.attn_resolutions='(16,)', the empty tuple "
    "--config.model.attn_resolutions='()'; nested fields by their dotted "
    "name: --config.model.quantizer_options.vq.beta=0.5. --config_help "
    "lists every field (docs/configs.md).", lock_config=True)
flags.DEFINE_bool("config_help", False,
                  "Print every field of --config (after the overrides) with "
                  "its value and its valid values, one per line, and exit.")
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
  help_only = any(a.split("=")[0] == "--config_help" for a in sys.argv[1:])
  flags.mark_flags_as_required(["config"] + ["workdir"] * (not help_only))

  def main(argv):
    del argv
    if FLAGS.config_help:
      from vqgan_jax.training import schema  # pylint: disable=g-import-not-at-top
      sys.stdout.write(schema.config_help(_loaded_config()))
      sys.exit(0)
    if FLAGS.workdir is None:
      cli.fail("flag --workdir=None: Flag --workdir must have a value other "
               "than None.")
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
    from vqgan_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
    try:
      checkpoints.check_workdir(FLAGS.workdir)  # a file, read-only, full
      last = trainer.train_and_evaluate(config, FLAGS.workdir)
    except (schema.ConfigError, FileNotFoundError) as e:
      # A bad config, path or dataset, or a workdir of another architecture
      # (checkpoints.CheckpointMismatchError): one line, no traceback.
      print(f"error: {e}", file=sys.stderr)
      sys.exit(schema.EXIT_CONFIG)
    except FloatingPointError as e:  # max_bad_steps non-finite steps in a row
      print(f"error: {e}", file=sys.stderr)
      sys.exit(schema.EXIT_NONFINITE)
    except checkpoints.CheckpointSaveError as e:  # disk full, quota, ...
      print(f"error: {e}", file=sys.stderr)
      sys.exit(checkpoints.EXIT_SAVE_FAILED)
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing saved
      print(f"interrupted before training started; nothing was saved in "
            f"{FLAGS.workdir}", file=sys.stderr)
      sys.exit(130)
    if hasattr(last, "describe"):
      print(last.describe(FLAGS.workdir, _command()))
    else:
      summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                          if isinstance(v, float))
      print(f"done: {FLAGS.workdir} ({summary})")

  cli.run(main, sys.modules["__main__"].__doc__, field_hint=_moved_field)


def _command() -> str:
  """The command line that resumes this run."""
  import jax  # pylint: disable=g-import-not-at-top
  cmd = "python " + shlex.join(sys.argv)
  return cmd + (" (on every process)" if jax.process_count() > 1 else "")


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
