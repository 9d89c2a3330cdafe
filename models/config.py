"""The run configuration: frozen, validated dataclasses loaded from YAML.

    model: ModelConfig    transformer shape (the MoE block's d_model comes from here)
    moe:   MoEConfig      every hiermoe_jax.MoEConfig field except the ones the trainer sets
    train: TrainConfig    optimisation, schedule, evaluation, checkpoints
    data:  DataConfig     corpus and held-out split
    mesh:  MeshConfig     ("node", "local") shape; defaults to processes x local devices

`load_config(path, overrides)` reads a YAML preset, applies `section.key=value`
overrides with type coercion, and rejects unknown keys and invalid values with a
`ConfigError` naming the key (e.g. "train.lr='abc' is invalid: expected a float").
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import types
import typing
from typing import Any, Mapping

import yaml

from hiermoe_jax import moe as moe_lib
from hiermoe_jax.config import DTYPES, SEED_LIMIT, MoEConfig
# ConfigError is the library's bad-input error, re-exported: scripts catch one class.
from hiermoe_jax.errors import (ConfigError, check_bool, check_choice, check_int, check_real,
                                fail, is_finite_real, is_int)
from hiermoe_jax.mesh import AXES

TOKEN_DTYPES = ("uint8", "uint16", "uint32")
DENSE_SHARDINGS = ("replicated", "fsdp", "hsdp")  # model.dense_sharding (models/steps.py)
# model.attention / model.remat names (models/transformer.py maps them to kernels and
# jax.checkpoint policies).
ATTENTION = ("auto", "xla", "cudnn", "pallas")
REMAT = ("none", "full", "dots", "dots_no_batch")
# MoEConfig fields the trainer sets, not the moe section (with why, for the error): the
# width, and the mesh-axes fields (MoEConfig's defaults name the axes of the trainer's mesh).
MOE_SET_BY_TRAINER = {"d_model": "it is set by model.d_model", **{
    name: f"the trainer's mesh has axes {AXES}" for name in
    ("expert_axes", "batch_axes", "tensor_axis")}}


def _check_fields(check, section: str, obj, names, *args, **kwargs) -> None:
  """check("section.name", value, *args, **kwargs) for each named field of obj."""
  for name in names:
    check(f"{section}.{name}", getattr(obj, name), *args, **kwargs)


def _check_interval(key: str, value, valid: str, ok) -> None:
  """A finite number in an interval (errors.check_real takes a lower bound only)."""
  if not is_finite_real(value) or not ok(value):
    fail(key, value, f"must be a finite number {valid}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer: RMSNorm, RoPE attention (GQA), SwiGLU / MoE FFNs."""
  vocab_size: int = 256  # bytes by default
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
  head_dim: int | None = None  # None = d_model // n_heads
  d_ff: int = 256  # hidden width of the dense SwiGLU FFNs (first_k_dense layers)
  first_k_dense: int = 0  # leading layers with a dense FFN, as in DeepSeek-V3
  qk_norm: bool = False  # RMSNorm on each query / key head (Qwen3)
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: str = "float32"  # activation dtype of attention and dense layers
  param_dtype: str = "float32"
  # Dense (non-expert) weights and their AdamW moments: "replicated", "fsdp" (split over
  # all devices) or "hsdp" (over each node's devices, replicated across nodes: the
  # all-gathers stay on the fast links). Expert stacks are expert-parallel in every case.
  dense_sharding: str = "hsdp"
  # How the step runs; none of these changes the model's function or its init.
  # attention kernel: auto = cuDNN flash attention on GPU meshes when cuDNN is installed
  # (half dtypes), else Pallas Triton flash attention there; XLA's elsewhere.
  attention: str = "auto"
  # Per-block rematerialisation: none, full (save only the block's input), dots (save
  # matmul outputs), dots_no_batch (save matmuls without batch dims: not attention's).
  # none by default: the CPU presets have memory to spare; the GPU presets set full.
  remat: str = "none"
  # Each run of identical blocks (dense, then MoE) is one scan over stacked state, so the
  # step compiles one block per run whatever n_layers is (checkpoints differ by layout).
  scan_layers: bool = True

  def __post_init__(self):
    _check_fields(check_int, "model", self,
                  ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"))
    if self.n_kv_heads is not None:
      check_int("model.n_kv_heads", self.n_kv_heads)
      if self.n_heads % self.n_kv_heads:
        fail("model.n_kv_heads", self.n_kv_heads, f"must divide model.n_heads={self.n_heads}")
    if self.head_dim is None and self.d_model % self.n_heads:
      fail("model.n_heads", self.n_heads,
           f"must divide model.d_model={self.d_model} (or set model.head_dim)")
    if self.head_dim is not None:
      check_int("model.head_dim", self.head_dim)
    if self.resolved_head_dim % 2:
      fail("model.head_dim", self.resolved_head_dim, "must be even (RoPE rotates pairs)")
    if not is_int(self.first_k_dense) or not 0 <= self.first_k_dense <= self.n_layers:
      fail("model.first_k_dense", self.first_k_dense,
           f"must be an integer in [0, model.n_layers={self.n_layers}]")
    check_real("model.rope_theta", self.rope_theta, 0, strict=True)
    check_real("model.norm_eps", self.norm_eps, 0, strict=True)
    _check_fields(check_bool, "model", self, ("qk_norm", "tie_embeddings", "scan_layers"),
                  "true/false")
    _check_fields(check_choice, "model", self, ("dtype", "param_dtype"), DTYPES)
    check_choice("model.dense_sharding", self.dense_sharding, DENSE_SHARDINGS)
    check_choice("model.attention", self.attention, ATTENTION)
    check_choice("model.remat", self.remat, REMAT)
    if self.attention == "cudnn" and self.dtype == "float32":
      fail("model.attention", self.attention,
           "cuDNN has no float32 flash attention: set model.dtype to bfloat16 or float16")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 16  # global sequences per step, split over all devices
  seq_len: int = 64
  steps: int = 300
  lr: float = 3e-3  # peak learning rate
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at `steps`
  weight_decay: float = 0.1  # on matrices only (ndim >= 2)
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0  # max global gradient norm
  seed: int = 0  # parameter init, data order and the train RNG
  eval_every: int = 50  # eval loss every N steps and at the end (0 = never)
  eval_batches: int = 4
  checkpoint_every: int = 100  # 0 = only at the end
  keep: int = 3  # checkpoints kept
  swap_interval: int = 0  # expert swap decision every N steps (0 = off)
  swap_window: int = 0  # steps of routing a decision looks at (0 = swap_interval)
  swap_max_pairs: int = 1  # disjoint expert pairs swapped per layer per decision
  swap_profile: str = "default"  # cost profile: "default", "paper_a6000" or a JSON path
  swap_migration_cost: bool = True  # false: migration priced at 0 (any predicted gain swaps)
  # > swap_interval: the controller picks each next interval in [swap_interval, this]
  # (break-even steps of what it moved; doubles when nothing pays); 0 = fixed interval
  swap_max_interval: int = 0
  swap_grow_pairs: bool = False  # more than swap_max_pairs while each further pair pays
  swap_groups: bool = False  # also price whole re-placements (co-location, load packing)
  # ms per (token, expert) pair on the most loaded device: weighs compute imbalance
  # against communication in a swap decision (0 = communication only, the paper's)
  swap_compute_ms_per_pair: float = 0.0
  # keep only the swaps that lower the modelled time with exact peaks (SearchConfig.exact_peaks)
  swap_exact_peaks: bool = False
  on_nan: str = "stop"  # NaN/Inf loss or gradients: "stop" the run or "skip" the update
  nan_skip_limit: int = 10  # on_nan=skip: stop after this many skips in a row (0 = never)
  drop_warning: float = 0.01  # warn when a layer drops more than this fraction of its pairs
  microbatches: int = 1  # gradient accumulation: the global batch in this many slices
  loss_chunk: int = 512  # sequence positions the loss unembeds at a time (0 = all at once)
  # moe.dispatch=auto: true times the candidate strategies on the run's routing and mesh
  # and fixes one per MoE layer (hiermoe_jax/calibrate.py; no lax.switch in the step);
  # false keeps the in-graph auto priced by moe.cost_profile.
  auto_calibrate: bool = True
  auto_recheck_steps: int = 100  # re-measure every N steps (0 = only on drift)
  auto_margin: float = 0.1  # a strategy must be this much faster, twice in a row, to switch
  auto_drift: float = 0.2  # re-measure when a layer's expert loads move this far (TV distance)
  auto_budget: float = 0.05  # share of the MoE layers' time re-checks may take (spaces them)
  # Record the last routing_trace_steps steps' top-k ids of every MoE layer to this .npz
  # (models/routing_trace.py; host memory: steps x MoE layers x batch_size*seq_len x top_k
  # bytes for up to 256 experts). None = off.
  routing_trace: str | None = None
  routing_trace_steps: int = 256

  def __post_init__(self):
    _check_fields(check_int, "train", self,
                  ("batch_size", "seq_len", "steps", "eval_batches", "keep"))
    _check_fields(check_int, "train", self,
                  ("warmup_steps", "eval_every", "checkpoint_every", "swap_interval",
                   "swap_window", "swap_max_pairs", "swap_max_interval", "nan_skip_limit",
                   "loss_chunk"), low=0)
    check_int("train.microbatches", self.microbatches)
    if self.batch_size % self.microbatches:
      fail("train.microbatches", self.microbatches,
           f"must divide train.batch_size={self.batch_size}")
    check_int("train.seed", self.seed, low=0, high=SEED_LIMIT - 1)
    check_real("train.lr", self.lr, 0, strict=True)
    _check_interval("train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]", lambda v: 0 <= v <= 1)
    check_real("train.weight_decay", self.weight_decay, 0)
    for name in ("b1", "b2"):
      _check_interval(f"train.{name}", getattr(self, name), "in [0, 1)", lambda v: 0 <= v < 1)
    check_real("train.grad_clip", self.grad_clip, 0, strict=True)
    _check_interval("train.drop_warning", self.drop_warning, "in [0, 1]", lambda v: 0 <= v <= 1)
    check_bool("train.swap_migration_cost", self.swap_migration_cost, "true/false")
    check_bool("train.swap_grow_pairs", self.swap_grow_pairs, "true/false")
    check_bool("train.swap_groups", self.swap_groups, "true/false")
    check_real("train.swap_compute_ms_per_pair", self.swap_compute_ms_per_pair, 0)
    check_bool("train.swap_exact_peaks", self.swap_exact_peaks, "true/false")
    if self.swap_max_interval and self.swap_max_interval < self.swap_interval:
      fail("train.swap_max_interval", self.swap_max_interval,
           f"must be 0 (fixed interval) or >= train.swap_interval={self.swap_interval}")
    check_bool("train.auto_calibrate", self.auto_calibrate, "true/false")
    check_int("train.auto_recheck_steps", self.auto_recheck_steps, low=0)
    _check_interval("train.auto_margin", self.auto_margin, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_interval("train.auto_drift", self.auto_drift, "in (0, 1]", lambda v: 0 < v <= 1)
    _check_interval("train.auto_budget", self.auto_budget, "in (0, 1]", lambda v: 0 < v <= 1)
    if not isinstance(self.swap_profile, str) or not self.swap_profile:
      fail("train.swap_profile", self.swap_profile,
           "must be a shipped profile name (e.g. 'default') or a path to a profile JSON")
    if self.swap_interval:
      # Load it now rather than after the model is built.
      from hiermoe_jax import cost
      try:
        cost.load_profile(self.swap_profile)
      except ConfigError as e:
        fail("train.swap_profile", self.swap_profile, str(e))
    if self.on_nan not in ("skip", "stop"):
      fail("train.on_nan", self.on_nan, "must be 'skip' or 'stop'")
    check_int("train.routing_trace_steps", self.routing_trace_steps)
    if self.routing_trace is not None and (not isinstance(self.routing_trace, str)
                                           or not self.routing_trace.endswith(".npz")):
      fail("train.routing_trace", self.routing_trace, "must be null or a path ending in .npz")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str | None = None  # None = Python's own pydoc_data topics, as bytes
  eval_fraction: float = 0.05  # tail of the corpus held out for eval loss
  token_dtype: str = "uint16"  # element type of a pre-tokenised .bin file

  def __post_init__(self):
    if self.path is not None and (not isinstance(self.path, str) or not self.path):
      # "" would read the working directory (pathlib.Path("") is ".").
      fail("data.path", self.path, "must be null (the default corpus) or a non-empty path")
    _check_interval("data.eval_fraction", self.eval_fraction, "in (0, 1)", lambda v: 0 < v < 1)
    check_choice("data.token_dtype", self.token_dtype, TOKEN_DTYPES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  nodes: int | None = None  # None = jax.process_count()
  local: int | None = None  # None = devices per node

  def __post_init__(self):
    for name in ("nodes", "local"):
      value = getattr(self, name)
      if value is not None and (not is_int(value) or value < 1):
        fail(f"mesh.{name}", value, "must be None or an integer >= 1")


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "train": TrainConfig, "data": DataConfig,
            "mesh": MeshConfig}


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig
  moe: MoEConfig
  train: TrainConfig
  data: DataConfig
  mesh: MeshConfig

  def __post_init__(self):
    # MoEConfig reads no file; load auto's cost profile now, not when the step is traced.
    try:
      moe_lib.load_profile(self.moe)
    except ConfigError as e:
      raise as_run_keys(e) from None

  def to_dict(self) -> dict:
    out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
    for name in MOE_SET_BY_TRAINER:
      out["moe"].pop(name, None)
    return out


# ---------------------------------------------------------------------------- coercion

def _coerce(key: str, value: Any, hint: Any) -> Any:
  """Converts a YAML or command-line value to the field's annotated type."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
      if type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(key, value, inner[0])
  if hint is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
      return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
      return False
    fail(key, value, "expected a boolean (true/false)")
  if hint in (int, float):
    exact = (int,) if hint is int else (int, float)  # an int is a valid float, not vice versa
    if isinstance(value, exact) and not isinstance(value, bool):
      return hint(value)
    if isinstance(value, str):
      try:
        return hint(value)
      except ValueError:
        pass
    fail(key, value, "expected an integer" if hint is int else "expected a float")
  if hint is str:
    if isinstance(value, str):
      return value
    fail(key, value, "expected a string")
  raise TypeError(f"{key}: unsupported annotation {hint!r}")


def as_run_keys(error: ConfigError) -> ConfigError:
  """A library ConfigError with the names users write in the run config: MoEConfig.x is
  moe.x, and make_mesh's nodes / local are mesh.nodes / mesh.local."""
  message = str(error).replace("MoEConfig.", "moe.")
  if message.startswith("make_mesh: "):
    message = re.sub(r"\b(nodes|local)\b", r"mesh.\1", message.removeprefix("make_mesh: "))
  return ConfigError(message)


def _build_section(name: str, values: Mapping[str, Any], extra: Mapping[str, Any] = ()):
  cls = SECTIONS[name]
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  if name == "moe":
    fields -= set(MOE_SET_BY_TRAINER)
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      why = MOE_SET_BY_TRAINER.get(key) if name == "moe" else None
      hint = f" ({why})" if why else ""
      raise ConfigError(f"unknown config key {name}.{key}{hint}; valid keys in '{name}': "
                        f"{', '.join(sorted(fields))}")
    kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
  kwargs.update(extra)
  missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"config key {name}.{missing[0]} is required but missing")
  try:
    return cls(**kwargs)
  except ConfigError as e:
    raise as_run_keys(e) from None


def _check_sections(raw: Mapping[str, Any]) -> None:
  for section, values in raw.items():
    if section not in SECTIONS:
      raise ConfigError(f"unknown config section {section!r}; valid sections: "
                        f"{', '.join(SECTIONS)}")
    if values is not None and not isinstance(values, Mapping):
      raise ConfigError(f"config section {section!r} must be a mapping of key: value, "
                        f"not {type(values).__name__}")


def config_from_dict(raw: Mapping[str, Any]) -> Config:
  raw = dict(raw or {})
  _check_sections(raw)
  sections = {name: raw.get(name) or {} for name in SECTIONS}
  model = _build_section("model", sections["model"])
  built = {"model": model}
  for name in ("moe", "train", "data", "mesh"):
    extra = {"d_model": model.d_model} if name == "moe" else {}
    built[name] = _build_section(name, sections[name], extra)
  return Config(**built)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
  """Applies "section.key=value" strings to a raw (YAML) dict; values are coerced later."""
  _check_sections(raw or {})
  raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is invalid: expected section.key=value")
    key, value = item.split("=", 1)
    if key.count(".") != 1:
      raise ConfigError(f"override key {key!r} is invalid: expected section.key "
                        f"with section in {', '.join(SECTIONS)}")
    section, name = key.split(".")
    if section not in SECTIONS:
      raise ConfigError(f"unknown config section {section!r} in override {item!r}; "
                        f"valid sections: {', '.join(SECTIONS)}")
    raw.setdefault(section, {})[name] = value
  return raw


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
  raw = {}
  if path is not None:
    name = repr(str(path))
    try:
      raw = yaml.safe_load(pathlib.Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
      raise ConfigError(f"config file {name} does not exist") from None
    except OSError as e:  # a directory, no permission, ...
      raise ConfigError(f"config file {name} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
      raise ConfigError(f"config file {name} cannot be read: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
      mark = getattr(e, "problem_mark", None)
      where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
      problem = getattr(e, "problem", None) or type(e).__name__
      raise ConfigError(f"config file {name} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, Mapping):
      raise ConfigError(f"config file {name} must hold a mapping of sections")
  return config_from_dict(apply_overrides(raw, list(overrides)))
