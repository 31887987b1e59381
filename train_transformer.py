r"""Trains a stage-2 transformer over the codes of a frozen VQGAN.

  python train_transformer.py --config=configs/digits_transformer.py \
      --workdir=runs/digits_transformer --config.vqgan_workdir=runs/digits_vqgan \
      [--config.batch_size=32 ...]

Running the same command again resumes from the newest complete checkpoint
in the workdir. On several hosts pass --coordinator_address, --num_processes
and --process_id (or --distributed_auto on TPU pods / SLURM).
"""
from vqgan_jax.training import launch

if __name__ == "__main__":
  launch.run("vqgan_jax.training.transformer_trainer")
