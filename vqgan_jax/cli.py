"""The command line every entry point shares: absl flags, one way to fail.

The scripts (``train_vqgan.py``, ``train_transformer.py``, ``sample.py``) and
the ``python -m`` tools (``vqgan_jax.convert``, ``vqgan_jax.reconstruct``,
``vqgan_jax.evaluate``, ``benchmarks``) define absl flags and parse them
here, so that they behave alike:

* ``--help`` (``-h``, ``--helpshort``) prints the tool's docstring and the
  flags its own modules define, and exits 0. absl's own ``--help`` lists
  only flags declared in the ``__main__`` module, so a script whose flags
  live in an imported module (the trainers' in `vqgan_jax.training.launch`)
  showed none of them; absl's ``--helpfull`` still lists every flag.
* Every command-line mistake (an unknown flag, a bad value, a missing
  required flag, a stray argument, or a :class:`UsageError` the tool raises,
  e.g. for a missing input file) prints one ``error:`` line on stderr and
  exits with status 2 (:data:`EXIT_USAGE`), without a traceback.
* Third-party INFO chatter (the checkpoint library's, JAX's TPU probe) is
  silenced (`vqgan_jax.console.quiet_logs`); ``--verbose``, a flag every
  entry point gets, lets it through.

Scripts parse the global ``flags.FLAGS`` through :func:`run` (absl's
``app.run`` with this module's parser). Tools whose ``main(argv)`` tests call
in-process parse a fresh ``flags.FlagValues`` with :func:`parse`, so ``main``
can run more than once in one interpreter.
"""
from __future__ import annotations

import sys
from typing import Callable, List, NoReturn, Optional, Sequence

from absl import app
from absl import flags

from vqgan_jax import console

EXIT_USAGE = 2
_HELP = ("--help", "-h", "-help", "--helpshort", "-helpshort")


class UsageError(ValueError):
  """A command-line mistake: reported as one ``error:`` line, exit status 2."""


def fail(message) -> NoReturn:
  """Prints ``error: message`` (on one line) to stderr and exits 2."""
  text = " ".join(str(message).split())
  print(f"error: {text}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _wants_help(args: Sequence[str], extra=()) -> bool:
  for a in args:
    if a == "--":
      return False
    if a in _HELP or a in extra:
      return True
  return False


def help_text(doc: str, fv: flags.FlagValues = flags.FLAGS) -> str:
  """``doc`` and the flags of ``fv`` that the tool's modules define.

  Flags that absl defines for every program (logging, ``--helpfull``, ...)
  are left to ``--helpfull``.
  """
  lines = [(doc or "").strip(), "", "flags:"]
  for module, defined in sorted(fv.flags_by_module_dict().items()):
    if module.startswith("absl.") or not defined:
      continue
    # module_help starts with a blank line and the module's name.
    lines += fv.module_help(module).split("\n")[2:]
  return "\n".join(lines) + "\n"


def _unknown_field(argv: Sequence[str], error: Exception,
                   field_hint: Optional[Callable[[str], Optional[str]]]
                   ) -> str:
  """One line for an ml_collections override that names no config field.

  ml_collections reports ``--config.model.chh=3`` as a KeyError or
  AttributeError whose text is the missing key, sometimes followed by a
  "Did you mean" suggestion.
  """
  text = str(error.args[0] if error.args else error)
  text = text.encode().decode("unicode_escape").strip("'\"")
  key, _, suggestion = text.partition("\n")
  key = key.strip("'\"")
  flag = next((a.split("=", 1)[0] for a in argv
               if a.startswith("--config.") and
               key in a.split("=", 1)[0].split(".")), "--config")
  message = f"{flag}: the config has no field {key!r}"
  hint = field_hint(key) if field_hint else None
  if hint:
    message += f"; {hint}"
  elif suggestion:
    message += f"; {suggestion.strip()}"
  return message


def _define_verbose(fv: flags.FlagValues) -> None:
  if "verbose" not in fv:
    flags.DEFINE_bool("verbose", False, "Also print third-party INFO logs "
                      "(checkpoint library, JAX backend probes).",
                      flag_values=fv)


def _parse_into(fv: flags.FlagValues, argv: List[str], doc: str,
                extra_help=(),
                field_hint: Optional[Callable[[str], Optional[str]]] = None
                ) -> List[str]:
  _define_verbose(fv)
  if _wants_help(argv[1:], extra_help):
    sys.stdout.write(help_text(doc, fv))
    sys.exit(0)
  try:
    rest = fv(argv)
    console.quiet_logs(verbose=bool(fv["verbose"].value))
    return rest
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      # A config file's get_config raised: keep the flag and the last line.
      head = text.split("Traceback (most recent call last)")[0]
      text = f"{head.rstrip()} {text.strip().splitlines()[-1]}"
    fail(text)
  except (AttributeError, KeyError) as e:
    # An ml_collections override (--config.FIELD=VALUE) of a missing field.
    fail(_unknown_field(argv, e, field_hint))


def parse(fv: flags.FlagValues, argv: Optional[Sequence[str]], doc: str,
          prog: str, max_args: int = 0) -> List[str]:
  """Parses ``argv`` (without the program name; default ``sys.argv[1:]``)
  into ``fv`` and returns the positional arguments (at most ``max_args``)."""
  args = list(sys.argv[1:] if argv is None else argv)
  rest = _parse_into(fv, [prog] + args, doc, extra_help=("--helpfull",))[1:]
  if len(rest) > max_args:
    fail(f"unexpected argument {rest[max_args]!r} (flags are --NAME=VALUE; "
         "--help lists them)")
  return rest


def run(main: Callable[[List[str]], object], doc: str,
        field_hint: Optional[Callable[[str], Optional[str]]] = None) -> None:
  """``app.run(main)`` with this module's ``--help`` and one-line errors.

  ``main`` receives the remaining arguments (the program name first); a
  :class:`UsageError` or ``app.UsageError`` from it exits 2 with one line.
  ``field_hint(name)`` may explain an unknown ``--config`` field (e.g. where
  a renamed field went); ``None`` from it keeps ml_collections' suggestion.
  """

  def guarded(argv):
    # Again: app.run resets absl's logger level after parsing the flags.
    console.quiet_logs(verbose=bool(flags.FLAGS["verbose"].value))
    try:
      return main(argv)
    except (UsageError, app.UsageError) as e:
      fail(e)

  app.run(guarded, flags_parser=lambda argv: _parse_into(
      flags.FLAGS, argv, doc, field_hint=field_hint))
