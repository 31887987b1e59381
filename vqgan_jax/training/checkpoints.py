"""Workdir checkpoints: orbax CheckpointManager with atomic, async saves.

The on-disk format (file names, the commit marker, listing committed steps,
``model.json``) is :mod:`vqgan_jax.checkpoint`'s; this module adds what
training needs on top of it.

A step directory counts only once orbax has committed it, so a run killed in
the middle of a save leaves the previous step intact and the next start
resumes from it. Steps that are there but incomplete (no commit marker, or
files missing or damaged so that restoring fails) are moved aside to
``checkpoints/STEP.incomplete-N`` with a warning, and the newest complete
step before them is used.

A workdir whose checkpoints were written by another model or optimizer than
the config builds is refused with :class:`CheckpointMismatchError` (a
``ConfigError``, so the scripts exit with code 2 and one line) and nothing is
moved: :func:`check_resume` compares the workdir's ``model.json`` with the
config before any device work, and :meth:`Checkpointer.restore` compares the
stored tree (orbax's metadata: paths and shapes) with the target state.

Faults of the file system: :func:`check_workdir` refuses a workdir that is
a file, cannot be written or has no room for a checkpoint before training
starts (a ``ConfigError``: exit 2, one line). A save that fails during the
run (a full disk, a quota, a file-size limit) raises
:class:`CheckpointSaveError` naming the workdir, the cause and the last
complete step, which stays intact: the failed step never receives orbax's
commit marker and is set aside on the next start.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from etils import epath
import jax
import orbax.checkpoint as ocp

from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax.training import schema

MAX_LISTED = 4  # differing paths named in a mismatch message
EXIT_SAVE_FAILED = 4  # the scripts' exit code when a checkpoint cannot be saved
MIN_FREE_BYTES = 1 << 20  # the least free space a workdir's disk must have


class CheckpointMismatchError(schema.ConfigError):
  """The workdir's checkpoints hold another model or optimizer than the
  config builds; the message names the differences and the fix."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, quota, permissions); the
  message names the workdir, the cause and the last complete step."""


class Checkpointer:
  """Saves and restores ``{'state': pytree, 'meta': json}`` per step.

  A save that fails, whether at once or in the background (seen at the next
  ``save``, ``wait`` or ``close``), raises :class:`CheckpointSaveError`;
  ``close`` after that reported failure does not raise again.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir),
                                  ckpt_lib.CHECKPOINTS_DIR)
    self._saving: Optional[int] = None  # the step of the save in flight
    self._failed = False
    _quiet_orbax_tracebacks()
    self._set_aside(ckpt_lib.unfinished_dirs(self.directory),
                    "a save that never finished (no commit marker)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: Dict[str, Any], *,
           force: bool = False) -> bool:
    """Starts an (asynchronous) save of ``state`` at ``step`` (after the
    previous save has finished)."""
    self.wait()
    self._saving = int(step)
    try:
      saved = self._mngr.save(
          int(step), args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    if saved:
      logging.info("saving checkpoint at step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state, step: Optional[int] = None
              ) -> Tuple[Any, Dict[str, Any], int]:
    """Restores onto ``abstract_state``'s shapes, dtypes and shardings.

    Without ``step``, the newest step that restores: a newer step that fails
    to restore while an older one succeeds is damaged (a config mismatch
    would fail on every step), so it is moved aside with a warning. When
    every step fails, the newest step's error is raised and nothing moves.

    Returns:
      ``(state, meta, step)``.
    """
    if step is not None:
      self._check_layout(abstract_state, [step])
      return self._restore(abstract_state, step) + (step,)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    self._check_layout(abstract_state, steps[:1])
    errors = []
    for s in steps:
      try:
        state, meta = self._restore(abstract_state, s)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d in %s does not restore (%s: %s); "
                        "trying an older step", s, self.directory,
                        type(e).__name__, str(e)[:300])
        errors.append((s, e))
        continue
      if errors:
        self._set_aside([str(bad) for bad, _ in errors],
                        f"it does not restore while step {s} does")
      return state, meta, s
    self._check_layout(abstract_state, steps, cause=errors[0][1])
    raise errors[0][1]

  def stored_layout(self, step: int) -> Optional[Dict[str, Tuple]]:
    """``{path: (shape, dtype)}`` of the state saved at ``step`` (orbax's
    metadata; nothing is read from the arrays), or None if unreadable."""
    path = os.path.join(self.directory, str(step), "state")
    try:
      tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
    except Exception:  # pylint: disable=broad-except
      return None  # damaged: left to the restore loop
    out = tree_layout(getattr(tree, "tree", tree))
    return out or None

  def _check_layout(self, abstract_state, steps: Sequence[int],
                    cause: Optional[BaseException] = None) -> None:
    """Raises CheckpointMismatchError for the first of ``steps`` whose stored
    tree has other paths or shapes than ``abstract_state``."""
    want = tree_layout(abstract_state)
    for s in steps:
      have = self.stored_layout(s)
      if have is None:
        continue
      diff = layout_diff(have, want)
      if not diff:
        return
      raise CheckpointMismatchError(_mismatch_message(
          os.path.dirname(self.directory), s, diff, len(set(have) | set(want)),
          params_match=all(_is_opt(p.split(":")[0]) for p in diff))
      ) from cause

  def _restore(self, abstract_state, step: int):
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})

  def _set_aside(self, names, why: str) -> None:
    """Moves damaged step directories out of orbax's sight (process 0; every
    process calls this, with or without names, so the barrier lines up)."""
    for name in names:
      logging.warning("ignoring checkpoint %s in %s: %s; moving it to "
                      "%s.incomplete-N", name, self.directory, why,
                      name.split(".")[0])
    if jax.process_index() == 0:
      for name in names:
        dst = os.path.join(self.directory, name.split(".")[0] + ".incomplete")
        n = 0
        while os.path.exists(f"{dst}-{n}"):
          n += 1
        os.rename(os.path.join(self.directory, name), f"{dst}-{n}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoints_set_aside")
    if names and getattr(self, "_mngr", None) is not None:
      self._mngr.reload()

  def wait(self):
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    self._saving = None

  def close(self):
    reported = self._failed
    try:
      self.wait()
    except CheckpointSaveError as e:
      if not reported:
        raise
      logging.warning("%s", e)
    finally:
      try:
        self._mngr.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("closing the checkpoint manager: %s", e)

  def _save_error(self, cause: BaseException) -> CheckpointSaveError:
    self._failed = True
    step, self._saving = self._saving, None
    done = ckpt_lib.committed_steps(self.directory) if os.path.isdir(
        self.directory) else []
    reason = " ".join(str(cause).split())
    reason = (reason[:300] + "...") if len(reason) > 300 else reason
    last = (f"the last complete checkpoint, step {max(done)}, is intact: "
            "rerun the same command to resume from it" if done else
            "no complete checkpoint was written yet")
    return CheckpointSaveError(
        f"saving the checkpoint of step {step} in "
        f"{os.path.dirname(self.directory)} failed ({_cause(cause)}: "
        f"{reason}); {last} after freeing space on that disk (or moving the "
        "workdir to another one)")


def check_workdir(workdir: str, need_bytes: int = MIN_FREE_BYTES) -> None:
  """Refuses a workdir that cannot hold a run, before any work.

  The directory is created if missing (and removed again if this check
  made it), a small probe file is written, synced and removed, and the
  disk's free space is compared with ``need_bytes`` (a rough size of one
  checkpoint, or a floor when the model is not built yet).

  Raises:
    schema.ConfigError: one line naming the workdir, the fault and the fix.
  """
  path = os.path.abspath(workdir)
  flag = f"--workdir={workdir}"
  if os.path.exists(path) and not os.path.isdir(path):
    raise schema.ConfigError(f"{flag} is a file, not a directory; pass a "
                             "directory (it is created if missing)")
  made = []
  probe = os.path.join(path, f".write-probe-{os.getpid()}")
  try:
    head = path
    while not os.path.isdir(head):
      made.append(head)
      head = os.path.dirname(head)
    os.makedirs(path, exist_ok=True)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
      os.write(fd, b"\0" * 4096)
      os.fsync(fd)
    finally:
      os.close(fd)
    free = shutil.disk_usage(path).free
  except OSError as e:
    raise schema.ConfigError(
        f"{flag} cannot be written ({_cause(e)}: {e.strerror or e}); pass a "
        "directory you can write to, on a disk with free space") from e
  finally:
    if os.path.exists(probe):
      os.remove(probe)
    for d in made:  # leave the file system as it was
      try:
        os.rmdir(d)
      except OSError:
        break
  if free < need_bytes:
    raise schema.ConfigError(
        f"{flag} is on a disk with {_mb(free)} free, and one checkpoint "
        f"needs about {_mb(need_bytes)}; free space or pass a --workdir on "
        "another disk")


def state_bytes(tree) -> int:
  """Bytes of the arrays of ``tree`` (abstract or concrete): about the size
  of one checkpoint of it."""
  return sum(int(getattr(x, "size", 0)) * getattr(
      getattr(x, "dtype", None), "itemsize", 4) for x in jax.tree.leaves(tree))


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def _cause(e: BaseException) -> str:
  """What failed, in words: errno names for OS errors, or the message."""
  errno = getattr(e, "errno", None)
  text = str(e)
  for code, words in ((28, "disk full"), (122, "disk quota exceeded"),
                      (27, "file too large"), (13, "permission denied"),
                      (30, "read-only file system"),
                      (20, "a part of the path is a file")):
    if errno == code or f"os_error_code='{code}'" in text:
      return words
  return type(e).__name__


def _quiet_orbax_tracebacks() -> None:
  """A failed background save is reported once, as CheckpointSaveError.

  orbax also logs it with a traceback per thread, asyncio reports each
  abandoned write as "Task exception was never retrieved", and tensorstore
  callbacks then meet a closed event loop: the log records keep their
  message line only, and the other two are dropped.
  """
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _QuietFailedSave) for f in logger.filters):
      logger.addFilter(_QuietFailedSave())
  if not getattr(sys.unraisablehook, "_drops_closed_loop", False):
    previous = sys.unraisablehook

    def hook(unraisable):
      e = unraisable.exc_value
      if not (isinstance(e, RuntimeError) and
              str(e) == "Event loop is closed"):
        previous(unraisable)

    hook._drops_closed_loop = True  # pylint: disable=protected-access
    sys.unraisablehook = hook


class _QuietFailedSave(logging.Filter):

  def filter(self, record):
    if not record.exc_info:
      return True
    if record.name == "asyncio":  # an abandoned write of a failed save
      return ".orbax-checkpoint-tmp" not in str(record.exc_info[1])
    if "orbax" in (record.pathname or ""):
      record.exc_info = None
      record.exc_text = None
    return True


def check_resume(workdir: str, want: Dict[str, Any], keys: Sequence[str],
                 section: Sequence[str] = ("config",)) -> None:
  """Refuses, before any device work, to resume ``workdir`` with another
  architecture than its ``model.json`` records.

  Args:
    workdir: the run's workdir; nothing happens unless it holds a committed
      checkpoint and a readable ``model.json``.
    want: the config's values of ``keys``.
    keys: the fields to compare.
    section: where the stored values sit in ``model.json`` (``("config",)``
      for the model config, ``("train_config", "gpt")`` for stage 2).

  Raises:
    CheckpointMismatchError: naming the workdir, the newest step, each
      differing field with both values, and the fix. Nothing is touched.
  """
  workdir = os.path.abspath(workdir)
  done = ckpt_lib.committed_steps(
      os.path.join(workdir, ckpt_lib.CHECKPOINTS_DIR))
  path = os.path.join(workdir, ckpt_lib.MODEL_FILE)
  if not done or not os.path.isfile(path):
    return
  try:
    have = ckpt_lib.read_model_json(workdir)
    for k in section:
      have = have[k]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    logging.warning("cannot compare the config with %s (%s); the checkpoint "
                    "itself is checked when it is restored", path, e)
    return
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  diff = [f"{k}: checkpoint {norm(have.get(k))!r} vs config {norm(want[k])!r}"
          for k in keys if k in have and norm(have[k]) != norm(want[k])]
  if diff:
    raise CheckpointMismatchError(
        f"--workdir={workdir} holds checkpoints (newest step {max(done)}) of "
        f"another architecture: {', '.join(diff)}; " + _fix(workdir))


def tree_layout(tree) -> Dict[str, Tuple]:
  """``{'a/b/0/c': (shape, dtype)}`` for every array leaf of ``tree``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "shape"):
      out[_path_str(path)] = (tuple(leaf.shape),
                              str(getattr(leaf, "dtype", "")))
  return out


def layout_diff(have: Dict[str, Tuple], want: Dict[str, Tuple]) -> List[str]:
  """One line per path whose shape differs, or that only one side has;
  model parameters first, optimizer state last."""
  diff = []
  for p in sorted(set(have) | set(want), key=lambda p: (_is_opt(p), p)):
    if p not in want:
      diff.append(f"{p}: in the checkpoint {_fmt(have[p])}, not in the config")
    elif p not in have:
      diff.append(f"{p}: in the config {_fmt(want[p])}, not in the checkpoint")
    elif have[p][0] != want[p][0]:
      diff.append(f"{p}: checkpoint {_fmt(have[p])} vs config {_fmt(want[p])}")
  return diff


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fmt(layout: Tuple) -> str:
  shape, dtype = layout
  return f"{shape} {dtype}".strip()


def _is_opt(path: str) -> bool:
  """Optimizer state (``opt_state``, ``disc_opt_state``), not the model."""
  return "opt_state" in path.split("/")[0]


def _fix(workdir: str) -> str:
  path = os.path.join(workdir, ckpt_lib.MODEL_FILE)
  if os.path.isfile(path):
    how = (f"resume with the config the run was started with (saved under "
           f"\"train_config\" in {path})")
  else:
    how = "resume with the config the run was started with"
  return f"{how}, or pass a new --workdir to start another run"


def _model_kind(workdir: str) -> Optional[str]:
  try:
    return ckpt_lib.read_model_json(workdir).get("kind")
  except (OSError, ValueError, AttributeError):
    return None


def _mismatch_message(workdir: str, step: int, diff: List[str], total: int,
                      params_match: bool) -> str:
  listed = "; ".join(diff[:MAX_LISTED])
  if len(diff) > MAX_LISTED:
    listed += f"; and {len(diff) - MAX_LISTED} more"
  fix = _fix(workdir)
  if params_match and _model_kind(workdir) == "vqgan":
    fix += (" (only the optimizer state differs: to continue from this "
            "run's weights with the new optimizer settings, start a new "
            f"--workdir with --config.init_from={workdir})")
  return (f"--workdir={workdir} holds checkpoints of another model or "
          f"optimizer than this config builds (step {step}: {len(diff)} of "
          f"{total} arrays differ: {listed}); {fix}")


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (for restore)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
