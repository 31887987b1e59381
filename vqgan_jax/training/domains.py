"""Value domains of config fields: a type and a range or a set of choices.

`schema.py` declares every field of both trainers' configs next to its
default as ``name=(default, domain)``, with the constructors below
(:func:`positive_int`, :func:`unit_interval`, :func:`one_of`, ...).
:meth:`Domain.violation` gives one line naming the field, the value, the
domain and a fix; :meth:`Domain.describe`
gives the domain for ``--config_help``. A domain is data (bounds, choices,
the domain of a tuple's items), so tests derive the values just outside each
one from it. :class:`ConfigError` is what every config check raises.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import ml_collections

_NO_DEFAULT = object()


class ConfigError(ValueError):
  """A config value that cannot work; the message says how to fix it."""


@contextlib.contextmanager
def as_config_error():
  """Re-raises a ``ValueError`` of a library check as ConfigError."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Domain:
  """The valid values of one config field.

  Attributes:
    kind: 'int', 'float' (finite), 'bool', 'str', 'choice', 'tuple', 'mesh'
      (axis name -> size) or 'rules' (``(regex, strategy)`` pairs).
    lo, hi: bounds of an 'int' or 'float' (None: unbounded), excluded when
      ``lo_open`` / ``hi_open``.
    also: values allowed besides the range (e.g. -1 for a mesh axis).
    choices: the values of a 'choice'.
    nonempty: a 'str' or 'tuple' may not be empty.
    item: the domain of a 'tuple''s items or of a 'mesh''s sizes.
    optional: None is allowed too.
    noun: what the value is, for messages ('path', 'dataset', ...).
    note: what special values mean, e.g. '0 = off'.
  """
  kind: str
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  also: Tuple[Any, ...] = ()
  choices: Tuple[Any, ...] = ()
  nonempty: bool = False
  item: Optional["Domain"] = None
  optional: bool = False
  noun: str = ""
  note: str = ""

  # -- what is valid

  def _typed(self, v) -> bool:
    if self.kind == "int":
      return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if self.kind == "float":
      return isinstance(v, numbers.Real) and not isinstance(v, bool)
    if self.kind == "bool":
      return isinstance(v, bool)
    if self.kind == "str":
      return isinstance(v, str)
    if self.kind in ("tuple", "rules"):
      return isinstance(v, (tuple, list))
    if self.kind == "mesh":
      return hasattr(v, "items")
    return True  # 'choice': compared with each choice

  def _in_range(self, v) -> bool:
    if v in self.also and type(v) is type(self.also[0]):
      return True
    if self.kind == "float" and not math.isfinite(v):
      return False
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

  def contains(self, v) -> bool:
    return self._problem("", v) is None

  def _problem(self, field: str, v) -> Optional[str]:
    """None, or what is wrong with ``v`` ('' when the field itself is)."""
    if v is None and self.optional:
      return None
    if self.kind == "choice":
      ok = any(v == c and type(v) is type(c) for c in self.choices)
      return None if ok else ""
    if not self._typed(v):
      return ""
    if self.kind in ("int", "float"):
      return None if self._in_range(v) else ""
    if self.kind in ("str", "tuple") and self.nonempty and not v:
      return ""
    if self.kind == "tuple":
      return "" if any(not self.item.contains(x) for x in v) else None
    if self.kind == "mesh":
      for axis, size in v.items():
        if not isinstance(axis, str) or not self.item.contains(size):
          return f"{field}.{axis}" if isinstance(axis, str) else ""
    if self.kind == "rules":
      return None if all(_is_rule(r) for r in v) else ""
    return None

  # -- how it reads

  def _range(self) -> str:
    lo, hi = _num(self.lo), _num(self.hi)
    if self.lo is not None and self.hi is not None:
      text = (f"in {'(' if self.lo_open else '['}{lo}, {hi}"
              f"{')' if self.hi_open else ']'}")
    elif self.lo is not None:
      text = f"{'>' if self.lo_open else '>='} {lo}"
    elif self.hi is not None:
      text = f"{'<' if self.hi_open else '<='} {hi}"
    else:
      text = ""
    return " or ".join([text] * bool(text) + [repr(a) for a in self.also])

  def describe(self) -> str:
    """The domain in words, e.g. 'integer > 0', 'number in (0, 1]'."""
    if self.kind == "choice":
      text = f"one of {self.choices}"
    elif self.kind in ("int", "float"):
      noun = self.noun or {"int": "integer", "float": "number"}[self.kind]
      text = f"{noun} {self._range()}".strip()
    elif self.kind == "bool":
      text = "true or false"
    elif self.kind == "str":
      text = (f"{self.noun or 'string'}"
              f"{'' if self.nonempty else ' or empty'}")
    elif self.kind == "tuple":
      text = (f"{'non-empty ' if self.nonempty else ''}tuple of "
              f"({self.item.describe()})")
    elif self.kind == "mesh":
      text = f"axis name -> size ({self.item.describe()})"
    else:
      text = ("tuple of (regex, strategy) pairs; strategy 'replicate', "
              "'fsdp' or a tuple of mesh-axis names or None")
    text += " or unset" if self.optional else ""
    return f"{text} ({self.note})" if self.note else text

  def violation(self, field: str, value, default=_NO_DEFAULT
                ) -> Optional[str]:
    """None for a valid value, else one line: ``config.FIELD=VALUE``, the
    domain and a fix; a tuple's fix shows ``default`` in override syntax."""
    problem = self._problem(field, value)
    if problem is None:
      return None
    if problem:  # one entry of a mapping
      return self.item.violation(problem, value[problem.rsplit(".", 1)[1]])
    name = f"config.{field}"
    if self.kind == "choice":
      note = f" ({self.note})" if self.note else ""
      return f"{name}={value!r}; valid: {self.choices}{note}"
    if self.kind in ("int", "float") and self._typed(value):
      what = self._range() + (f" ({self.note})" if self.note else "")
    else:
      what = self.describe()
      if not what.startswith(("one of", "true or")):
        what = ("an " if what[0] in "aeiou" else "a ") + what
    return f"{name}={value!r} must be {what}; {self._fix(field, default)}"

  def _fix(self, field: str, default) -> str:
    if self.kind == "tuple":  # the syntax of a tuple on the command line
      good = default is not _NO_DEFAULT and self.contains(default) and default
      text = f"write it as {override(field, default if good else ())}"
      if not self.nonempty and good:
        text += f", or {override(field, ())} for none"
      return text
    return (f"set --config.{field} to a valid value (--config_help lists "
            "every field and its domain)")


def _num(x) -> str:
  return "" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def _is_rule(rule) -> bool:
  if not isinstance(rule, (tuple, list)) or len(rule) != 2:
    return False
  pattern, strategy = rule
  if not isinstance(pattern, str):
    return False
  try:
    re.compile(pattern)
  except re.error:
    return False
  if strategy in ("replicate", "fsdp"):
    return True
  return isinstance(strategy, (tuple, list)) and all(
      a is None or isinstance(a, str) for a in strategy)


def cli_value(v) -> str:
  """``v`` as ml_collections parses it back from ``--config.FIELD=...``."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (tuple, list)):
    items = [cli_value(x) if isinstance(x, (tuple, list)) else repr(x)
             for x in v]
    return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
  return "" if v is None else str(v)


def override(field: str, v) -> str:
  """The command-line override that sets ``config.FIELD`` to ``v``, quoted
  for the shell where it needs to be."""
  arg = f"--config.{field}={cli_value(v)}"
  if not re.search(r"[\s()\[\]'\"*$;&|<>]", arg):
    return arg
  return f'"{arg}"' if "'" in arg else f"'{arg}'"


# -- Tables of fields: {name: (default, domain) or a section {name: ...}}


def build(fields: Mapping[str, Any]):
  """The ConfigDict of the defaults of ``fields``."""
  c = ml_collections.ConfigDict()
  for name, spec in fields.items():
    c[name] = build(spec) if isinstance(spec, dict) else spec[0]
  return c


def _leaves(fields: Mapping[str, Any], prefix: str = ""
            ) -> Iterator[Tuple[str, Any, Optional[Domain]]]:
  for name, spec in fields.items():
    if isinstance(spec, dict):
      yield from _leaves(spec, f"{prefix}{name}.")
    else:
      default, domain = spec
      if isinstance(default, ml_collections.FieldReference):
        default = default.get()
      yield f"{prefix}{name}", default, domain


def flatten(fields: Mapping[str, Any]) -> Dict[str, Tuple[Any, Optional[Domain]]]:
  """``{dotted field: (default, domain)}`` (FieldReferences resolved)."""
  return {f: (default, domain) for f, default, domain in _leaves(fields)}


def _value(config, field: str):
  for key in field.split("."):
    config = config[key]
  return config


def first_violation(config, table: Mapping[str, Tuple[Any, Optional[Domain]]]
                    ) -> Optional[str]:
  """The message of the first field of ``table`` whose value in ``config``
  lies outside its domain; fields the config lacks are skipped."""
  for field, (default, domain) in table.items():
    try:
      value = _value(config, field)
    except (KeyError, AttributeError, TypeError):
      continue
    message = domain and domain.violation(field, value, default)
    if message:
      return message
  return None


def describe_config(config, table: Mapping[str, Tuple[Any, Optional[Domain]]]
                    ) -> str:
  """One line per field of ``config``: its override and its domain."""
  rows = []

  def walk(node, prefix):
    for key, value in node.items():
      field = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(value, field + ".")
        continue
      domain = table.get(field, (None, None))[1]
      parent = table.get(prefix[:-1], (None, None))[1]
      if domain is None and parent is not None and parent.kind == "mesh":
        domain = parent.item
      rows.append((override(field, value),
                   domain.describe() if domain else "(no declared domain)"))

  walk(config, "")
  width = max(len(flag) for flag, _ in rows)
  return "".join(f"{flag:<{width}}  {what}\n" for flag, what in rows)


# -- Constructors (the schema's vocabulary)


def integer(note: str = "") -> Domain:
  return Domain("int", note=note)


def positive_int(note: str = "") -> Domain:
  return Domain("int", lo=0, lo_open=True, note=note)


def nonneg_int(note: str = "") -> Domain:
  return Domain("int", lo=0, note=note)


def int_at_least(n: int, note: str = "") -> Domain:
  return Domain("int", lo=n, note=note)


def positive(note: str = "") -> Domain:
  return Domain("float", lo=0.0, lo_open=True, note=note)


def nonneg(note: str = "") -> Domain:
  return Domain("float", lo=0.0, note=note)


def unit_interval(note: str = "") -> Domain:
  """(0, 1]: a probability that may not be 0."""
  return Domain("float", lo=0.0, lo_open=True, hi=1.0, note=note)


def fraction(note: str = "") -> Domain:
  """[0, 1): a dropout rate, a decay or a momentum."""
  return Domain("float", lo=0.0, hi=1.0, hi_open=True, note=note)


def open_unit(note: str = "") -> Domain:
  """(0, 1)."""
  return Domain("float", lo=0.0, lo_open=True, hi=1.0, hi_open=True,
                note=note)


def boolean(note: str = "") -> Domain:
  return Domain("bool", note=note)


def one_of(*choices, note: str = "") -> Domain:
  return Domain("choice", choices=tuple(choices), note=note)


def text(noun: str = "string", nonempty: bool = True, note: str = ""
         ) -> Domain:
  return Domain("str", nonempty=nonempty, noun=noun, note=note)


def path(nonempty: bool = False, note: str = "") -> Domain:
  """A file or directory path; empty (unset) unless ``nonempty``."""
  return Domain("str", nonempty=nonempty, noun="path", note=note)


def tuple_of(item: Domain, nonempty: bool = False, note: str = "") -> Domain:
  return Domain("tuple", item=item, nonempty=nonempty, note=note)


def optional(domain: Domain) -> Domain:
  return dataclasses.replace(domain, optional=True)


def mesh_axes() -> Domain:
  return Domain("mesh", item=Domain("int", lo=1, also=(-1,),
                                    note="-1: the remaining devices"))


def partition_rules() -> Domain:
  return Domain("rules", note="first match wins")
