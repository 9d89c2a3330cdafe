"""Command-line plumbing shared by scripts/: one-line errors and typed options.

A bad option or config value ends a script with exit code 2 and ONE line on
stderr, before any JAX compilation:

    error: --mesh='2y4' is invalid: expected NxG with N, G >= 1, e.g. 2x4

Only `ConfigError` (bad user input: an option, a config key, a profile file) is
turned into such a line (`parser.error(str(e))`); any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
from typing import Callable

from hiermoe_jax.config import SEED_LIMIT, ConfigError
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.validate import check_experts_fit as check_experts_fit_on

__all__ = ["ArgumentParser", "ConfigError", "integer", "real", "seed", "mesh_shape",
           "check_topk", "check_experts_fit", "check_profile", "output_file", "output_dir"]


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line (no usage block) and exit with code 2."""

  def error(self, message: str):
    # A failed type= reads "argument --x: '<text>' is invalid: ..."; say "--x='<text>' ...".
    head, _, rest = message.partition(": ")
    if head.startswith("argument ") and rest.startswith("'") and " is invalid: " in rest:
      message = f"{head.removeprefix('argument ')}={rest}"
    self.exit(2, f"error: {' '.join(message.splitlines())}\n")


def _invalid(text: str, valid: str) -> argparse.ArgumentTypeError:
  return argparse.ArgumentTypeError(f"{text!r} is invalid: {valid}")


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
  """type= for an integer in [low, high] (high=None: no upper bound)."""
  valid = (f"must be an integer >= {low}" if high is None
           else f"must be an integer in [{low}, {high}]")

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise _invalid(text, valid) from None
    if value < low or (high is not None and value > high):
      raise _invalid(text, valid)
    return value
  return parse


seed = integer(0, SEED_LIMIT - 1)


def real(low: float, *, strict: bool = False) -> Callable[[str], float]:
  """type= for a finite float >= low (> low if strict); nan and inf are rejected."""
  valid = f"must be a finite number {'>' if strict else '>='} {low:g}"

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise _invalid(text, valid) from None
    if not math.isfinite(value) or value < low or (strict and value == low):
      raise _invalid(text, valid)
    return value
  return parse


def mesh_shape(text: str) -> tuple[int, int]:
  """type= for NxG (nodes x local devices), e.g. 2x4."""
  nodes, sep, local = text.strip().lower().partition("x")
  if not (sep and nodes.isdecimal() and local.isdecimal() and int(nodes) >= 1
          and int(local) >= 1):
    raise _invalid(text, "expected NxG with N, G >= 1, e.g. 2x4")
  return int(nodes), int(local)


def check_topk(top_k: int, experts: int) -> None:
  if top_k > experts:
    raise ConfigError(f"--topk={top_k} is invalid: must be <= --experts={experts}")


def check_experts_fit(experts: int, nodes: int, local: int) -> None:
  """--experts spread evenly over the mesh's devices (validate.check_experts_fit)."""
  check_experts_fit_on(experts, MeshShape(nodes, local), "--experts")


def check_profile(name: str) -> None:
  """--profile names a shipped cost profile or a readable profile JSON."""
  from hiermoe_jax import cost
  try:
    cost.load_profile(name)
  except ConfigError as e:
    raise ConfigError(f"--profile={name!r} is invalid: {e}") from None


def output_file(text: str) -> str:
  """type= for a file the script writes at the end: its folder must exist now."""
  path = pathlib.Path(text)
  if path.is_dir():
    raise _invalid(text, "it is a directory; expected a file path")
  folder = path.parent
  if not folder.is_dir():
    raise _invalid(text, f"directory {str(folder)!r} does not exist")
  if not os.access(folder, os.W_OK):
    raise _invalid(text, f"directory {str(folder)!r} is not writable")
  return text


def output_dir(text: str) -> str:
  """type= for a directory the script creates or reuses (not an existing file)."""
  if not text:
    raise _invalid(text, "expected a directory path")
  path = pathlib.Path(text)
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise _invalid(text, f"{str(existing)!r} is a file, not a directory")
  return text
