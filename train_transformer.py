r"""Trains a stage-2 transformer over the codes of a frozen VQGAN.

  python train_transformer.py --config=configs/digits_transformer.py --workdir=runs/digits_transformer \
      --config.vqgan_workdir=runs/digits_vqgan [--config.batch_size=32 ...]

Running the same command again resumes from the newest complete checkpoint
in the workdir. On several hosts pass --coordinator_address, --num_processes
and --process_id (or --distributed_auto on TPU pods / SLURM).
"""
import logging
import os

from absl import app
from absl import flags
from ml_collections import config_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, images.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_bool("distributed_auto", False,
                  "Let JAX detect the cluster (TPU pods, SLURM, Open MPI).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
  from vqgan_jax.training import runtime
  runtime.maybe_initialize_distributed(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      auto=FLAGS.distributed_auto)
  from vqgan_jax.training import transformer_trainer as trainer
  last = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                      if isinstance(v, float))
  print(f"done: {FLAGS.workdir} ({summary})")


if __name__ == "__main__":
  app.run(main)
