"""Synthetic routings for benchmarks: `uniform`, `zipf:ALPHA`, `file:PATH.npy`.

Each returns int32 logical expert ids [devices, T, K], distinct per token.
Zipf draws K distinct experts per token with popularity p_i ~ 1 / rank_i^alpha
(Gumbel top-k sampling without replacement); uniform is alpha = 0.
"""

from __future__ import annotations

import numpy as np


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
  raise ValueError(f"--routing {spec!r} is invalid: use uniform, zipf:ALPHA or file:PATH.npy")


def expert_popularity(num_experts: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
  """Zipf weights over a random ranking of the experts."""
  weights = 1.0 / np.arange(1, num_experts + 1) ** alpha
  return rng.permutation(weights / weights.sum())


def sample_topk(log_p: np.ndarray, shape: tuple[int, ...], top_k: int,
                rng: np.random.Generator) -> np.ndarray:
  """K distinct experts per token, without replacement, by Gumbel top-k."""
  gumbel = rng.gumbel(size=shape + log_p.shape[-1:])
  return np.argsort(-(log_p + gumbel), axis=-1)[..., :top_k].astype(np.int32)


def routing(spec: str, *, devices: int, tokens: int, num_experts: int, top_k: int,
            seed: int = 0) -> np.ndarray:
  kind, arg = parse_routing(spec)
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
