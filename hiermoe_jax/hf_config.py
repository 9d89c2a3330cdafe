"""Hugging Face `config.json` -> MoEConfig fields, one function per model family.

Accepts the parsed `config.json` (a dict) or a `transformers` config object (read
through its `to_dict()`). Optional keys are read with typed getters, so a malformed
value raises a one-line `ConfigError` naming the Hugging Face key (not a bare
`int()` / `float()` error). The expert count has several spellings: the checkpoints'
`config.json` and transformers' `to_dict()` do not agree (`Qwen3MoeConfig.to_dict()`
writes `num_local_experts`, Qwen3's `config.json` has `num_experts`), so each family
takes any of its spellings.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from hiermoe_jax.errors import ConfigError, is_finite_real, is_int


def _require(config: Mapping[str, Any], key: str, family: str) -> Any:
  if key not in config:
    raise ConfigError(f"Hugging Face {family} config is missing key {key!r}")
  return config[key]


def _require_any(config: Mapping[str, Any], keys: tuple[str, ...], family: str) -> Any:
  for key in keys:
    if config.get(key) is not None:
      return config[key]
  others = " or ".join(repr(k) for k in keys[1:])
  raise ConfigError(f"Hugging Face {family} config is missing key {keys[0]!r} (or {others})")


def _check_act(c, family):
  # The experts are SwiGLU: another activation would load and silently compute
  # something else.
  act = c.get("hidden_act")
  if act is not None and act not in ("silu", "swish"):
    raise ConfigError(f"Hugging Face {family} config key hidden_act={act!r} is not supported: "
                      "the experts are SwiGLU ('silu')")


def _get(config: Mapping[str, Any], key: str, family: str, default: Any, ok: Callable,
         valid: str) -> Any:
  value = config.get(key, default)
  if value is None:  # HF writes null for "unset"
    value = default
  if not ok(value):
    raise ConfigError(f"Hugging Face {family} config key {key}={value!r} is invalid: {valid}")
  return value


def _int(c, key, family, default):
  return _get(c, key, family, default, is_int, "expected an integer")


def _float(c, key, family, default):
  return float(_get(c, key, family, default, is_finite_real, "expected a finite number"))


def _bool(c, key, family, default):
  return _get(c, key, family, default, lambda v: isinstance(v, bool), "expected true or false")


def _mixtral(c):
  return dict(
      d_model=_require(c, "hidden_size", "mixtral"),
      d_ff=_require(c, "intermediate_size", "mixtral"),
      num_experts=_require_any(c, ("num_local_experts", "num_experts"), "mixtral"),
      top_k=_require(c, "num_experts_per_tok", "mixtral"),
      router="softmax",
      norm_topk_prob=True,  # Mixtral always renormalises its top-k weights.
      load_balance_weight=_float(c, "router_aux_loss_coef", "mixtral", 0.0),
  )


def _qwen2_moe(c):
  shared = _int(c, "shared_expert_intermediate_size", "qwen2_moe", 0)
  return dict(
      d_model=_require(c, "hidden_size", "qwen2_moe"),
      d_ff=_require(c, "moe_intermediate_size", "qwen2_moe"),
      num_experts=_require_any(c, ("num_experts", "num_local_experts"), "qwen2_moe"),
      top_k=_require(c, "num_experts_per_tok", "qwen2_moe"),
      router="softmax",
      norm_topk_prob=_bool(c, "norm_topk_prob", "qwen2_moe", False),
      n_shared_experts=1 if shared else 0,
      shared_d_ff=shared or None,
      shared_gate=bool(shared),  # Qwen2-MoE gates its shared expert with a sigmoid.
      load_balance_weight=_float(c, "router_aux_loss_coef", "qwen2_moe", 0.0),
  )


def _qwen3_moe(c):
  return dict(
      d_model=_require(c, "hidden_size", "qwen3_moe"),
      d_ff=_require(c, "moe_intermediate_size", "qwen3_moe"),
      num_experts=_require_any(c, ("num_experts", "num_local_experts"), "qwen3_moe"),
      top_k=_require(c, "num_experts_per_tok", "qwen3_moe"),
      router="softmax",
      norm_topk_prob=_bool(c, "norm_topk_prob", "qwen3_moe", False),
      load_balance_weight=_float(c, "router_aux_loss_coef", "qwen3_moe", 0.0),
  )


def _deepseek_v3(c):
  scoring = c.get("scoring_func") or "sigmoid"  # transformers 5's to_dict() leaves it out
  if scoring != "sigmoid":
    raise ConfigError(f"DeepSeek-V3 config has scoring_func={scoring!r}; only 'sigmoid' is "
                      "supported")
  moe_ff = _require(c, "moe_intermediate_size", "deepseek_v3")
  return dict(
      d_model=_require(c, "hidden_size", "deepseek_v3"),
      d_ff=moe_ff,
      num_experts=_require_any(c, ("n_routed_experts", "num_local_experts"), "deepseek_v3"),
      top_k=_require(c, "num_experts_per_tok", "deepseek_v3"),
      router="sigmoid_grouped",
      norm_topk_prob=_bool(c, "norm_topk_prob", "deepseek_v3", True),
      n_group=_int(c, "n_group", "deepseek_v3", 1),
      topk_group=_int(c, "topk_group", "deepseek_v3", 1),
      routed_scaling_factor=_float(c, "routed_scaling_factor", "deepseek_v3", 1.0),
      n_shared_experts=_int(c, "n_shared_experts", "deepseek_v3", 0),
      shared_d_ff=moe_ff,  # HF merges n shared experts into one MLP of n * moe_ff.
  )


FAMILIES: dict[str, Callable[[Mapping[str, Any]], dict]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
}


def as_dict(config: Any) -> Mapping[str, Any]:
  """The parsed `config.json`, or a `transformers` config object's `to_dict()`."""
  if isinstance(config, Mapping):
    return config
  to_dict = getattr(config, "to_dict", None)
  if callable(to_dict):  # transformers.PretrainedConfig, without importing transformers
    return to_dict()
  raise ConfigError(f"a Hugging Face config must be a mapping (the parsed config.json) or a "
                    f"transformers config object, not {type(config).__name__}")


def moe_fields_from_hf(config: Any) -> dict:
  config = as_dict(config)
  model_type = config.get("model_type")
  if model_type not in FAMILIES:
    raise ConfigError(f"Hugging Face config model_type={model_type!r} is not supported; "
                      f"expected one of {sorted(FAMILIES)}")
  _check_act(config, model_type)
  return FAMILIES[model_type](config)
