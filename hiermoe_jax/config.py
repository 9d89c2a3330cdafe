"""MoEConfig: one frozen, validated description of an MoE block.

Every field is checked in `__post_init__`, from the values alone (no file is
read: `auto`'s cost profile is loaded where it is used); checks that need the
device mesh live in `validate.py`. Errors are `ConfigError`s naming the field, its
value and what is valid, raised before any tracing or compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from hiermoe_jax.dispatch import registry, wire
from hiermoe_jax.errors import ConfigError, check_bool, check_choice, check_int, check_real
from hiermoe_jax.errors import is_finite_real, is_int  # noqa: F401  (re-exported)
from hiermoe_jax.mesh import AXES, check_expert_axes

ROUTERS = ("softmax", "sigmoid_grouped")
EXPERT_COMPUTE = ("einsum", "ragged_dot")
PERMUTE_IMPLS = ("xla", "pallas")
ALL_TO_ALL_IMPLS = ("padded", "ragged")
DTYPES = ("float32", "bfloat16", "float16")
SEED_LIMIT = 2 ** 63  # seeds are in [0, SEED_LIMIT): jax.random.key takes a C long


def __getattr__(name: str):
  # STRATEGIES (registered strategies) and DISPATCH (those and "auto") are read
  # from the registry on each access, so a strategy registered later is valid.
  if name == "STRATEGIES":
    return registry.names()
  if name == "DISPATCH":
    return registry.names() + ("auto",)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fail(field: str, value: Any, valid: str) -> None:
  raise ConfigError(f"MoEConfig.{field}={value!r} is invalid: {valid}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Hyper-parameters of one MoE block (routed SwiGLU experts + optional shared).

  Routing follows the published definitions (docs/design.md, section 3):
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
  # Per device's T tokens, per logical expert, the first ceil(capacity_factor * T*K/E)
  # (token, expert) pairs in token order are kept, the rest dropped before dispatch
  # (dispatch/keep.py); stage buffers never drop a kept pair, so drops depend on
  # neither the placement, nor overlap_chunks, nor the strategy.
  capacity_factor: float = 1.25
  dropless: bool = False  # keep every pair; buffers sized for the worst case
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
  # Mesh axes of the expert-parallel hierarchy, slowest link first (one or two).
  expert_axes: tuple[str, ...] = AXES
  # Other mesh axes that split the tokens (None: every axis that is neither an
  # expert axis nor the tensor axis); the experts are replicated over them.
  batch_axes: tuple[str, ...] | None = None
  # A mesh axis that splits each expert's FFN width (expert tensor parallelism).
  tensor_axis: str | None = None
  # Dtype of the dispatched rows on the wire (None: the activation dtype); combine
  # then travels in bfloat16 or the activation dtype, if narrower (dispatch/wire.py).
  comm_dtype: str | None = None
  # Independent token chunks per device, so one chunk's all-to-alls may overlap
  # another's expert compute. Buffers are per chunk; with capacity, each is sized
  # for a chunk holding all of an expert's kept pairs (up to `chunks` times the
  # unchunked buffers in total), so results do not depend on the chunking.
  overlap_chunks: int = 1

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

    f = lambda name: f"MoEConfig.{name}"  # noqa: E731
    for name in ("d_model", "d_ff", "num_experts", "top_k", "n_group", "topk_group",
                 "overlap_chunks"):
      check_int(f(name), getattr(self, name))
    for name in ("norm_topk_prob", "shared_gate", "dropless"):
      check_bool(f(name), getattr(self, name))
    # Floats must be finite: an inf capacity or weight would only fail inside XLA.
    for name, positive in (("routed_scaling_factor", True), ("capacity_factor", True),
                           ("load_balance_weight", False), ("z_loss_weight", False),
                           ("bias_update_rate", False)):
      hint = " (or set dropless=True)" if name == "capacity_factor" else ""
      object.__setattr__(self, name, check_real(f(name), getattr(self, name), 0,
                                                strict=positive, hint=hint))
    if self.top_k > self.num_experts:
      _fail("top_k", self.top_k, f"must satisfy 1 <= top_k <= num_experts={self.num_experts}")
    check_choice(f("router"), self.router, ROUTERS)
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
    check_int(f("n_shared_experts"), self.n_shared_experts, 0)
    if self.shared_d_ff is not None and (not is_int(self.shared_d_ff) or self.shared_d_ff < 1):
      _fail("shared_d_ff", self.shared_d_ff, "must be None or an integer >= 1")
    if self.shared_gate and self.n_shared_experts == 0:
      _fail("shared_gate", self.shared_gate, "needs n_shared_experts >= 1")
    check_choice(f("dispatch"), self.dispatch, registry.names() + ("auto",))
    if not isinstance(self.cost_profile, str) or not self.cost_profile:
      _fail("cost_profile", self.cost_profile,
            "must be a shipped profile name (e.g. 'default') or a path to a profile JSON")
    if self.bias_update_rate > 0 and self.router != "sigmoid_grouped":
      _fail("bias_update_rate", self.bias_update_rate,
            "the aux-loss-free bias applies to router='sigmoid_grouped' only")
    check_choice(f("expert_compute"), self.expert_compute, EXPERT_COMPUTE)
    check_choice(f("permute_impl"), self.permute_impl, PERMUTE_IMPLS)
    check_choice(f("all_to_all"), self.all_to_all, ALL_TO_ALL_IMPLS)
    if self.comm_dtype is not None:
      check_choice(f("comm_dtype"), self.comm_dtype, (None,) + wire.WIRE_DTYPES)
    if self.comm_dtype == wire.FP8 and self.all_to_all == "ragged":
      _fail("comm_dtype", self.comm_dtype, "an fp8 wire needs all_to_all='padded' "
            "(its scales travel in the padded buffer); use 'bfloat16' with 'ragged'")
    try:
      object.__setattr__(self, "expert_axes", check_expert_axes(self.expert_axes))
    except ConfigError as e:
      raise ConfigError(f"MoEConfig.{e}") from None
    if self.tensor_axis is not None and (not isinstance(self.tensor_axis, str)
                                         or self.tensor_axis in self.expert_axes):
      _fail("tensor_axis", self.tensor_axis,
            f"must be None or a mesh axis name that is not one of expert_axes={self.expert_axes}")
    if self.batch_axes is not None:
      batch = self.batch_axes
      batch = tuple(batch) if isinstance(batch, (tuple, list)) else batch
      if (not isinstance(batch, tuple) or not all(isinstance(a, str) for a in batch)
          or set(batch) & set(self.expert_axes + (self.tensor_axis,))):
        _fail("batch_axes", self.batch_axes, "must be None or mesh axis names that are neither "
              "expert_axes nor tensor_axis")
      object.__setattr__(self, "batch_axes", batch)

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
