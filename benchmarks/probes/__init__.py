"""One-off measurements beside the suite, each `python -m benchmarks.probes.NAME`.

* `gpu_stage2_probe`: variants of the stage-2 step timed in one process, and
  a kernel profile by class (matrix products, attention, the rest).
* `stage2_memory_plan`: XLA's memory plan of the stage-2 step, compiled only.
* `profile_transformer`: the stage-2 step in pieces, ours vs the reference,
  by CPU time per call.
* `host_malloc`: one training step, step after step, under glibc's malloc
  settings (wall time, page faults, resident memory).
* `scaling`: expected multi-device throughput of the ImageNet recipes from
  single-device measurements.
"""
