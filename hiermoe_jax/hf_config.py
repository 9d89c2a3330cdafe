"""Hugging Face `config.json` -> MoEConfig fields, one function per model family."""

from __future__ import annotations

from typing import Any, Callable, Mapping


def _require(config: Mapping[str, Any], key: str, family: str) -> Any:
  if key not in config:
    raise ValueError(f"Hugging Face {family} config is missing key {key!r}")
  return config[key]


def _mixtral(c):
  return dict(
      d_model=_require(c, "hidden_size", "mixtral"),
      d_ff=_require(c, "intermediate_size", "mixtral"),
      num_experts=_require(c, "num_local_experts", "mixtral"),
      top_k=_require(c, "num_experts_per_tok", "mixtral"),
      router="softmax",
      norm_topk_prob=True,  # Mixtral always renormalises its top-k weights.
      load_balance_weight=float(c.get("router_aux_loss_coef", 0.0)),
  )


def _qwen2_moe(c):
  shared = int(c.get("shared_expert_intermediate_size", 0) or 0)
  return dict(
      d_model=_require(c, "hidden_size", "qwen2_moe"),
      d_ff=_require(c, "moe_intermediate_size", "qwen2_moe"),
      num_experts=_require(c, "num_experts", "qwen2_moe"),
      top_k=_require(c, "num_experts_per_tok", "qwen2_moe"),
      router="softmax",
      norm_topk_prob=bool(c.get("norm_topk_prob", False)),
      n_shared_experts=1 if shared else 0,
      shared_d_ff=shared or None,
      shared_gate=bool(shared),  # Qwen2-MoE gates its shared expert with a sigmoid.
      load_balance_weight=float(c.get("router_aux_loss_coef", 0.0)),
  )


def _qwen3_moe(c):
  return dict(
      d_model=_require(c, "hidden_size", "qwen3_moe"),
      d_ff=_require(c, "moe_intermediate_size", "qwen3_moe"),
      num_experts=_require(c, "num_experts", "qwen3_moe"),
      top_k=_require(c, "num_experts_per_tok", "qwen3_moe"),
      router="softmax",
      norm_topk_prob=bool(c.get("norm_topk_prob", False)),
      load_balance_weight=float(c.get("router_aux_loss_coef", 0.0)),
  )


def _deepseek_v3(c):
  scoring = c.get("scoring_func", "sigmoid")
  if scoring != "sigmoid":
    raise ValueError(f"DeepSeek-V3 config has scoring_func={scoring!r}; only 'sigmoid' is supported")
  moe_ff = _require(c, "moe_intermediate_size", "deepseek_v3")
  return dict(
      d_model=_require(c, "hidden_size", "deepseek_v3"),
      d_ff=moe_ff,
      num_experts=_require(c, "n_routed_experts", "deepseek_v3"),
      top_k=_require(c, "num_experts_per_tok", "deepseek_v3"),
      router="sigmoid_grouped",
      norm_topk_prob=bool(c.get("norm_topk_prob", True)),
      n_group=int(c.get("n_group", 1)),
      topk_group=int(c.get("topk_group", 1)),
      routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
      n_shared_experts=int(c.get("n_shared_experts", 0) or 0),
      shared_d_ff=moe_ff,  # HF merges n shared experts into one MLP of n * moe_ff.
  )


FAMILIES: dict[str, Callable[[Mapping[str, Any]], dict]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
}


def moe_fields_from_hf(config: Mapping[str, Any]) -> dict:
  model_type = config.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"Hugging Face config model_type={model_type!r} is not supported; "
                     f"expected one of {sorted(FAMILIES)}")
  return FAMILIES[model_type](config)
