"""Faults of the file system and of the hosts: a workdir that cannot hold a
run is refused before training, a save that fails mid-run stops the run
with one line and keeps the last complete checkpoint, a signal stops every
process at the same step within one step, a second signal quits at once,
and ``metrics.jsonl`` holds each step once after any of these.

Most cases drive the real ``train_loop`` and ``Checkpointer`` in-process on
a small fake state; the trainers run in subprocesses only where a property
needs its own process (the command line, a second signal, two hosts).
"""
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax.training import checkpoints
from vqgan_jax.training import loop
from vqgan_jax.training import schema

N = 4096  # parameters of the fake state: 16 KB of random float32 per save


def _config(steps, every, log_every=1):
  return ml_collections.ConfigDict(dict(num_train_steps=steps, log_every=log_every,
                                        checkpoint_every=every, max_bad_steps=3))


def _init():
  w = jnp.asarray(np.random.default_rng(0).standard_normal(N, np.float32))
  return {"params": {"w": w}, "bad_steps": jnp.zeros((), jnp.int32)}


@jax.jit
def _step(state, batch):
  w = state["params"]["w"] * 0.5 + batch
  return dict(state, params={"w": w}), {"loss": jnp.mean(w * w),
                                        "skipped": jnp.zeros((), jnp.int32)}


def _run(wd, steps, every, hook=None, periodic=(), step_fn=_step, log_every=1):
  """Resumes (or starts) the fake run in ``wd`` to ``steps``; ``hook(step)``
  runs before each step's dispatch (1-based step about to be computed)."""
  ck = checkpoints.Checkpointer(str(wd))
  abstract = jax.eval_shape(_init)
  shard = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, start = loop.restore_or_init(
      ck, abstract, jax.tree.map(lambda _: shard, abstract), _init)

  def next_batch(step):
    if hook is not None:
      hook(step + 1)
    return jnp.float32(step + 1)

  return loop.train_loop(_config(steps, every, log_every), str(wd), ck, state, start,
                         next_batch=next_batch, step_fn=step_fn,
                         log_extras=lambda rate, skipped: {},
                         periodic=periodic)


def _steps(wd):
  return [r["step"] for r in tu.rows(wd) if "loss" in r]


def _restored(wd):
  ck = checkpoints.Checkpointer(str(wd))
  abstract = jax.eval_shape(_init)
  shard = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, meta, step = ck.restore(checkpoints.abstract_with_shardings(
      abstract, jax.tree.map(lambda _: shard, abstract)))
  ck.close()
  return np.asarray(state["params"]["w"]), meta, step


class _FileSizeLimit:
  """A full disk, as far as a save can tell: no file may grow past ``limit``
  bytes (``RLIMIT_FSIZE``; SIGXFSZ ignored, so writes fail with EFBIG)."""

  def __init__(self, limit=2048):
    self.limit = limit

  def __enter__(self):
    self._sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    self._lim = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self._lim[1]))

  def __exit__(self, *exc):
    resource.setrlimit(resource.RLIMIT_FSIZE, self._lim)
    signal.signal(signal.SIGXFSZ, self._sig)


# ----------------------------------------------------------------------------
# The workdir, before training


def test_workdir_that_is_a_file_unwritable_or_full_is_refused_in_one_line(tmp_path,
                                                                          monkeypatch):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(schema.ConfigError, match=r"^--workdir=.*/file is a file, not a directory; "
                     r"pass a directory \(it is created if missing\)$"):
    checkpoints.check_workdir(str(f))
  with pytest.raises(schema.ConfigError, match=r"/file/run cannot be written \(a part of the "
                     r"path is a file: Not a directory\)"):
    checkpoints.check_workdir(str(f / "run"))
  # A new workdir passes and is left as it was (not created); an existing one
  # keeps exactly its files.
  checkpoints.check_workdir(str(tmp_path / "new" / "run"))
  assert sorted(os.listdir(tmp_path)) == ["file"]
  checkpoints.check_workdir(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["file"]
  # Unwritable and full disks, as the probe write sees them.
  real_open, real_fsync = os.open, os.fsync
  for err, words in [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
                     (errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk quota exceeded")]:
    if err in (errno.EACCES, errno.EROFS):
      monkeypatch.setattr(os, "open", lambda *a, e=err, **k: (_ for _ in ()).throw(
          OSError(e, os.strerror(e))))
    else:
      monkeypatch.setattr(os, "fsync", lambda fd, e=err: (_ for _ in ()).throw(
          OSError(e, os.strerror(e))))
    with pytest.raises(schema.ConfigError, match=rf"^--workdir=.*/wd cannot be written \({words}: "
                       r".*\); pass a directory you can write to, on a disk with free space$"):
      checkpoints.check_workdir(str(tmp_path / "wd"))
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path)) == ["file"]
  # Less free space than one checkpoint: refused in restore_or_init, before
  # the state is built.
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))
  checkpoints.check_workdir(str(tmp_path), need_bytes=9 << 20)
  with pytest.raises(schema.ConfigError, match=r"is on a disk with 10\.0 MiB free, and one "
                     r"checkpoint needs about 12\.0 MiB; free space or pass a --workdir"):
    checkpoints.check_workdir(str(tmp_path), need_bytes=12 << 20)
  assert checkpoints.state_bytes(jax.eval_shape(_init)) == 4 * N + 4
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4 * N))
  ck = checkpoints.Checkpointer(str(tmp_path / "wd"))
  with pytest.raises(schema.ConfigError, match=r"one checkpoint needs about"):
    loop.restore_or_init(ck, jax.eval_shape(_init), None, lambda: pytest.fail("built"))
  ck.close()


def test_cli_refuses_a_workdir_that_is_a_file_before_the_dataset(tmp_path):
  f = tmp_path / "wd"
  f.write_text("x")
  r = tu.run_python(["-c", "import sys, runpy\n"
                     "from vqgan_jax import data\n"
                     "data.build_dataset = lambda *a, **k: sys.exit('dataset built')\n"
                     "runpy.run_path('train_vqgan.py', run_name='__main__')",
                     "--config=configs/digits_vqgan.py:test", f"--workdir={f}"],
                    check=False, timeout=300)
  assert r.returncode == schema.EXIT_CONFIG, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (f"error: --workdir={f} is a file, not a directory; "
                                               "pass a directory (it is created if missing)")
  assert "Traceback" not in r.stderr and f.read_text() == "x"


# ----------------------------------------------------------------------------
# A save that fails mid-run


def test_failed_async_save_names_workdir_and_cause_and_keeps_the_last_step(tmp_path, caplog):
  ck = checkpoints.Checkpointer(str(tmp_path))
  ck.save(1, {"w": np.zeros(N, np.float32)}, {"step": 1}, force=True)
  ck.wait()
  rand = np.random.default_rng(0).standard_normal(N).astype(np.float32)
  with _FileSizeLimit():
    ck.save(2, {"w": rand}, {"step": 2}, force=True)  # fails in the background
    with pytest.raises(checkpoints.CheckpointSaveError) as e:
      ck.wait()
  assert str(e.value).startswith(f"saving the checkpoint of step 2 in {tmp_path} failed (file "
                                 "too large: ")
  assert str(e.value).endswith("the last complete checkpoint, step 1, is intact: rerun the same "
                               "command to resume from it after freeing space on that disk (or "
                               "moving the workdir to another one)")
  ck.close()  # reported once: closing does not raise again
  assert "Traceback" not in caplog.text
  assert ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [1]
  ck = checkpoints.Checkpointer(str(tmp_path))  # the half-written step is set aside
  assert ck.all_steps() == [1]
  assert any(n.startswith("2.incomplete") for n in os.listdir(tmp_path / "checkpoints"))
  ck.close()


def test_save_failure_mid_run_stops_the_loop_and_resume_keeps_metrics_once(tmp_path):
  """Checkpoints every 2 steps; the disk fills before step 5: the save of
  step 6 fails (seen at the latest when the loop closes), the run raises
  CheckpointSaveError, step 4 stays intact, and the resumed run recomputes
  5-8 exactly: metrics.jsonl holds steps 1-8 once each."""
  wd = tmp_path / "wd"
  full = _run(tmp_path / "full", 8, 2)
  limit = _FileSizeLimit(8192)

  def hook(s):
    if s == 5:  # once the save of step 4 has committed
      while not ckpt_lib.is_committed(str(wd / "checkpoints"), 4):
        time.sleep(0.01)
      limit.__enter__()
  try:
    with pytest.raises(checkpoints.CheckpointSaveError, match=r"step 6 in .*/wd failed \(file too "
                       r"large: .*the last complete checkpoint, step 4, is intact"):
      _run(wd, 8, 2, hook=hook)
  finally:
    limit.__exit__()
  assert _steps(wd)[:6] == [1, 2, 3, 4, 5, 6]
  assert ckpt_lib.committed_steps(str(wd / "checkpoints")) == [2, 4]
  w, meta, step = _restored(wd)
  assert step == 4 and meta["step"] == 4
  out = _run(wd, 8, 2)
  assert not out.stopped and (out.start_step, out.step) == (4, 8)
  assert _steps(wd) == list(range(1, 9))
  assert [r["loss"] for r in tu.rows(wd)] == [r["loss"] for r in tu.rows(tmp_path / "full")]
  np.testing.assert_array_equal(_restored(wd)[0], _restored(tmp_path / "full")[0])
  assert full.describe("W", "C").startswith("done: W, steps 1-8 (loss ")
  assert _run(wd, 8, 2).describe("W", "C") == (
      "nothing to train: W already holds step 8 of config.num_train_steps=8; raise it to train "
      "further, or pass a new --workdir")
  assert _steps(wd) == list(range(1, 9))


# ----------------------------------------------------------------------------
# Signals


def test_sigterm_stops_at_the_current_step_without_its_callbacks_and_resumes(tmp_path):
  """SIGTERM arrives while step 3 is being prepared: no later step is
  dispatched, step 3 is saved without running its periodic callback, the
  summary says where it stopped and how to resume; the resumed run ends
  with the parameters and metrics of an uninterrupted one, each step once."""
  wd = tmp_path / "wd"
  calls = []
  periodic = [loop.Periodic(1, lambda step, state, batch: calls.append(step))]
  hook = lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 3 else None
  handler = signal.getsignal(signal.SIGTERM)
  out = _run(wd, 10, 100, hook=hook, periodic=periodic)
  assert signal.getsignal(signal.SIGTERM) is handler  # put back
  assert out.stopped and out.step == 3 and calls == [1, 2]
  assert out.describe("W", "python train.py --workdir=W") == (
      "stopped at step 3 of 10 after a signal; the checkpoint of step 3 is saved in W. Resume "
      "with: python train.py --workdir=W")
  assert ckpt_lib.committed_steps(str(wd / "checkpoints")) == [3]
  assert _steps(wd) == [1, 2, 3]
  out = _run(wd, 10, 100, periodic=periodic)
  assert not out.stopped and out.step == 10 and calls == [1, 2] + list(range(4, 11))
  _run(tmp_path / "full", 10, 100)
  assert _steps(wd) == list(range(1, 11))
  assert [r["loss"] for r in tu.rows(wd)] == [r["loss"] for r in tu.rows(tmp_path / "full")]
  np.testing.assert_array_equal(_restored(wd)[0], _restored(tmp_path / "full")[0])


def test_a_signal_during_a_slow_step_stops_right_after_that_step(tmp_path):
  """Steps of over a second, metrics read rarely (so the host could run a
  step ahead): SIGTERM while step 4 computes stops the run after step 4;
  step 5 is never computed."""
  computed = []

  def slow(x):
    computed.append(int(x))
    if int(x) == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(loop.SETTLE_STEP_S * 1.05)
    return x

  @jax.jit
  def slow_step(state, batch):
    batch = jax.pure_callback(slow, jax.ShapeDtypeStruct((), jnp.float32), batch)
    return _step(state, batch)

  out = _run(tmp_path, 100, 100, step_fn=slow_step, log_every=100)
  assert out.stopped and out.step == 4 and computed == [1, 2, 3, 4], (out.step, computed)
  assert ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [4]


def test_metrics_rows_past_the_restored_step_are_dropped_once(tmp_path):
  """What a SIGKILL leaves: rows after the last checkpoint and a cut line."""
  _run(tmp_path, 4, 2)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  _run(tmp_path, 6, 2)
  assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
  assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")


SECOND_SIGINT = r"""
import asyncio, importlib.util, os, signal, sys
from orbax.checkpoint._src.path import atomicity
spec = importlib.util.spec_from_file_location("test_faults", "tests/test_faults.py")
tf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tf)
wd, marker = sys.argv[1], sys.argv[2]
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def stalled(self, *a, **kw):
  if os.path.basename(str(self._final_path)) == "3":
    open(marker, "w").close()  # every file written, not yet committed
    await asyncio.sleep(3600)
  return await finalize(self, *a, **kw)

atomicity.AtomicRenameTemporaryPath.finalize = stalled
tf._run(wd, 10, 2, hook=lambda s: os.kill(os.getpid(), signal.SIGINT) if s == 3 else None)
print("not reached")
"""


def test_second_ctrl_c_quits_at_once_and_the_last_complete_checkpoint_stays(tmp_path):
  """Ctrl-C at step 3 starts its save; the save hangs before its commit and
  a second Ctrl-C ends the process at once. Step 2 restores; the
  half-written step 3 is set aside by the next start."""
  wd, marker = tmp_path / "wd", tmp_path / "saving"
  proc = subprocess.Popen([sys.executable, "-c", SECOND_SIGINT, str(wd), str(marker)],
                          cwd=tu.ROOT, env=tu.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
      time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    quit_s = time.time() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGINT and quit_s < 5, (proc.returncode, quit_s, err[-2000:])
  assert "received signal 2: saving a checkpoint and stopping after the current step" in err
  assert "not reached" not in out and "Traceback" not in err
  assert ckpt_lib.committed_steps(str(wd / "checkpoints")) == [2]
  w, meta, step = _restored(wd)
  assert step == 2 and meta["step"] == 2
  assert any(n.startswith("3.incomplete") for n in os.listdir(wd / "checkpoints"))
  _run(wd, 4, 2)
  assert _steps(wd) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------
# The command line: a failed save, and a preemption notice on one of two hosts


FILL_DISK = r"""
import resource, signal, sys, runpy
from vqgan_jax.training import checkpoints
full_from = int(sys.argv.pop(1))
save = checkpoints.Checkpointer.save

def save_on_a_full_disk(self, step, *a, **kw):
  if step >= full_from:
    self.wait()  # the previous save completes on a disk with room
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
  return save(self, step, *a, **kw)

checkpoints.Checkpointer.save = save_on_a_full_disk
sys.argv = sys.argv[1:]
runpy.run_path("train_vqgan.py", run_name="__main__")
"""

TINY = ["--config=configs/digits_vqgan.py:test", "--config.model.ch_mult=(1,)",
        "--config.model.resolution=8", "--config.log_every=1", "--config.eval_every=0",
        "--config.image_every=0"]


def test_cli_save_failure_exits_4_with_one_line_and_no_traceback(tmp_path):
  wd = tmp_path / "wd"
  r = tu.run_python(["-c", FILL_DISK, "2", "train_vqgan.py", f"--workdir={wd}", *TINY,
                     "--config.num_train_steps=3", "--config.checkpoint_every=1"],
                    check=False, timeout=600)
  assert r.returncode == checkpoints.EXIT_SAVE_FAILED, r.stderr[-4000:]
  assert "Traceback" not in r.stderr, r.stderr[-4000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1, r.stderr[-4000:]
  assert err[0].startswith(f"error: saving the checkpoint of step 2 in {wd} failed (file too "
                           "large: "), err[0]
  assert "the last complete checkpoint, step 1, is intact: rerun the same command" in err[0]
  assert ckpt_lib.committed_steps(str(wd / "checkpoints")) == [1]
  assert "done:" not in r.stdout


TWO_HOSTS = r"""
import sys, runpy
wd, port, pid = sys.argv[1:4]
sys.argv = ["train_vqgan.py", "--workdir=" + wd, "--coordinator_address=127.0.0.1:" + port,
            "--num_processes=2", "--process_id=" + pid] + sys.argv[4:]
runpy.run_path("train_vqgan.py", run_name="__main__")
"""


def test_sigterm_on_one_of_two_hosts_stops_both_at_the_same_saved_step(tmp_path):
  """Process 1 alone gets SIGTERM (a preemption notice): JAX's preemption
  service tells process 0, both stop at the same step, save it together and
  exit 0 with the same line; their replicas are identical, metrics.jsonl
  holds each step once, and each process (two local devices each) read its
  own part of the data."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  wd = tmp_path / "wd"
  opts = TINY + ["--config.num_train_steps=100000", "--config.checkpoint_every=100000"]
  procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, str(wd), port, str(i)] + opts,
                            cwd=tu.ROOT, env=tu.env(devices=2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if (wd / "metrics.jsonl").exists() and tu.rows(wd):  # both are training
        break
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-4000:]
  lines = [o.strip().splitlines()[-1] for o, _ in outs]
  steps = ckpt_lib.committed_steps(str(wd / "checkpoints"))
  assert len(steps) == 1 and 1 <= steps[0] < 100000, steps
  assert lines[0].startswith(f"stopped at step {steps[0]} of 100000 after a signal; the "
                             f"checkpoint of step {steps[0]} is saved in {wd}. Resume with: "
                             "python train_vqgan.py --workdir="), lines[0]
  assert lines[0].endswith("(on every process)")
  assert lines[1].startswith(f"stopped at step {steps[0]} of 100000"), lines[1]
  digests = [open(wd / f"replica_digest.{i}").read() for i in range(2)]
  assert digests[0] == digests[1]
  assert _steps(wd) == list(range(1, steps[0] + 1))
  last = [r for r in tu.rows(wd) if "num_examples" in r][-1]
  assert last["num_local_examples"] < last["num_examples"]
