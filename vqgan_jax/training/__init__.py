"""Training machinery shared by the two stages: mesh and shardings,
checkpoints, metrics, preemption. The trainers themselves live in
``vqgan_trainer`` and ``transformer_trainer``."""
