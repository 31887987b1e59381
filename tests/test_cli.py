"""Every entry point's command line (`vqgan_jax.cli`): absl flags, `--help`
that lists the tool's own flags and exits 0, and one `error:` line on stderr
with exit status 2 for a command-line mistake, without a traceback.

The scripts run in a subprocess (they parse absl's global flags and start
fast); the `python -m` tools whose `main(argv)` parses its own flags run
in-process, since their start-up imports JAX."""
import pytest

from benchmarks import __main__ as benchmarks_cli
from vqgan_jax import convert
from vqgan_jax import reconstruct
from vqgan_jax_testing import train_utils as tu

_TRAIN = ["--config", "--workdir", "--host_malloc", "--compilation_cache_dir",
          "--coordinator_address", "--num_processes", "--process_id"]
SCRIPTS = {
    "train_vqgan.py": (["train_vqgan.py"], _TRAIN),
    "train_transformer.py": (["train_transformer.py"], _TRAIN),
    "sample.py": (["sample.py"], [
        "--workdir", "--classes", "--num_samples", "--outdir", "--top_k",
        "--top_p", "--temperature", "--guidance_scale", "--grid", "--npz",
        "--host_malloc", "--guidance_schedule", "--guidance_interval",
        "--speculative_window"]),
    "evaluate": (["-m", "vqgan_jax.evaluate"], [
        "--vqgan", "--dataset", "--samples", "--reference", "--inception",
        "--output", "--num_examples"]),
}
TOOLS = {
    "convert": (convert.main, [
        "--checkpoint", "--config", "--out", "noisy-gumbel"]),
    "reconstruct": (reconstruct.main, [
        "--model", "--images", "--out", "--resolution", "--batch_size",
        "bf16"]),
    "benchmarks": (benchmarks_cli.main, [
        "--only", "--dtype", "--ref", "--set", "--preset", "tiny", "merge",
        "--out", "--json", "--malloc"]),
}


def _check_help(out: str, key_flags):
  assert "flags:" in out, out
  missing = [f for f in key_flags if f not in out]
  assert not missing, (missing, out)
  # absl's own flags (logging, profiling) stay under --helpfull.
  assert "--verbosity" not in out and "--run_with_pdb" not in out


def _one_error_line(stderr: str) -> str:
  assert "Traceback" not in stderr, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_help_lists_its_flags_and_exits_0(name):
  cmd, key_flags = SCRIPTS[name]
  r = tu.run_python(cmd + ["--help"], check=False, timeout=120)
  assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
  _check_help(r.stdout, key_flags)


@pytest.mark.parametrize("cmd, message", [
    (["train_vqgan.py", "--no_such_flag=1"],
     "error: Unknown command line flag 'no_such_flag'"),
    (["train_transformer.py", "--config=configs/digits_transformer.py",
      "--workdir=w", "--host_malloc=sometimes"],
     "error: flag --host_malloc=sometimes: value should be one of"),
    (["sample.py", "--no_such_flag=1"],
     "error: Unknown command line flag 'no_such_flag'"),
    (["sample.py", "--workdir=.", "--grid=3"], "error: --grid='3'"),
    (["-m", "vqgan_jax.evaluate"], "error: give one mode"),
    (["-m", "vqgan_jax.evaluate", "digits-judge", "--seed=x"],
     "error: flag --seed=x: "),
    (["-m", "vqgan_jax.convert", "--no_such_flag=1"],
     "error: Unknown command line flag 'no_such_flag'"),
    # ml_collections overrides: a misspelt field, a quantizer option under
    # its former flat name, a missing config file, a bad config argument.
    (["train_vqgan.py", "--config=configs/digits_vqgan.py:test", "--workdir=w",
      "--config.batch_sise=8"],
     "error: --config.batch_sise: the config has no field 'batch_sise'; "
     "Did you mean \"batch_size\""),
    (["train_vqgan.py", "--config=configs/digits_vqgan.py:test", "--workdir=w",
      "--config.model.fsq_levels=8,8"],
     "error: --config.model.fsq_levels: the config has no field 'fsq_levels';"
     " quantizer options moved: set "
     "config.model.quantizer_options.fsq.levels"),
    (["train_transformer.py", "--config=configs/no_such_file.py",
      "--workdir=w"], "error: --config: cannot load the config file"),
    (["train_vqgan.py", "--config=configs/digits_vqgan.py:bogus",
      "--workdir=w"], "error: flag --config=configs/digits_vqgan.py:bogus: "
     "Error whilst parsing config file: ValueError: unknown config argument"),
])
def test_script_mistakes_exit_2_with_one_error_line(cmd, message):
  r = tu.run_python(cmd, check=False, timeout=120)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert _one_error_line(r.stderr).startswith(message), r.stderr


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_help_lists_its_flags_and_exits_0(name, capsys):
  main, key_flags = TOOLS[name]
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  _check_help(capsys.readouterr().out, key_flags)


@pytest.mark.parametrize("name, argv, message", [
    ("convert", ["--no_such_flag=1"],
     "error: Unknown command line flag 'no_such_flag'"),
    ("convert", ["--checkpoint=a.ckpt"],
     "error: flag --config=None: Flag --config must have a value"),
    ("convert", ["--checkpoint=a", "--config=b", "--out=c", "extra"],
     "error: unexpected argument 'extra'"),
    ("reconstruct", ["--model=m", "--images=i", "--out=o",
                     "--batch_size=many"], "error: flag --batch_size=many: "),
    ("benchmarks", ["--preset=huge"], "error: flag --preset=huge: "),
])
def test_tool_flag_mistakes_exit_2_with_one_error_line(name, argv, message,
                                                       capsys):
  with pytest.raises(SystemExit) as e:
    TOOLS[name][0](argv)
  assert e.value.code == 2
  assert _one_error_line(capsys.readouterr().err).startswith(message)


def test_tool_input_mistakes_exit_2(tmp_path, capsys):
  assert convert.main([f"--checkpoint={tmp_path / 'a.ckpt'}",
                       f"--config={tmp_path / 'a.yaml'}",
                       f"--out={tmp_path / 'o'}"]) == 2
  assert _one_error_line(capsys.readouterr().err).startswith(
      "error: config file not found")
  assert reconstruct.main([f"--model={tmp_path}", f"--images={tmp_path}",
                           f"--out={tmp_path / 'o'}"]) == 2
  _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("module, key_flags", [
    ("benchmarks.probes.gpu_stage2_probe", ["--variants", "--trace_steps"]),
    ("benchmarks.probes.stage2_memory_plan", ["--preset", "--dtypes"]),
    ("benchmarks.probes.profile_transformer", ["--threads", "--repeats"]),
    ("benchmarks.probes.host_malloc", ["--mode", "--workload", "--steps"]),
    ("benchmarks.probes.scaling", ["--stage1_images_per_s", "--stage2_mfu"]),
    ("benchmarks.ablations.digits_quantizers", ["--workdir", "--options"]),
    ("benchmarks.ablations.digits_transformer_options",
     ["--vqgan_workdir", "--guidance_scales", "skip_judge"]),
])
def test_probe_and_ablation_help_and_mistakes(module, key_flags, capsys):
  import importlib  # pylint: disable=import-outside-toplevel
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  _check_help(capsys.readouterr().out, key_flags)
  with pytest.raises(SystemExit) as e:
    main(["--no_such_flag=1"])
  assert e.value.code == 2
  _one_error_line(capsys.readouterr().err)
