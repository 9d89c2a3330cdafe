"""Benchmark routings: `uniform`, `zipf:ALPHA`, `file:PATH.npy`, `trace:PATH[:LAYER]`.

Each returns int32 logical expert ids [devices, T, K], distinct per token.
Zipf draws K distinct experts per token with popularity p_i ~ 1 / rank_i^alpha
(Gumbel top-k sampling without replacement); uniform is alpha = 0. A trace
replays a recorded model's routing (`hiermoe_jax/traces.py`; LAYER defaults to
the file's first layer): benchmark step s reads trace step s mod (trace steps) and
takes its first devices * T tokens, device-major.
"""

from __future__ import annotations

import functools

import numpy as np

from hiermoe_jax import traces


def parse_routing(spec: str) -> tuple[str, float | str | None]:
  if spec == "uniform":
    return "uniform", None
  if spec.startswith("zipf:"):
    try:
      alpha = float(spec[5:])
    except ValueError:
      alpha = -1.0
    if not (np.isfinite(alpha) and alpha >= 0):
      raise ValueError(f"--routing={spec!r} is invalid: zipf needs an exponent that is a "
                       "finite number >= 0, e.g. zipf:1.2")
    return "zipf", alpha
  if spec.startswith("file:") and spec.endswith(".npy"):
    return "file", spec[5:]
  if spec.startswith("trace:"):
    return "trace", parse_trace(spec)
  raise ValueError(f"--routing {spec!r} is invalid: use uniform, zipf:ALPHA, file:PATH.npy "
                   "or trace:PATH.npz[:LAYER]")


def parse_trace(spec: str) -> tuple[str, int | None]:
  """`trace:PATH.npz[:LAYER]` -> (PATH, LAYER or None)."""
  path, _, layer = spec[len("trace:"):].rpartition(":")
  if not path.endswith(".npz"):  # no layer given (PATH may itself hold colons)
    path, layer = spec[len("trace:"):], ""
  if not path.endswith(".npz") or not (layer == "" or layer.isdigit()):
    raise ValueError(f"--routing={spec!r} is invalid: use trace:PATH.npz or "
                     "trace:PATH.npz:LAYER with LAYER an integer >= 0")
  return path, int(layer) if layer else None


@functools.lru_cache(maxsize=4)
def _trace(path: str, layer: int | None, what: str):
  return traces.load(path, layer, what=what)


def load_trace(spec: str) -> tuple[np.ndarray, int]:
  """A `trace:` routing's (int32 ids [steps, tokens, K], num_experts), cached."""
  return _trace(*parse_trace(spec), f"--routing={spec!r}")


def expert_popularity(num_experts: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
  """Zipf weights over a random ranking of the experts."""
  weights = 1.0 / np.arange(1, num_experts + 1) ** alpha
  return rng.permutation(weights / weights.sum())


def sample_topk(log_p: np.ndarray, shape: tuple[int, ...], top_k: int,
                rng: np.random.Generator) -> np.ndarray:
  """K distinct experts per token, without replacement, by Gumbel top-k."""
  gumbel = rng.gumbel(size=shape + log_p.shape[-1:])
  return np.argsort(-(log_p + gumbel), axis=-1)[..., :top_k].astype(np.int32)


def check_trace(spec: str, *, num_experts: int, top_k: int, devices: int = 0,
                tokens: int = 0) -> tuple[np.ndarray, int]:
  """A `trace:` routing's (ids [steps, tokens, K], E), refused (ConfigError naming
  --routing and the mismatched flag) unless it replays as the benchmark's shape."""
  ids_STK, trace_experts = load_trace(spec)
  traces.check(ids_STK, trace_experts, num_experts=num_experts, top_k=top_k,
               devices=devices, tokens=tokens, what=f"--routing={spec!r}")
  return ids_STK, trace_experts


def routing(spec: str, *, devices: int, tokens: int, num_experts: int, top_k: int,
            seed: int = 0, step: int = 0) -> np.ndarray:
  """The routing of benchmark step `step` (only a trace differs between steps)."""
  kind, arg = parse_routing(spec)
  if kind == "trace":
    ids_STK, _ = check_trace(spec, num_experts=num_experts, top_k=top_k, devices=devices,
                             tokens=tokens)
    return traces.replay_step(ids_STK, step, devices=devices, tokens=tokens)
  if kind == "file":
    ids = np.load(arg)
    expected = (devices, tokens, top_k)
    if ids.shape != expected:
      raise ValueError(f"routing file {arg} has shape {ids.shape}; expected {expected} "
                       "= [N*G, T, K]")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= num_experts:
      raise ValueError(f"routing file {arg} must hold integer expert ids in [0, {num_experts})")
    return ids.astype(np.int32)
  rng = np.random.default_rng(seed)
  alpha = 0.0 if kind == "uniform" else arg
  log_p = np.log(expert_popularity(num_experts, alpha, rng))
  # One device at a time keeps memory at T * E floats even for 256 devices.
  return np.stack([sample_topk(log_p, (tokens,), top_k, rng) for _ in range(devices)])
