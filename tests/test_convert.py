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


def _fused(sd, config, *, mixtral=False):
  """The per-expert keys -> transformers 5's in-memory `experts.gate_up_proj` [E, 2F, D]
  (gate rows first) and `experts.down_proj` [E, D, F]."""
  names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
  e = config.num_experts
  out = {k: v for k, v in sd.items() if not k.startswith("experts.")}
  out["experts.gate_up_proj"] = np.stack(
      [np.concatenate([sd[f"experts.{i}.{names[0]}.weight"], sd[f"experts.{i}.{names[1]}.weight"]])
       for i in range(e)])
  out["experts.down_proj"] = np.stack([sd[f"experts.{i}.{names[2]}.weight"] for i in range(e)])
  return out


def test_fused_layout_and_prefix_equal_the_per_expert_layout():
  config = hm.MoEConfig(d_model=16, d_ff=12, num_experts=8, top_k=2, n_shared_experts=1,
                        shared_d_ff=20, shared_gate=True)
  sd = _hf_block(config)
  expected = convert.from_hf(sd, config)
  fused = _fused(sd, config)
  assert_trees_close(convert.from_hf(fused, config), expected, rtol=0, atol=0)
  # A full model's dict: the block is picked by its prefix, with or without the dot.
  model = {"model.embed_tokens.weight": np.zeros((4, 16))}
  for layer, block in enumerate([_hf_block(config), fused]):
    model.update({f"model.layers.{layer}.mlp.{k}": v for k, v in block.items()})
  for prefix in ("model.layers.1.mlp.", "model.layers.1.mlp"):
    assert_trees_close(convert.from_hf(model, config, prefix=prefix), expected, rtol=0, atol=0)
  with pytest.raises(hm.config.ConfigError, match=r"missing key 'gate.weight' \(.*\); the state "
                     r"dict holds an MoE block under 'model.layers.0.mlp.' \(and 1 more MoE "
                     r"blocks\): pass prefix='model.layers.0.mlp.'"):
    convert.from_hf(model, config)


def test_fused_shape_errors_name_the_dimensions():
  config = hm.MoEConfig(d_model=16, d_ff=12, num_experts=8, top_k=2)
  fused = _fused(_hf_block(config), config)
  transposed = {**fused, "experts.gate_up_proj": fused["experts.gate_up_proj"].transpose(0, 2, 1)}
  with pytest.raises(hm.config.ConfigError,
                     match=r"key 'experts.gate_up_proj' has shape \(8, 16, 24\), expected "
                           r"\(8, 24, 16\) = \[num_experts, 2\*d_ff, d_model\] .*looks transposed"):
    convert.from_hf(transposed, config)
  other_ff = hm.MoEConfig(d_model=16, d_ff=10, num_experts=8, top_k=2)
  with pytest.raises(hm.config.ConfigError, match=r"expected \(8, 20, 16\)"):
    convert.from_hf(fused, other_ff)
  scale = {**fused, "experts.down_proj_scale_inv": np.ones((8, 1, 1))}
  with pytest.raises(hm.config.ConfigError, match=r"unexpected key 'experts.down_proj_scale_inv'"
                     r".*FP8 block-quantized"):
    convert.from_hf(scale, config)
  with pytest.raises(TypeError, match=r"key 'gate.weight' holds a str"):
    convert.from_hf({**fused, "gate.weight": "abc"}, config)


def test_dtypes_numpy_bf16_jax_and_torch():
  import ml_dtypes
  config = hm.MoEConfig(d_model=16, d_ff=12, num_experts=8, top_k=2)
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in _hf_block(config).items()}
  exact = {k: v.astype(np.float32) for k, v in sd.items()}
  expected = convert.from_hf(exact, config)
  assert_trees_close(convert.from_hf(sd, config), expected, rtol=0, atol=0)
  as_jax = {k: jax.numpy.asarray(v) for k, v in sd.items()}
  assert_trees_close(convert.from_hf(as_jax, config), expected, rtol=0, atol=0)
  bf16 = convert.from_hf(sd, config.replace(param_dtype="bfloat16"))
  assert bf16.params["experts"]["gate"].dtype == jax.numpy.bfloat16
  torch = pytest.importorskip("torch")
  as_torch = {k: torch.from_numpy(v).to(torch.bfloat16).requires_grad_() for k, v in exact.items()}
  assert_trees_close(convert.from_hf(as_torch, config), expected, rtol=0, atol=0)


def test_safetensors_reader_is_lazy_and_reads_bf16(tmp_path):
  import json
  import ml_dtypes
  from safetensors.numpy import save_file
  config = hm.MoEConfig(d_model=16, d_ff=12, num_experts=8, top_k=2, n_shared_experts=1,
                        shared_d_ff=20, shared_gate=True)
  sd = _hf_block(config)
  mixed = {k: v.astype(ml_dtypes.bfloat16 if "experts" in k else np.float16)
           for k, v in sd.items()}
  save_file({k: v for k, v in mixed.items()}, str(tmp_path / "model.safetensors"))
  ckpt = convert.open_safetensors(tmp_path / "model.safetensors")
  assert set(ckpt) == set(sd) and "gate.weight" in ckpt
  assert ckpt["experts.3.up_proj.weight"].dtype == ml_dtypes.bfloat16
  assert ckpt["gate.weight"].dtype == np.float16
  np.testing.assert_array_equal(ckpt["experts.3.up_proj.weight"], mixed["experts.3.up_proj.weight"])
  expected = convert.from_hf({k: v.astype(np.float32) for k, v in mixed.items()}, config)
  assert_trees_close(convert.from_hf(ckpt, config, mesh=mesh_of("2x4")), expected, rtol=0, atol=0)
  # Sharded: an index naming a file per tensor.
  shard = tmp_path / "sharded"
  shard.mkdir()
  keys = sorted(mixed)
  save_file({k: mixed[k] for k in keys[::2]}, str(shard / "a.safetensors"))
  save_file({k: mixed[k] for k in keys[1::2]}, str(shard / "b.safetensors"))
  index = {"weight_map": {k: "a.safetensors" if i % 2 == 0 else "b.safetensors"
                          for i, k in enumerate(keys)}}
  (shard / "model.safetensors.index.json").write_text(json.dumps(index))
  assert_trees_close(convert.from_hf(convert.open_safetensors(shard), config), expected,
                     rtol=0, atol=0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(hm.config.ConfigError, match=r"neither model.safetensors.index.json nor"):
    convert.open_safetensors(tmp_path / "empty")
  with pytest.raises(hm.config.ConfigError, match=r"no such file"):
    convert.open_safetensors(tmp_path / "missing.safetensors")


def test_hf_config_spellings_and_objects():
  class FakeConfig:  # a transformers config object: read through to_dict()
    def to_dict(self):
      return {"model_type": "qwen3_moe", "hidden_size": 16, "moe_intermediate_size": 12,
              "num_local_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
              "hidden_act": "silu"}
  assert hm.MoEConfig.from_hf(FakeConfig()).num_experts == 8
  mixtral = {"model_type": "mixtral", "hidden_size": 16, "intermediate_size": 12,
             "num_experts": 8, "num_experts_per_tok": 2}
  assert hm.MoEConfig.from_hf(mixtral).num_experts == 8
  deepseek = {"model_type": "deepseek_v3", "hidden_size": 16, "moe_intermediate_size": 12,
              "num_local_experts": 8, "num_experts_per_tok": 2, "scoring_func": None}
  assert hm.MoEConfig.from_hf(deepseek).router == "sigmoid_grouped"
  with pytest.raises(hm.config.ConfigError, match=r"missing key 'n_routed_experts' \(or "
                     r"'num_local_experts'\)"):
    hm.MoEConfig.from_hf({k: v for k, v in deepseek.items() if k != "num_local_experts"})
  with pytest.raises(hm.config.ConfigError, match=r"hidden_act='gelu' is not supported"):
    hm.MoEConfig.from_hf({**mixtral, "hidden_act": "gelu"})
  with pytest.raises(hm.config.ConfigError, match=r"not int"):
    hm.MoEConfig.from_hf(3)
