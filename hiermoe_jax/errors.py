"""Bad user input: the one error type and the checks every config class uses.

A leaf module (it imports nothing from the project), so config classes, the cost
model, the mesh helpers and the CLIs all validate the same way and read the same:

    MoEConfig.top_k=9 is invalid: must satisfy 1 <= top_k <= num_experts=8

`name` is what the user wrote: a dataclass field (`MoEConfig.top_k`), a config
key (`train.lr`) or an option (`--topk`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NoReturn, Sequence


class ConfigError(ValueError):
  """Bad user input (a config field, option or file); the one-line message names the
  field, the value and what is valid. Scripts print it without a traceback; any
  other exception is a bug and keeps its traceback."""


def fail(name: str, value: Any, valid: str) -> NoReturn:
  raise ConfigError(f"{name}={value!r} is invalid: {valid}")


def is_int(value: Any) -> bool:
  """A Python int, not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_finite_real(value: Any) -> bool:
  """A finite int or float (numpy scalars included), not a bool."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
  """An integer in [low, high] (high=None: no upper bound); returns it as an int."""
  if not is_int(value) or value < low or (high is not None and value > high):
    fail(name, value, "must be an integer " + (f">= {low}" if high is None
                                               else f"in [{low}, {high}]"))
  return value


def check_real(name: str, value: Any, low: float | None = None, *, strict: bool = False,
               hint: str = "") -> float:
  """A finite number >= low (> low if strict); inf and nan pass a bare `> 0` and then
  fail inside XLA, so they are refused here. Returns it as a float."""
  ok = is_finite_real(value) and (low is None or value > low or (not strict and value == low))
  if not ok:
    bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
    fail(name, value, f"must be a finite number{bound}{hint}")
  return float(value)


def check_bool(name: str, value: Any, spelled: str = "True or False") -> bool:
  if not isinstance(value, bool):
    fail(name, value, f"must be a bool ({spelled})")
  return value


def check_choice(name: str, value: Any, choices: Sequence) -> Any:
  if value not in choices:
    fail(name, value, f"must be one of {tuple(choices)}")
  return value
