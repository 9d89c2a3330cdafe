"""Hugging Face MoE block weights -> params, checked by running the block."""

import jax
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import convert
from helpers import assert_trees_close, mesh_of

RNG = np.random.default_rng(0)


def _hf_block(config, *, mixtral=False, shared_prefix="shared_expert."):
  d, f, e, s = config.d_model, config.d_ff, config.num_experts, config.shared_width
  names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
  sd = {"gate.weight": RNG.normal(size=(e, d))}
  for i in range(e):
    sd[f"experts.{i}.{names[0]}.weight"] = RNG.normal(size=(f, d)) / np.sqrt(d)
    sd[f"experts.{i}.{names[1]}.weight"] = RNG.normal(size=(f, d)) / np.sqrt(d)
    sd[f"experts.{i}.{names[2]}.weight"] = RNG.normal(size=(d, f)) / np.sqrt(f)
  if s:
    for name, shape in (("gate_proj", (s, d)), ("up_proj", (s, d)), ("down_proj", (d, s))):
      sd[f"{shared_prefix}{name}.weight"] = RNG.normal(size=shape) / np.sqrt(shape[1])
  if config.shared_gate:
    sd["shared_expert_gate.weight"] = RNG.normal(size=(1, d))
  if config.router == "sigmoid_grouped":
    sd["gate.e_score_correction_bias"] = RNG.normal(size=(e,))
  return sd


def _hf_forward(sd, config, x, *, mixtral=False, shared_prefix="shared_expert."):
  """The HF block's forward written directly on the torch-layout weights."""
  silu = lambda a: a / (1 + np.exp(-a))
  names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
  logits = x @ sd["gate.weight"].T
  bias = sd.get("gate.e_score_correction_bias")
  routing = hm.routing.route(logits.astype(np.float32), config,
                             None if bias is None else bias.astype(np.float32))
  ids, w = np.asarray(routing.ids_TK), np.asarray(routing.weights_TK)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(config.top_k):
      i = ids[t, k]
      g = x[t] @ sd[f"experts.{i}.{names[0]}.weight"].T
      u = x[t] @ sd[f"experts.{i}.{names[1]}.weight"].T
      y[t] += w[t, k] * ((silu(g) * u) @ sd[f"experts.{i}.{names[2]}.weight"].T)
  if config.shared_width:
    p = shared_prefix
    h = silu(x @ sd[f"{p}gate_proj.weight"].T) * (x @ sd[f"{p}up_proj.weight"].T)
    shared = h @ sd[f"{p}down_proj.weight"].T
    if config.shared_gate:
      shared = shared / (1 + np.exp(-(x @ sd["shared_expert_gate.weight"].T)))
    y += shared
  return y


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_from_hf_runs_like_the_hf_block(family):
  kw = dict(d_model=16, d_ff=12, num_experts=8, top_k=2, dropless=True, dispatch="hier_dedup")
  if family == "qwen2_moe":
    config = hm.MoEConfig(**kw, n_shared_experts=1, shared_d_ff=20, shared_gate=True)
  elif family == "deepseek_v3":
    config = hm.MoEConfig(**kw, router="sigmoid_grouped", n_group=4, topk_group=2,
                          norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=2)
  else:
    config = hm.MoEConfig(**kw, norm_topk_prob=True)
  mixtral = family == "mixtral"
  prefix = "shared_experts." if family == "deepseek_v3" else "shared_expert."
  sd = _hf_block(config, mixtral=mixtral, shared_prefix=prefix)
  mesh = mesh_of("2x4")
  params, bias = convert.from_hf(sd, config, mesh=mesh)
  x = RNG.normal(size=(16, 16)).astype(np.float32)
  y, _ = hm.moe_apply(params, x, config=config, mesh=mesh, router_bias=bias)
  expected = _hf_forward({k: v.astype(np.float32) for k, v in sd.items()}, config, x,
                         mixtral=mixtral, shared_prefix=prefix)
  assert_trees_close(y, expected, rtol=1e-4, atol=1e-4)


def test_from_hf_errors_name_the_key():
  config = hm.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2)
  sd = _hf_block(config)
  missing = {k: v for k, v in sd.items() if k != "experts.2.up_proj.weight"}
  with pytest.raises(ValueError, match=r"missing key 'experts.2.up_proj.weight'"):
    convert.from_hf(missing, config)
  with pytest.raises(ValueError, match=r"unexpected key 'experts.4.up_proj.weight'"):
    convert.from_hf({**sd, "experts.4.up_proj.weight": np.zeros((4, 8))}, config)
  with pytest.raises(ValueError, match=r"key 'gate.weight' has shape \(4, 7\), expected \(4, 8\)"):
    convert.from_hf({**sd, "gate.weight": np.zeros((4, 7))}, config)
