"""Hugging Face MoE block weights -> hiermoe_jax params.

Keys are relative to the block (e.g. `model.layers.3.mlp.` stripped). torch's
Linear stores [out, in]; params store [in, out], so every matrix is transposed.
Expert weights land in slot order = logical order (the identity placement).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.params import param_shardings

# Per family: our name -> HF projection name, for routed experts.
_EXPERT_NAMES = {
    "proj": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
}


class Converted(NamedTuple):
  params: dict
  router_bias: Any  # [E] float32, or None when the checkpoint has no bias


def _expert_naming(state_dict: Mapping[str, Any]) -> dict:
  return _EXPERT_NAMES["mixtral" if "experts.0.w1.weight" in state_dict else "proj"]


def _shared_prefix(state_dict: Mapping[str, Any]) -> str:
  if any(k.startswith("shared_experts.") for k in state_dict):
    return "shared_experts."  # DeepSeek
  return "shared_expert."  # Qwen2-MoE


def expected_keys(config: MoEConfig, state_dict: Mapping[str, Any]) -> dict[str, tuple]:
  """HF key -> expected HF shape, for this config."""
  d, f, e, s = config.d_model, config.d_ff, config.num_experts, config.shared_width
  names = _expert_naming(state_dict)
  keys = {"gate.weight": (e, d)}
  for i in range(e):
    keys[f"experts.{i}.{names['gate']}.weight"] = (f, d)
    keys[f"experts.{i}.{names['up']}.weight"] = (f, d)
    keys[f"experts.{i}.{names['down']}.weight"] = (d, f)
  if s:
    prefix = _shared_prefix(state_dict)
    keys[f"{prefix}gate_proj.weight"] = (s, d)
    keys[f"{prefix}up_proj.weight"] = (s, d)
    keys[f"{prefix}down_proj.weight"] = (d, s)
  if config.shared_gate:
    keys["shared_expert_gate.weight"] = (1, d)
  if config.router == "sigmoid_grouped":
    keys["gate.e_score_correction_bias"] = (e,)
  return keys


def from_hf(state_dict: Mapping[str, Any], config: MoEConfig, *, mesh=None) -> Converted:
  """Maps one HF MoE block's weights to (params, router_bias).

  Raises ValueError naming the key for missing keys, unexpected keys and wrong
  shapes. With `mesh`, the params are placed with their shardings.
  """
  expected = expected_keys(config, state_dict)
  missing = [k for k in expected if k not in state_dict]
  if missing:
    raise ValueError(f"from_hf: missing key {missing[0]!r} ({len(missing)} missing in all)")
  unexpected = [k for k in state_dict if k not in expected]
  if unexpected:
    raise ValueError(f"from_hf: unexpected key {unexpected[0]!r} for this MoEConfig "
                     f"({len(unexpected)} unexpected in all)")
  arrays = {}
  for key, shape in expected.items():
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != shape:
      raise ValueError(f"from_hf: key {key!r} has shape {value.shape}, expected {shape}")
    arrays[key] = value

  names = _expert_naming(state_dict)
  stack = lambda ours: np.stack([arrays[f"experts.{i}.{names[ours]}.weight"].T
                                 for i in range(config.num_experts)])
  params = {"router": {"kernel": arrays["gate.weight"].T},
            "experts": {k: stack(k) for k in ("gate", "up", "down")}}
  if config.shared_width:
    prefix = _shared_prefix(state_dict)
    params["shared"] = {k: arrays[f"{prefix}{k}_proj.weight"].T for k in ("gate", "up", "down")}
  if config.shared_gate:
    params["shared_gate"] = {"kernel": arrays["shared_expert_gate.weight"].T}
  params = jax.tree.map(lambda a: jax.numpy.asarray(a, config.param_dtype), params)
  if mesh is not None:
    params = jax.device_put(params, param_shardings(config, mesh))
  bias = arrays.get("gate.e_score_correction_bias")
  return Converted(params, None if bias is None else jax.numpy.asarray(bias))
