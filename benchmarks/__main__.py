r"""Side-by-side benchmarks of vqgan-jax and the reference: one table.

    python -m benchmarks                      # this machine's preset
    python -m benchmarks --tiny               # tiny configs (checks the script)
    python -m benchmarks --only=sampling,encode_decode --dtype=float32 \
        --out=BENCHMARKS.md
    python -m benchmarks --merge a.json b.json --out=table.md
    python -m benchmarks --help

Rows: stage-1 training images/s, stage-2 training tokens/s, sampling
tokens/s and encode+decode images/s, for ours (``--dtype``) and the
reference (``--ref``: ``float32`` and/or ``autocast`` = torch.autocast to
bfloat16), on the same configs and batches, alternating after warm-up,
medians; the ratio to the reference's float32; compile time; peak memory
(ours: XLA's memory plan of the compiled call; the reference:
torch.cuda.max_memory_allocated on GPU, n/a on CPU); FLOPs per call from
XLA's cost analysis and the MFU against the device's peak (table.peaks: the
trainer's PEAK_TFLOPS; on CPU against a measured float32 matmul rate).

Every section is independent: an error prints and the rest still run. Each
section's table prints as soon as it finishes.

``--malloc=keep`` lets glibc's malloc keep freed memory for reuse
(`vqgan_jax.backends.host_memory.keep_freed_host_memory`, what the scripts'
``--host_malloc=keep`` does), in this process, so for both implementations
alike. With glibc's defaults the reference's sampler, whose key/value past
grows by `torch.cat` every step, spends a third of its CPU time in page
faults on a 2-core CPU (12.9 s of system time in a 19.4 s call), and XLA:CPU
faults in its temporaries afresh on every call; see BENCHMARKS.md.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402
import jax  # noqa: E402

from benchmarks import suite  # noqa: E402
from benchmarks import table  # noqa: E402
from vqgan_jax import cli  # noqa: E402
from vqgan_jax.backends import host_memory  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
  """The command line's flags, defined on ``fv``."""
  flags.DEFINE_bool("tiny", False, "Tiny configs (minutes on an idle CPU: "
                    "checks the harness).", flag_values=fv)
  flags.DEFINE_enum("preset", None, sorted(suite.PRESETS), "Sizes and "
                    "timing settings (default: tiny with --tiny, else gpu or "
                    "cpu by backend).", flag_values=fv)
  flags.DEFINE_list("only", list(suite.SECTIONS), "Sections to run, of "
                    f"{','.join(suite.SECTIONS)}.", flag_values=fv)
  flags.DEFINE_list("dtype", ["float32", "bfloat16"], "Our compute dtypes.",
                    flag_values=fv)
  flags.DEFINE_list("ref", None, "Reference precisions: float32,autocast "
                    "(default: float32 on CPU, both on GPU; 'none' skips the "
                    "reference).", flag_values=fv)
  flags.DEFINE_integer("repeats", None, "Timed calls per implementation "
                       "(default: the preset's).", flag_values=fv)
  flags.DEFINE_integer("warmup", None, "Warm-up calls per implementation "
                       "(default: the preset's).", flag_values=fv)
  flags.DEFINE_multi_string("set", [], "SECTION.KEY=VALUE: override a size, "
                            "e.g. --set=train_vqgan.size=128.",
                            flag_values=fv)
  flags.DEFINE_enum("malloc", "default", list(host_memory.HOST_MALLOC_MODES),
                    "keep: glibc malloc keeps freed memory for reuse "
                    "(host_memory.keep_freed_host_memory; both implementations).",
                    flag_values=fv)
  flags.DEFINE_string("out", "", "Also write the table here (markdown).",
                      flag_values=fv)
  flags.DEFINE_string("json", "", "Also write the rows here.", flag_values=fv)
  flags.DEFINE_bool("merge", False, "Print one table from the earlier --json "
                    "files given as arguments, and exit.", flag_values=fv)


def _sizes(preset: str, overrides) -> dict:
  sizes = {k: dict(v) for k, v in suite.PRESETS[preset].items()
           if isinstance(v, dict)}
  for item in overrides:
    key, _, value = item.partition("=")
    sec, _, name = key.partition(".")
    if sec not in sizes or name not in sizes[sec]:
      raise cli.UsageError(f"--set {item!r}: expected SECTION.KEY=VALUE with "
                       f"SECTION in {sorted(sizes)} and KEY one of that "
                       "section's sizes")
    old = sizes[sec][name]
    sizes[sec][name] = (value.lower() in ("1", "true", "yes")
                        if isinstance(old, bool) else type(old)(value))
  return sizes


def machine(cpu_peak=None, kept_freed_memory=False) -> str:
  dev = jax.devices()[0]
  parts = [f"{platform.machine()}, {os.cpu_count()} CPU cores",
           f"{len(jax.devices())} x {dev.platform}:{dev.device_kind}",
           f"jax {jax.__version__}", f"python {platform.python_version()}"]
  try:
    import torch  # pylint: disable=import-outside-toplevel
    parts.append(f"torch {torch.__version__}")
  except ImportError:
    pass
  if platform.libc_ver()[0] == "glibc":
    parts.append("glibc malloc keeps freed memory (--malloc=keep)"
                 if kept_freed_memory else "glibc malloc defaults")
  if cpu_peak:
    parts.append(f"MFU peak: measured f32 matmul {cpu_peak:.3g} TFLOP/s")
  return ", ".join(parts)


def render(rows, notes, header: str) -> str:
  return "\n".join([header, "", table.format_rows(rows), ""] +
                   [f"- {n}" for n in notes]) + "\n"


def main(argv=None) -> int:
  """The command line (``argv`` without the program name); returns the exit
  status. Raises `cli.UsageError` for a bad value."""
  fv = flags.FlagValues()
  define_flags(fv)
  merge = cli.parse(fv, argv, __doc__, prog="python -m benchmarks",
                    max_args=1 << 30)
  if merge and not fv.merge:
    raise cli.UsageError(f"unexpected argument {merge[0]!r} (JSON files are "
                         "for --merge)")
  if fv.merge and not merge:
    raise cli.UsageError("--merge needs the --json files to merge")
  kept = False
  if fv.malloc == "keep" and not fv.merge:  # before JAX starts a backend
    kept = host_memory.keep_freed_host_memory("keep")
  if fv.merge:
    rows, notes, machines, cmds = [], [], [], []
    for path in merge:
      with open(path) as f:
        r, n, m = table.from_json(f.read())
      rows += r
      notes += n
      machines += [m["machine"]] if m.get("machine") not in machines else []
      cmds.append(m.get("command", path))
    text = render(rows, notes + [f"command: `{c}`" for c in cmds],
                  "Machine: " + "; ".join(machines))
    print(text, flush=True)
    if fv.out:
      with open(fv.out, "w") as f:
        f.write(text)
    return 0

  unknown = [n for n in fv.only if n not in suite.SECTIONS]
  if unknown:
    raise cli.UsageError(f"--only={','.join(fv.only)}: valid sections: "
                         f"{','.join(suite.SECTIONS)}")
  gpu = jax.default_backend() == "gpu"
  preset = fv.preset or ("tiny" if fv.tiny else "gpu" if gpu else "cpu")
  sizes = _sizes(preset, fv.set)
  ref = tuple(fv.ref or (("float32", "autocast") if gpu else ("float32",)))
  ref = () if ref == ("none",) else ref
  bad = set(ref) - {"float32", "autocast"}
  if bad:
    raise cli.UsageError(f"--ref={','.join(ref)}: valid: float32, autocast, "
                         "none")
  bad = [d for d in fv.dtype if d not in ("float32", "bfloat16")]
  if bad:
    raise cli.UsageError(f"--dtype={','.join(fv.dtype)}: valid: float32, "
                         "bfloat16")
  cpu_peak = None
  if table.peaks()[0] is None:
    cpu_peak = table.measure_cpu_matmul_tflops()
  env = suite.Env(fv.dtype, ref,
                  fv.repeats or suite.PRESETS[preset]["repeats"],
                  fv.warmup if fv.warmup is not None
                  else suite.PRESETS[preset]["warmup"], cpu_peak=cpu_peak)
  cmd = "python -m benchmarks " + " ".join(argv if argv is not None
                                           else sys.argv[1:])
  header = (f"# `{cmd.strip()}` (preset {preset}), "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
            f"UTC\n\nMachine: {machine(cpu_peak, kept)}")
  print(header, flush=True)
  rows, notes = [], []
  for name in fv.only:
    print(f"\n## {name} ...", flush=True)
    try:
      r, n = suite.run_section(name, env, sizes[name])
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      n, r = [f"{name}: FAILED: {type(e).__name__}: {e}"], []
    changed = [item[len(name) + 1:] for item in fv.set
               if item.startswith(name + ".")]
    if changed:  # rows of another size are another benchmark (own ratios)
      label = " (" + ", ".join(changed) + ")"
      r = [dataclasses.replace(row, bench=row.bench + label) for row in r]
    if cpu_peak and r:
      n.append(f"{name}: MFU on CPU is against a float32 matmul rate of "
               f"{cpu_peak:.3g} TFLOP/s measured at start-up")
    rows += r
    notes += n
    print(table.format_rows(r) if r else "", flush=True)
    for line in n:
      print(f"- {line}", flush=True)
  text = render(rows, notes, header)
  if len(fv.only) > 1:
    print("\n" + text, flush=True)
  if fv.out:
    with open(fv.out, "w") as f:
      f.write(text)
  if fv.json:
    with open(fv.json, "w") as f:
      f.write(table.to_json(rows, notes, {
          "header": header, "machine": machine(kept_freed_memory=kept),
          "command": cmd.strip()}))
  return 0 if rows else 1


if __name__ == "__main__":
  try:
    sys.exit(main())
  except cli.UsageError as e:
    cli.fail(e)
