"""Routing traces: the top-k logical expert ids of real training steps, per MoE layer.

File format: one `.npz` with

  layer_{i}     [steps, tokens, K] logical expert ids (unsigned ints, the smallest
                dtype that holds E - 1), oldest step first. `tokens` are the global
                tokens of a step in the trainer's order (batch rows, then positions):
                on an A-device mesh device a holds tokens [a*T, (a+1)*T).
  num_experts   scalar E, the expert count of the recorded model.
  steps         [steps] the optimizer step each row was recorded after (1-based).

Replay (`replay_step`): benchmark step s on `devices` x `tokens` reads trace step
s mod (trace steps) and takes its first devices*tokens tokens, device-major (device a
gets tokens [a*tokens, (a+1)*tokens)); on the recording mesh shape this is exactly
the routing each device saw.

Errors are `ConfigError`s naming the option that supplied the trace (`what`, e.g.
`--routing='trace:run.npz:1'`) and what is valid.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Mapping

import numpy as np

from hiermoe_jax.errors import ConfigError

LAYER_PREFIX = "layer_"


def id_dtype(num_experts: int) -> np.dtype:
  """The smallest unsigned dtype holding ids < num_experts (uint8 up to 256 experts)."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if num_experts - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"num_experts={num_experts} does not fit in uint32 ids")


def save(path, layers: Mapping[int, np.ndarray], *, num_experts: int, steps=None) -> None:
  """Writes a trace atomically (a temporary file in the same directory, then rename),
  so a reader never sees a half-written file and a crash keeps the previous one.

  layers: {layer index: int ids [steps, tokens, K]}, the same steps for every layer.
  steps: the step numbers of the rows (default 1..steps).
  """
  path = pathlib.Path(path)
  dtype = id_dtype(num_experts)
  arrays = {}
  for layer, ids in layers.items():
    ids = np.asarray(ids)
    if ids.ndim != 3:
      raise ValueError(f"layer {layer}: ids of shape {ids.shape}; expected [steps, tokens, K]")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
      raise ValueError(f"layer {layer}: ids must lie in [0, {num_experts})")
    arrays[f"{LAYER_PREFIX}{int(layer)}"] = ids.astype(dtype)
  count = len(next(iter(arrays.values()))) if arrays else 0
  steps = np.arange(1, count + 1) if steps is None else np.asarray(steps, np.int64)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez_compressed(f, num_experts=np.int64(num_experts), steps=steps, **arrays)
  os.replace(tmp, path)


def _open(path, what: str):
  if not os.path.isfile(path):
    raise ConfigError(f"{what} is invalid: trace file {str(path)!r} does not exist")
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ConfigError(f"{what} is invalid: {str(path)!r} is not a readable .npz trace "
                      f"({e})") from None


def layers(path, what: str = "trace") -> list[int]:
  """The layer indices a trace holds, ascending."""
  with _open(path, what) as data:
    return sorted(int(k[len(LAYER_PREFIX):]) for k in data.files
                  if k.startswith(LAYER_PREFIX))


def load(path, layer: int | None = None, *, what: str = "trace") -> tuple[np.ndarray, int]:
  """(int32 ids [steps, tokens, K], num_experts) of one layer (None: the first)."""
  with _open(path, what) as data:
    found = sorted(int(k[len(LAYER_PREFIX):]) for k in data.files
                   if k.startswith(LAYER_PREFIX))
    if not found or "num_experts" not in data.files:
      raise ConfigError(f"{what} is invalid: {str(path)!r} holds no routing trace (arrays "
                        f"{LAYER_PREFIX}<i> and num_experts); found {data.files}")
    layer = found[0] if layer is None else layer
    if layer not in found:
      raise ConfigError(f"{what} is invalid: {str(path)!r} has no layer {layer}; "
                        f"its layers are {found}")
    ids = data[f"{LAYER_PREFIX}{layer}"]
    num_experts = int(data["num_experts"])
  if ids.ndim != 3 or ids.dtype.kind not in "iu" or not len(ids):
    raise ConfigError(f"{what} is invalid: layer {layer} holds {ids.dtype}{list(ids.shape)}; "
                      "expected integer ids [steps >= 1, tokens, K]")
  return ids.astype(np.int32), num_experts


def check(ids_STK: np.ndarray, trace_experts: int, *, num_experts: int, top_k: int,
          devices: int, tokens: int, what: str = "trace", flags=("--experts", "--topk",
                                                                "--tokens")) -> None:
  """Refuses a trace that cannot replay as [devices, tokens, top_k] ids over
  num_experts experts; `flags` name the options that set those (for the message)."""
  experts_flag, topk_flag, tokens_flag = flags
  if trace_experts != num_experts:
    raise ConfigError(f"{experts_flag}={num_experts} is invalid for {what}: the trace was "
                      f"recorded with {trace_experts} experts; use {experts_flag}="
                      f"{trace_experts}")
  if ids_STK.shape[2] != top_k:
    raise ConfigError(f"{topk_flag}={top_k} is invalid for {what}: the trace has "
                      f"K={ids_STK.shape[2]} experts per token; use {topk_flag}="
                      f"{ids_STK.shape[2]}")
  available = ids_STK.shape[1]
  if devices * tokens > available:
    raise ConfigError(f"{tokens_flag}={tokens} is invalid for {what}: {devices} devices x "
                      f"{tokens} tokens need {devices * tokens} tokens per step and the "
                      f"trace has {available}; use {tokens_flag} <= {available // devices}")


def replay_step(ids_STK: np.ndarray, step: int, *, devices: int, tokens: int) -> np.ndarray:
  """Benchmark step `step` as int32 [devices, tokens, K] (module docstring)."""
  ids_TK = ids_STK[step % len(ids_STK), :devices * tokens]
  return ids_TK.reshape(devices, tokens, -1).astype(np.int32)
