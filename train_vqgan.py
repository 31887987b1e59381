r"""Trains a VQGAN (stage 1).

  python train_vqgan.py --config=configs/digits_vqgan.py --workdir=runs/digits_vqgan \
      [--config.batch_size=32 ...]

Running the same command again resumes from the newest complete checkpoint
in the workdir. On several hosts pass --coordinator_address, --num_processes
and --process_id (or --distributed_auto on TPU pods / SLURM).
"""
from vqgan_jax.training import launch

if __name__ == "__main__":
  launch.run("vqgan_jax.training.vqgan_trainer")
