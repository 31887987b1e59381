"""Backend-specific tuning, kept out of the model and the training code.

Nothing here changes what is computed; each module changes how one backend
computes it, and each is opt-in, switched on by the programs that want it:

  * `xla_cpu`: convolution kernel gradients that XLA:CPU computes slowly,
    rewritten as row-block matrix products (`xla_cpu.conv_rewrites()`).
  * `host_memory`: glibc `mallopt` settings that keep freed host memory for
    reuse, so that XLA:CPU's large per-call temporaries stop page-faulting.
  * `compilation_cache`: JAX's persistent compilation cache.
  * `device_memory`: the memory XLA plans for one compiled call, and the
    memory a device has (read by the trainers' start-up check).
  * `threefry`: random initialisers compiled with threefry as one GPU
    kernel per draw (the same bits; a large model's initialiser otherwise
    compiles for minutes on a GPU).

`host_memory`, `compilation_cache` and `threefry` import only the standard library
(JAX on demand), so a program can apply them before JAX starts a backend.
"""
