"""What the programs print: the trainers' header and memory check, the
labelled progress, throughput without compilation, quiet third-party logs."""
import logging
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import console
from vqgan_jax import reconstruct
from vqgan_jax import sharding as shard_lib
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.backends import device_memory
from vqgan_jax.training import loop
from vqgan_jax.training import schema
from vqgan_jax.training import startup
from vqgan_jax.training import vqgan_trainer
from vqgan_jax_testing import train_utils as tu


def test_trainer_prints_its_header_then_refuses_a_step_over_the_limit(
    tmp_path, monkeypatch, capsys):
  config = tu.load_config("digits_vqgan", "test")
  config.model.ch_mult = (1,)  # the smallest program: compiles fastest
  monkeypatch.setenv(device_memory.LIMIT_ENV, "64K")
  workdir = tmp_path / "run"
  with pytest.raises(startup.MemoryLimitError) as e:
    vqgan_trainer.train_and_evaluate(config, str(workdir))
  # A ConfigError: launch.py prints it as one `error:` line and exits 2.
  assert isinstance(e.value, schema.ConfigError)
  message = str(e.value)
  assert "\n" not in message
  for part in ("XLA's estimate", "64.0 KiB", "folder_vqgan.py:PATH,cpu",
               "--config.batch_size", "--config.model.ch",
               "--config.ignore_memory_limit=True"):
    assert part in message, (part, message)
  assert not workdir.exists()  # refused before anything was written
  out = capsys.readouterr().out
  header = out.strip().splitlines()
  assert header[0].startswith("stage 1 VQGAN: generator ")
  assert "discriminator" in header[0] and "parameters" in header[0]
  assert "batch 8 (8 per device) on 1 device (cpu" in header[1]
  assert "by XLA's estimate of 64.0 KiB available" in header[2]
  assert "compiled in" in header[2]


class _Analysis:
  argument_size_in_bytes = 3000
  output_size_in_bytes = 3000
  alias_size_in_bytes = 2000
  temp_size_in_bytes = 1000


class _Compiled:

  def memory_analysis(self):
    return _Analysis()


def test_memory_check_is_arguments_outputs_temps_less_aliased(
    monkeypatch, capsys):
  assert device_memory.compiled_bytes(_Compiled()) == 5000
  assert device_memory.parse_bytes("1.5G") == 3 * 2**29
  mesh = shard_lib.make_mesh({"data": 1})
  config = ml_collections.ConfigDict(dict(batch_size=4,
                                          ignore_memory_limit=False))
  kw = dict(stage="stage 2 transformer", sizes=[("GPT", 1234)], mesh=mesh,
            compiled=_Compiled(), compile_seconds=1.5,
            smaller="--config.gpt.n_embd")
  monkeypatch.setenv(device_memory.LIMIT_ENV, "5000")
  assert startup.start(config, **kw) == 5000  # fits exactly
  monkeypatch.setenv(device_memory.LIMIT_ENV, "4999")
  with pytest.raises(startup.MemoryLimitError, match="--config.gpt.n_embd"):
    startup.start(config, **kw)
  config.ignore_memory_limit = True
  assert startup.start(config, **kw) == 5000
  out = capsys.readouterr().out
  assert "stage 2 transformer: GPT 1.2 K parameters" in out
  assert "batch 4 (4 per device)" in out


def test_progress_bar_has_a_label_the_loss_and_eval_lines(capsys):
  bar = loop.Progress(True, 0, 10, label="stage 1 VQGAN",
                      keys=("loss", "rec_loss"))
  bar(3)
  bar.show({"loss": np.float32(0.123456), "rec_loss": 0.05, "grad_norm": 2.0})
  bar.note(loop.format_eval(400, {"eval_psnr": 31.234,
                                  "eval_codebook_usage": 0.781,
                                  "eval_perplexity": 30.04,
                                  "eval_images": 180}))
  bar(1)
  bar.close()
  captured = capsys.readouterr()
  text = captured.out + captured.err
  assert "stage 1 VQGAN" in text
  assert "loss 0.1235 rec_loss 0.05" in text and "grad_norm" not in text
  assert ("step 400: eval psnr 31.23 dB, codebook usage 78.1%, "
          "perplexity 30.04, on 180 images") in captured.out
  assert loop.format_eval(5, {"loss": 1.0}) is None  # no eval numbers


def test_log_lines_print_above_the_open_bar_not_through_it(capsys):
  """While a bar is open, the project's log lines (a checkpoint save, a
  warning) go through the bar's write, whole lines on stderr, and the
  terminal handlers stay quiet; afterwards they are back."""
  root = logging.getLogger()
  terminal = logging.StreamHandler(sys.stderr)
  terminal.setFormatter(logging.Formatter("HANDLER %(message)s"))
  level = root.level
  root.addHandler(terminal)
  root.setLevel(logging.INFO)
  try:
    bar = loop.Progress(True, 0, 10, label="stage 1 VQGAN")
    bar(2)
    logging.info("saving checkpoint at step %d to %s", 2, "/runs/x")
    logging.warning("step %d: the loss is not finite", 3)
    bar.close()
    logging.info("after the bar")
  finally:
    root.removeHandler(terminal)
    root.setLevel(level)
  err = capsys.readouterr().err
  assert "\nsaving checkpoint at step 2 to /runs/x\n" in err.replace("\r", "\n")
  assert "WARNING: step 3: the loss is not finite" in err
  assert "HANDLER saving" not in err and "HANDLER step 3" not in err
  assert "HANDLER after the bar" in err  # the handler is back
  assert not any(isinstance(h, console.LogsAboveBar) for h in root.handlers)


def test_initial_state_gives_the_donating_step_distinct_buffers():
  """An array held twice in a fresh state (loaded weights that also start
  the weight average) is copied once; restore_or_init applies it."""
  a, b = jnp.ones(3), jnp.zeros(2)
  # device_put (as the trainer places a loaded state) gives two array objects
  # over one buffer.
  state = jax.device_put({"params": {"w": a}, "ema_params": {"w": a}, "other": b},
                         jax.devices()[0])
  state["n"] = 3
  ptr = lambda x: x.unsafe_buffer_pointer()
  assert ptr(state["params"]["w"]) == ptr(state["ema_params"]["w"])
  out = loop.distinct_buffers(state)
  pair = [out["params"]["w"], out["ema_params"]["w"]]
  assert ptr(pair[0]) != ptr(pair[1])
  for x in pair:
    np.testing.assert_array_equal(x, a)
    assert x.sharding == state["params"]["w"].sharding
  assert out["other"] is state["other"] and out["n"] == 3
  step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  step({k: v for k, v in out.items() if k != "n"})  # donates without error


def test_step_clock_leaves_out_the_first_step_and_reports_once(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
  clock = loop.StepClock(start=100, total=1000, min_steps=4)
  lines = []
  for step in range(101, 110):
    # the first step (101) compiles and warms up: 30 s; then 0.5 s a step
    now[0] += 30.0 if step == 102 else 0.5
    lines.append(clock.tick(step))
  reported = [l for l in lines if l]
  assert len(reported) == 1
  assert clock.seconds_per_step == pytest.approx(0.5)
  assert "0.5 s/step" in reported[0] and "steps 102-105" in reported[0]
  assert "ETA 7 min 28 s for the 895 steps left of 1000" in reported[0]


def test_format_duration():
  assert console.format_duration(0.25) == "0.25 s"
  assert console.format_duration(75) == "1 min 15 s"
  assert console.format_duration(5400) == "1 h 30 min"
  assert console.format_duration(4.8e6).endswith("days")


def test_third_party_info_is_quiet_unless_verbose():
  probe = logging.getLogger("jax._src.xla_bridge")
  record = logging.LogRecord("jax._src.xla_bridge", logging.INFO, __file__, 1,
                             "Unable to initialize backend 'tpu': no", (), None)
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  line = logging.LogRecord("vqgan_jax.data", logging.INFO, "pipeline.py", 277,
                           "digits:train: enlarging %s", ("images",), None)
  warn = logging.LogRecord("x", logging.WARNING, "x.py", 1, "careful", (), None)
  try:
    console.quiet_logs(verbose=False)
    assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
    assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
    assert logging.getLogger("absl").isEnabledFor(logging.WARNING)
    assert not probe.filter(record)
    # The project's own lines print plainly, without absl's prefix.
    assert handler.format(line) == "digits:train: enlarging images"
    assert handler.format(warn) == "WARNING: careful"
  finally:
    console.quiet_logs(verbose=True)
  assert probe.filter(record)
  assert logging.getLogger("absl").level == logging.NOTSET
  assert handler.format(line).startswith("I") and "pipeline.py:277]" in handler.format(line)


TINY_VQ = dict(ch=32, out_ch=3, ch_mult=(1,), num_res_blocks=1,
               attn_resolutions=(), dropout=0.0, in_channels=3, resolution=8,
               z_channels=32, n_embed=16, embed_dim=8)


def test_one_batch_reconstruct_rate_is_finite_and_leaves_out_compilation(
    tmp_path):
  # sample.py's rate on one batch: tests/test_transformer.py
  # (test_convert_cli_then_sample_py).
  vq = vqgan_lib.from_config(TINY_VQ)
  # Random weights of the model's shapes (compiling its initialiser would
  # cost more than the whole test).
  shapes = jax.eval_shape(lambda r: vqgan_lib.init_variables(vq, r),
                          jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
  model_dir = ckpt_lib.save_pretrained(str(tmp_path / "vqgan"), "vqgan",
                                       vqgan_lib.model_config(vq), variables)
  images = tmp_path / "images"
  images.mkdir()
  for i in range(2):
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
        images / f"{i}.png")
  r = reconstruct.reconstruct_folder(model_dir, str(images),
                                     str(tmp_path / "rec"), batch_size=4,
                                     progress=False)
  assert r["images"] == 2  # one (padded) batch
  assert math.isfinite(r["img_per_sec"]) and r["img_per_sec"] > 0
  assert r["compile_seconds"] > 0


def test_stopwatch_leaves_out_compile_time():
  f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)
  x = jnp.ones((64, 64))
  watch = console.Stopwatch()
  for _ in range(3):
    with watch:
      f(x).block_until_ready()
    watch.count(1)
  assert 0 < watch.compile_seconds < watch.wall
  assert watch.steady_seconds == pytest.approx(watch.wall -
                                               watch.compile_seconds)
  assert watch.rate == pytest.approx(3 / watch.steady_seconds)
  assert console.Stopwatch().rate == 0.0  # nothing timed: 0, not NaN
