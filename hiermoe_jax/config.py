"""MoEConfig: one frozen, validated description of an MoE block.

Every field is checked in `__post_init__`; checks that need the device mesh live
in `validate_for_mesh`. Errors are `ConfigError`s naming the field, its value and
what is valid, raised before any tracing or compilation.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax.numpy as jnp

ROUTERS = ("softmax", "sigmoid_grouped")
STRATEGIES = ("flat", "flat_dedup", "hier", "hier_dedup")  # fixed strategies
DISPATCH = STRATEGIES + ("auto",)  # values of MoEConfig.dispatch
EXPERT_COMPUTE = ("einsum", "ragged_dot")
PERMUTE_IMPLS = ("xla", "pallas")
ALL_TO_ALL_IMPLS = ("padded", "ragged")
DTYPES = ("float32", "bfloat16", "float16")
SEED_LIMIT = 2 ** 63  # seeds are in [0, SEED_LIMIT): jax.random.key takes a C long


class ConfigError(ValueError):
  """Bad user input (a config field, option or file); the one-line message names the
  field, the value and what is valid. Scripts print it without a traceback; any
  other exception is a bug and keeps its traceback."""


def _fail(field: str, value: Any, valid: str) -> None:
  raise ConfigError(f"MoEConfig.{field}={value!r} is invalid: {valid}")


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_finite_real(value: Any) -> bool:
  """A finite int or float (numpy scalars included), not a bool."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Hyper-parameters of one MoE block (routed SwiGLU experts + optional shared).

  Routing follows the published definitions (see DESIGN.md section 3):
  `router="softmax"` is Mixtral / Qwen-MoE top-k; `router="sigmoid_grouped"` is
  DeepSeek-V3 (sigmoid scores, selection bias, group-limited top-k, scaling).
  """

  d_model: int
  d_ff: int
  num_experts: int
  top_k: int
  router: str = "softmax"
  norm_topk_prob: bool = False
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  n_shared_experts: int = 0
  shared_d_ff: int | None = None  # per shared expert; defaults to d_ff
  shared_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared output
  capacity_factor: float = 1.25
  dropless: bool = False
  dispatch: str = "flat"  # a strategy, or "auto": the cost model picks one per call
  cost_profile: str = "default"  # for "auto": a shipped profile name or a JSON path
  dtype: str = "float32"  # compute dtype of expert FFNs and token exchange
  param_dtype: str = "float32"
  load_balance_weight: float = 0.0
  z_loss_weight: float = 0.0
  bias_update_rate: float = 0.0  # DeepSeek aux-loss-free update speed u
  expert_compute: str = "einsum"  # or "ragged_dot" (grouped matmul)
  permute_impl: str = "xla"  # local gather/scatter: "xla" or "pallas" kernels
  all_to_all: str = "padded"  # "ragged" uses jax.lax.ragged_all_to_all on GPU

  def __post_init__(self):
    # Normalise dtypes given as jnp dtypes to their names (keeps the config hashable).
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        canonical = jnp.dtype(value).name
      except TypeError:
        canonical = str(value)
      if canonical not in DTYPES:
        _fail(name, value, f"must be one of {DTYPES}")
      object.__setattr__(self, name, canonical)

    for name in ("d_model", "d_ff", "num_experts", "top_k", "n_group", "topk_group"):
      value = getattr(self, name)
      if not is_int(value) or value < 1:
        _fail(name, value, "must be an integer >= 1")
    for name in ("norm_topk_prob", "shared_gate", "dropless"):
      if not isinstance(getattr(self, name), bool):
        _fail(name, getattr(self, name), "must be a bool (True or False)")
    # Floats must be finite: an inf capacity or weight would only fail inside XLA.
    for name, positive in (("routed_scaling_factor", True), ("capacity_factor", True),
                           ("load_balance_weight", False), ("z_loss_weight", False),
                           ("bias_update_rate", False)):
      value = getattr(self, name)
      if not is_finite_real(value) or value < 0 or (positive and value == 0):
        hint = " (or set dropless=True)" if name == "capacity_factor" else ""
        _fail(name, value, f"must be a finite number {'> 0' if positive else '>= 0'}{hint}")
      object.__setattr__(self, name, float(value))
    if self.top_k > self.num_experts:
      _fail("top_k", self.top_k, f"must satisfy 1 <= top_k <= num_experts={self.num_experts}")
    if self.router not in ROUTERS:
      _fail("router", self.router, f"must be one of {ROUTERS}")
    if self.num_experts % self.n_group:
      _fail("n_group", self.n_group, f"must divide num_experts={self.num_experts}")
    if self.topk_group > self.n_group:
      _fail("topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
    per_group = self.num_experts // self.n_group
    if self.topk_group * per_group < self.top_k:
      _fail("topk_group", self.topk_group,
            f"topk_group * experts per group ({per_group}) must be >= top_k={self.top_k}")
    if self.router == "softmax" and self.n_group != 1:
      _fail("n_group", self.n_group, "group-limited routing needs router='sigmoid_grouped'; "
            "use n_group=1 with router='softmax'")
    if self.n_group > 1 and per_group < 2:
      # A group's score is the sum of its top-2 expert scores (DeepSeek-V3).
      _fail("n_group", self.n_group,
            f"needs >= 2 experts per group (num_experts={self.num_experts})")
    if not is_int(self.n_shared_experts) or self.n_shared_experts < 0:
      _fail("n_shared_experts", self.n_shared_experts, "must be an integer >= 0")
    if self.shared_d_ff is not None and (not is_int(self.shared_d_ff) or self.shared_d_ff < 1):
      _fail("shared_d_ff", self.shared_d_ff, "must be None or an integer >= 1")
    if self.shared_gate and self.n_shared_experts == 0:
      _fail("shared_gate", self.shared_gate, "needs n_shared_experts >= 1")
    if self.dispatch not in DISPATCH:
      _fail("dispatch", self.dispatch, f"must be one of {DISPATCH}")
    if not isinstance(self.cost_profile, str) or not self.cost_profile:
      _fail("cost_profile", self.cost_profile,
            "must be a shipped profile name (e.g. 'default') or a path to a profile JSON")
    if self.dispatch == "auto":
      # Load it now: `auto` would otherwise fail on first use, inside jit tracing.
      from hiermoe_jax import cost
      try:
        cost.load_profile(self.cost_profile)
      except ConfigError as e:
        _fail("cost_profile", self.cost_profile, str(e))
    if self.bias_update_rate > 0 and self.router != "sigmoid_grouped":
      _fail("bias_update_rate", self.bias_update_rate,
            "the aux-loss-free bias applies to router='sigmoid_grouped' only")
    if self.expert_compute not in EXPERT_COMPUTE:
      _fail("expert_compute", self.expert_compute, f"must be one of {EXPERT_COMPUTE}")
    if self.permute_impl not in PERMUTE_IMPLS:
      _fail("permute_impl", self.permute_impl, f"must be one of {PERMUTE_IMPLS}")
    if self.all_to_all not in ALL_TO_ALL_IMPLS:
      _fail("all_to_all", self.all_to_all, f"must be one of {ALL_TO_ALL_IMPLS}")

  @property
  def shared_width(self) -> int:
    """Hidden width of the merged shared-expert FFN (0 when there is none)."""
    return self.n_shared_experts * (self.shared_d_ff or self.d_ff)

  def replace(self, **changes) -> "MoEConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], **overrides) -> "MoEConfig":
    """Reads the MoE fields of a Hugging Face `config.json` (as a dict).

    Supports Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3, applying each
    family's conventions. Keyword overrides (e.g. `dispatch="hier_dedup"`) win.
    """
    from hiermoe_jax.hf_config import moe_fields_from_hf
    return cls(**{**moe_fields_from_hf(config), **overrides})
