"""Every entry point's command line (`vqgan_jax.cli`): absl flags, `--help`
that lists the tool's own flags and exits 0, and one `error:` line on stderr
with exit status 2 for a command-line mistake, without a traceback.

The scripts run in a subprocess (they parse absl's global flags), which
proves the real exit path; the `python -m` tools, whose `main(argv)` parses
its own flags, run in-process, since their start-up imports JAX. Most
mistakes are batched in-process per entry point (the trainers through
`training.launch.run` with a patched `sys.argv`), and each checks that the
workdir is left as it was."""
import re

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
    ("benchmarks.probes.speculative", ["--windows", "--schedules"]),
    ("benchmarks.ablations.digits_quantizers", ["--workdir", "--options"]),
    ("benchmarks.ablations.digits_seeds", ["--workdir", "--seeds"]),
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


# --------------------------------------------------------------------------
# Every entry point's mistakes, batched in-process (each entry point keeps
# one subprocess case above, which proves the real exit path): one `error:`
# line on stderr, exit 2, no traceback, and the workdir left as it was.


def _tree(path):
  """Every file under `path` with its size and mtime (None: no such path)."""
  import os  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    return None
  return sorted((os.path.relpath(os.path.join(root, f), path),
                 os.path.getsize(os.path.join(root, f)),
                 os.path.getmtime(os.path.join(root, f)))
                for root, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """A folder of four small RGB photos for the folder config."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
        root / f"{i}.png")
  return root


def _run_trainer(trainer, args, monkeypatch, capfd):
  """`train_vqgan.py ARGS` / `train_transformer.py ARGS` in this process;
  returns (exit status, stderr)."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import launch  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS
  for name in [n for n in fv if n.startswith("config.")]:
    delattr(fv, name)  # ml_collections' override flags of the last call
  fv.unparse_flags()
  monkeypatch.setattr(sys, "argv", [f"train_{trainer}.py"] + args)
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    launch.run(f"vqgan_jax.training.{trainer}_trainer")
  return e.value.code, capfd.readouterr().err


def test_trainer_mistakes_exit_2_with_one_line_and_leave_the_workdir(
    tmp_path, photos, monkeypatch, capfd):
  from vqgan_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(tfds_source, "available", lambda: False)
  workdir = tmp_path / "run"
  (workdir / "keep").mkdir(parents=True)
  (workdir / "keep" / "notes.txt").write_text("mine")
  before = _tree(workdir)
  cpu = f"--config=configs/folder_vqgan.py:{photos},cpu"
  w = f"--workdir={workdir}"
  cases = [
      ("vqgan", [f"--config=configs/folder_vqgan.py:{photos},tpu", w],
       "error: flag --config=configs/folder_vqgan.py:...: ValueError: unknown "
       "preset 'tpu'"),
      ("vqgan", [cpu, w, "--config.batch_sise=8"],
       "error: --config.batch_sise: the config has no field 'batch_sise'; "
       "Did you mean \"batch_size\""),
      ("vqgan", [cpu, w, "--config.batch_size=eight"],
       "error: flag --config.batch_size=eight: "),
      ("vqgan", ["--config=configs/no_such_file.py", w],
       "error: --config: cannot load the config file"),
      ("vqgan", [cpu], "error: flag --workdir=None: "),
      ("vqgan", [cpu, w, "--config.model.attn_resolutions=(3,)"],
       "error: config.model.attn_resolutions contains [3], never reached"),
      ("vqgan", [cpu, w, "--config.dataset=tfds:mnist"],
       "error: config.dataset='tfds:mnist' needs TensorFlow Datasets"),
      ("vqgan", [cpu, w, "--config.init_from=/no/such/dir"],
       "error: config.init_from=/no/such/dir does not exist"),
      # the perceptual term without its weights, then with a missing file
      ("vqgan", [cpu, w, "--config.loss.perceptual_weight=1.0"],
       "error: config.loss.perceptual_weight=1.0 needs LPIPS weights"),
      ("vqgan", [cpu, w, "--config.loss.perceptual_weight=1.0",
                 f"--config.loss.lpips_vgg_path={tmp_path / 'vgg16.pth'}",
                 f"--config.loss.lpips_lin_path={tmp_path / 'vgg.pth'}"],
       "error: config.loss.lpips_vgg_path: VGG16 weights file not found"),
      ("transformer", ["--config=configs/digits_transformer.py", w,
                       "--config.gpt.n_layr=2"],
       "error: --config.gpt.n_layr: the config has no field 'n_layr'"),
      ("transformer", ["--config=configs/digits_transformer.py", w,
                       f"--config.vqgan_workdir={tmp_path / 'none'}"],
       f"error: config.vqgan_workdir={tmp_path / 'none'} does not exist"),
  ]
  for trainer, args, message in cases:
    code, err = _run_trainer(trainer, args, monkeypatch, capfd)
    assert code == 2, (args, err[-2000:])
    pattern = ".*".join(re.escape(part) for part in message.split("..."))
    assert re.match(pattern, _one_error_line(err)), (args, err)
    assert _tree(workdir) == before, args


def test_tool_mistakes_exit_2_with_one_line(tmp_path, photos, capsys):
  """evaluate (each mode), reconstruct, convert and benchmarks."""
  from vqgan_jax import evaluate  # pylint: disable=import-outside-toplevel
  missing = tmp_path / "missing"
  cases = [
      (evaluate.main, [], "error: give one mode"),
      (evaluate.main, ["judge"], "error: give one mode"),
      (evaluate.main, ["reconstruction", "--vqgn=x"],
       "error: Unknown command line flag 'vqgn'"),
      (evaluate.main, ["reconstruction", "--batch_size=big"],
       "error: flag --batch_size=big: "),
      (evaluate.main, ["reconstruction"], "error: reconstruction needs --vqgan"),
      (evaluate.main, ["reconstruction", f"--vqgan={missing}"],
       "error: no such directory"),
      (evaluate.main, ["reconstruction", f"--vqgan={missing}",
                       "--dataset=imagenet"],
       "error: unknown dataset 'imagenet'; --dataset must be one of"),
      (evaluate.main, ["reconstruction", f"--vqgan={missing}",
                       f"--lpips_vgg={missing}.pth",
                       f"--lpips_lin={missing}.pth"],
       "error: --lpips_vgg: VGG16 weights file not found"),
      (evaluate.main, ["samples", f"--samples={photos}",
                       "--reference=digits"], "error: samples needs --inception"),
      (evaluate.main, ["samples", f"--samples={photos}", "--reference=digits",
                       f"--inception={missing}.pth"],
       "error: --inception: Inception weights not found"),
      (evaluate.main, ["digits-judge"], "error: digits-judge needs --samples"),
      (evaluate.main, ["digits-judge", f"--samples={missing}"],
       "error: samples folder not found"),
      (reconstruct.main, [f"--model={missing}", f"--images={photos}",
                          f"--out={tmp_path / 'o'}"],
       "error: no such directory"),
      (reconstruct.main, ["--model=m", f"--images={photos}"],
       "error: flag --out=None: "),
      (convert.main, ["--checkpoint=a.ckpt", f"--config={missing}.yaml",
                      f"--out={tmp_path / 'o'}"],
       "error: config file not found"),
      (benchmarks_cli.main, ["--only=bogus"], "error: --only=bogus: valid"),
  ]
  from vqgan_jax import cli  # pylint: disable=import-outside-toplevel
  for main, argv, message in cases:
    try:
      try:
        code = main(argv)
      except cli.UsageError as e:  # benchmarks' __main__ block does this
        cli.fail(e)
    except SystemExit as e:
      code = e.code
    assert code == 2, (argv, capsys.readouterr())
    assert _one_error_line(capsys.readouterr().err).startswith(message), argv
  assert not (tmp_path / "o").exists()


def test_sample_py_workdir_without_checkpoint_exits_2(tmp_path):
  """A transformer workdir whose first save has not finished, and class ids
  that are not numbers: one line, exit 2 (as the trainers)."""
  from vqgan_jax import checkpoint  # pylint: disable=import-outside-toplevel
  checkpoint.write_model_json(str(tmp_path), "transformer", {})
  (tmp_path / "checkpoints" / "100").mkdir(parents=True)  # no commit marker
  before = _tree(tmp_path)
  r = tu.run_python(["sample.py", f"--workdir={tmp_path}"], check=False,
                    timeout=120)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert "holds no complete checkpoint" in _one_error_line(r.stderr)
  assert _tree(tmp_path) == before
