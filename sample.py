r"""Samples images from a stage-2 transformer and writes PNGs.

  python sample.py --workdir=runs/digits_transformer [--classes=3,5] \
      [--num_samples=8] [--outdir=OUT] [--seed=0] [--top_k=K] [--top_p=P] \
      [--temperature=T] [--guidance_scale=S] [--guidance_schedule=linear] \
      [--guidance_interval=A,B] [--speculative_window=W] [--grid=32x48] [--npz] \
      [--compilation_cache_dir=DIR] [--host_malloc=keep]

--workdir is a train_transformer.py workdir or a converted reference
transformer (python -m vqgan_jax.convert). Writes OUT/grid.png (one row per
class for class-conditional models) and one PNG per sample, named
`<class>_<index>.png` (`<index>.png` when unconditional); --num_samples is
per class. --grid samples a token grid larger than the training grid with
the sliding window. --speculative_window=W verifies W tokens per forward pass
(speculative Jacobi decoding: the same distribution, fewer passes).
Temperature, top-k, top-p and the guidance scale default to the values the
model was trained with in its config's `sampling` section (model.json);
`--guidance_scale=1` samples without guidance.
"""
import os

from absl import flags

from vqgan_jax import cli
from vqgan_jax.backends import compilation_cache  # stdlib only: no JAX backend yet
from vqgan_jax.backends import host_memory

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Transformer workdir or converted directory.")
flags.DEFINE_list("classes", None, "Class ids (default: all classes).")
flags.DEFINE_integer("num_samples", 8, "Samples per class (or in total).")
flags.DEFINE_string("outdir", None, "Output folder (default WORKDIR/samples).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("batch_size", 32, "Samples per jitted batch.")
# Left out, these four come from the model's config.sampling (model.json).
flags.DEFINE_float("temperature", None, "Softmax temperature (default: the "
                   "model's config.sampling, else 1).")
flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0: off; "
                     "default: the model's config.sampling).")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1: off; default: "
                   "the model's config.sampling).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale "
                   "(1: off; default: the model's config.sampling).")
flags.DEFINE_enum("guidance_schedule", "constant",
                  ["constant", "linear", "power", "cosine"],
                  "Guidance scale over the tokens: constant, or a ramp from 1 "
                  "to --guidance_scale.")
flags.DEFINE_float("guidance_power", 2.0, "Exponent of --guidance_schedule=power.")
flags.DEFINE_list("guidance_interval", None,
                  "A,B: guide only the tokens whose progress lies in [A, B].")
flags.DEFINE_integer("speculative_window", 0,
                     "Speculative Jacobi decoding with W tokens per forward "
                     "pass (0: one token per step).")
flags.DEFINE_string("grid", None, "Token grid HxW larger than training (sliding window).")
flags.DEFINE_string("cond_images", None, "Folder of conditioning images ('codes' models).")
flags.DEFINE_bool("npz", False, "Also write samples.npz (uint8 images, tokens, labels).")
flags.DEFINE_string("compilation_cache_dir", None,
                    "Keep compiled programs here across runs (JAX's persistent cache).")
flags.DEFINE_enum("host_malloc", "default", list(host_memory.HOST_MALLOC_MODES),
                  "keep: glibc malloc reuses freed memory instead of unmapping it "
                  "(on CPU: no page faults per call; resident memory never "
                  "shrinks and can grow with fragmentation).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  from vqgan_jax import sample_lib
  host_memory.keep_freed_host_memory(FLAGS.host_malloc)
  try:
    compilation_cache.enable_compilation_cache(FLAGS.compilation_cache_dir)
  except ValueError as e:
    cli.fail(e)
  grid = None
  if FLAGS.grid:
    try:
      grid = tuple(int(v) for v in FLAGS.grid.lower().split("x"))
      assert len(grid) == 2
    except (ValueError, AssertionError):
      raise cli.UsageError(f"--grid={FLAGS.grid!r}; expected HxW in tokens, "
                           "e.g. 32x48") from None
  classes = None
  if FLAGS.classes:
    try:
      classes = [int(c) for c in FLAGS.classes]
    except ValueError:
      raise cli.UsageError(f"--classes={','.join(FLAGS.classes)!r}; expected "
                           "class ids, e.g. --classes=3,5") from None
  interval = None
  if FLAGS.guidance_interval:
    try:
      interval = tuple(float(v) for v in FLAGS.guidance_interval)
      assert len(interval) == 2
    except (ValueError, AssertionError):
      raise cli.UsageError(f"--guidance_interval={','.join(FLAGS.guidance_interval)!r}; "
                           "expected A,B, e.g. 0.2,0.8") from None
  if FLAGS.speculative_window < 0:
    raise cli.UsageError(f"--speculative_window={FLAGS.speculative_window}; "
                         "expected W >= 1, or 0 for one token per step")
  outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "samples")
  try:
    settings, from_model = sample_lib.resolve_sampling(
        sample_lib.sampling_defaults(FLAGS.workdir),
        sliding_window=bool(FLAGS.grid), temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p,
        guidance_scale=FLAGS.guidance_scale)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(e)
  if from_model:
    print("sampling with the model's config.sampling: " + ", ".join(
        f"{n}={settings[n]:g}" for n in from_model) +
          f" (a flag overrides it, e.g. --{from_model[0]}=...)")
  try:
    s = sample_lib.sample_images(
        FLAGS.workdir, outdir,
        classes=classes,
        num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed, **settings,
        guidance_schedule=FLAGS.guidance_schedule,
        guidance_power=FLAGS.guidance_power, guidance_interval=interval,
        speculative_window=FLAGS.speculative_window, grid=grid,
        cond_images=FLAGS.cond_images, save_npz=FLAGS.npz)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(e)
  print(f"wrote {s['images']} samples to {outdir} (grid: {s['grid']}); "
        f"{s['img_per_sec']:.1f} images/s, not counting "
        f"{s['compile_seconds']:.1f} s of compilation")


if __name__ == "__main__":
  cli.run(main, __doc__)
