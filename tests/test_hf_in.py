"""Hugging Face in: transformers' own MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3) with random weights, converted by `convert.from_hf` from every source
layout and dtype, give the block's output under `moe_apply` (float32).

Needs torch and transformers (the `test` extra); without them the numpy
expectations of test_convert.py still cover the conversion.
"""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hiermoe_jax as hm  # noqa: E402
from hiermoe_jax import convert  # noqa: E402
from helpers import mesh_of  # noqa: E402

D, F, E, K = 16, 12, 8, 2
TOL = 1e-5  # max |y - y_hf| / max |y_hf|, float32 throughout


def _hf_config(family):
  hf_config = _hf_config_of(family)
  hf_config._experts_implementation = "eager"  # as a full model sets it; standalone it is None
  return hf_config


def _hf_config_of(family):
  common = dict(hidden_size=D, num_experts_per_tok=K, hidden_act="silu")
  if family == "mixtral":
    return transformers.MixtralConfig(**common, intermediate_size=F, num_local_experts=E,
                                      router_jitter_noise=0.0)
  if family == "qwen2_moe":
    return transformers.Qwen2MoeConfig(**common, moe_intermediate_size=F, num_experts=E,
                                       shared_expert_intermediate_size=20, norm_topk_prob=False)
  if family == "qwen3_moe":
    return transformers.Qwen3MoeConfig(**common, moe_intermediate_size=F, num_experts=E,
                                       norm_topk_prob=True)
  return transformers.DeepseekV3Config(**common, moe_intermediate_size=F, n_routed_experts=E,
                                       n_group=4, topk_group=2, n_shared_experts=2,
                                       routed_scaling_factor=2.5, norm_topk_prob=True)


def _hf_block(family, seed=0):
  """transformers' MoE block of `family` with every weight random (HF initialises
  some to zero and leaves the expert stacks uninitialised)."""
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
  from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
  classes = {"mixtral": MixtralSparseMoeBlock, "qwen2_moe": Qwen2MoeSparseMoeBlock,
             "qwen3_moe": Qwen3MoeSparseMoeBlock, "deepseek_v3": DeepseekV3MoE}
  hf_config = _hf_config(family)
  torch.manual_seed(seed)
  block = classes[family](hf_config).eval()
  with torch.no_grad():
    for name, p in list(block.named_parameters()) + list(block.named_buffers()):
      scale = 0.1 if name.endswith("e_score_correction_bias") else 1 / np.sqrt(p.shape[-1])
      p.copy_(torch.randn(p.shape) * scale)
  return block, hf_config


def _round_bf16(block):
  """The block with its weights rounded to bf16 and kept in float32: what a bf16
  checkpoint holds, computed in float32."""
  with torch.no_grad():
    for p in list(block.parameters()) + list(block.buffers()):
      p.copy_(p.to(torch.bfloat16).float())
  return block


def _per_expert(fused, family):
  """transformers 5's fused in-memory layout -> the checkpoint's per-expert keys."""
  names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
  out = {k: v for k, v in fused.items() if not k.startswith("experts.")}
  gate_up, down = fused["experts.gate_up_proj"], fused["experts.down_proj"]
  for i in range(E):
    out[f"experts.{i}.{names[0]}.weight"] = gate_up[i, :F]
    out[f"experts.{i}.{names[1]}.weight"] = gate_up[i, F:]
    out[f"experts.{i}.{names[2]}.weight"] = down[i]
  return out


def _run(params, bias, config, x):
  mesh = mesh_of("2x4")
  y, _ = hm.moe_apply(params, x, config=config, mesh=mesh, router_bias=bias)
  return np.asarray(y)


def _rel_err(y, y_hf):
  return float(np.max(np.abs(y - y_hf)) / np.max(np.abs(y_hf)))


def _x(seed=1):
  return np.random.default_rng(seed).normal(size=(2, 16, D)).astype(np.float32)


def _hf_out(block, x):
  with torch.no_grad():
    return block(torch.from_numpy(x)).numpy()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_transformers_object_and_dict(family):
  block = _hf_config(family)
  from_obj = hm.MoEConfig.from_hf(block)
  from_dict = hm.MoEConfig.from_hf(block.to_dict())
  assert from_obj == from_dict
  assert (from_obj.num_experts, from_obj.top_k, from_obj.d_ff) == (E, K, F)


def _write_sharded(sd, directory, shards=2):
  """A sharded safetensors checkpoint (index + shards), written with the numpy API."""
  from safetensors.numpy import save_file
  keys = sorted(sd)
  weight_map = {}
  for s in range(shards):
    name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: np.ascontiguousarray(sd[k]) for k in keys[s::shards]}
    save_file(part, str(directory / name))
    weight_map.update(dict.fromkeys(part, name))
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _full_model_on_disk(blocks, family, directory):
  """A whole model's bf16 checkpoint as on the Hub: per-expert keys under each layer's
  block (Mixtral's is `block_sparse_moe`), beside other weights; returns the block name."""
  block_name = "block_sparse_moe" if family == "mixtral" else "mlp"
  sd = {"model.embed_tokens.weight": np.zeros((4, D), ml_dtypes.bfloat16)}
  for layer, block in enumerate(blocks):
    fused = {k: v.numpy() for k, v in block.state_dict().items()}
    for k, v in _per_expert(fused, family).items():
      sd[f"model.layers.{layer}.{block_name}.{k}"] = v.astype(ml_dtypes.bfloat16)
    sd[f"model.layers.{layer}.self_attn.q_proj.weight"] = np.zeros((D, D), ml_dtypes.bfloat16)
  _write_sharded(sd, directory)
  return block_name, len(sd)


def sources(family, tmp_path):
  """(name, state dict, prefix, HF block it must equal) for every source layout and dtype."""
  block, _ = _hf_block(family, seed=0)
  fused = block.state_dict()
  yield "torch f32 fused", fused, "", block
  yield "torch f32 per-expert", _per_expert(fused, family), "", block
  yield "jax f32 fused", {k: jax.numpy.asarray(v.numpy()) for k, v in fused.items()}, "", block
  rounded = _round_bf16(_hf_block(family, seed=1)[0])
  for dtype in (torch.bfloat16, torch.float16):
    low = {k: v.to(dtype) for k, v in rounded.state_dict().items()}
    if dtype == torch.float16:  # bf16 values are not all exact in f16: compare to f16's
      rounded16 = _hf_block(family, seed=1)[0]
      rounded16.load_state_dict({k: v.float() for k, v in low.items()})
      yield "torch f16 fused", low, "", rounded16
      continue
    yield "torch bf16 fused", low, "", rounded
    yield "torch bf16 per-expert", _per_expert(low, family), "", rounded
  numpy_bf16 = {k: v.numpy().astype(ml_dtypes.bfloat16) for k, v in rounded.state_dict().items()}
  yield "numpy bf16 per-expert", _per_expert(numpy_bf16, family), "", rounded
  blocks = [_round_bf16(_hf_block(family, seed=s)[0]) for s in (2, 3)]
  block_name, count = _full_model_on_disk(blocks, family, tmp_path)
  ckpt = convert.open_safetensors(tmp_path)
  assert len(ckpt) == count and ckpt["model.layers.1.self_attn.q_proj.weight"].shape == (D, D)
  yield "safetensors bf16 sharded, full model", ckpt, f"model.layers.1.{block_name}.", blocks[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_source_runs_like_the_hf_block(family, tmp_path, cache_dir):
  """One MoEConfig per family (one compilation), read from the transformers config."""
  hf_config = _hf_config(family)
  config = hm.MoEConfig.from_hf(hf_config, dispatch="hier_dedup", dropless=True)
  mesh = mesh_of("2x4")
  x = _x()
  errors = {}
  for name, sd, prefix, block in sources(family, tmp_path):
    # Half the sources pass the transformers config object in place of the MoEConfig.
    params, bias = convert.from_hf(sd, hf_config if len(errors) % 2 else config,
                                   prefix=prefix, mesh=mesh)
    errors[name] = _rel_err(_run(params, bias, config, x), _hf_out(block, x))
  print(f"\n{family}: " + ", ".join(f"{k}: {v:.1e}" for k, v in errors.items()))
  assert max(errors.values()) < TOL, errors


def test_prefix_hint_names_the_layer(tmp_path):
  blocks = [_hf_block("mixtral", seed=s)[0] for s in (2, 3)]
  block_name, _ = _full_model_on_disk(blocks, "mixtral", tmp_path)
  config = hm.MoEConfig.from_hf(_hf_config("mixtral"))
  with pytest.raises(hm.config.ConfigError,
                     match=r"missing key 'gate.weight' .*MoE block under "
                           r"'model.layers.0.block_sparse_moe.' \(and 1 more MoE blocks\): "
                           r"pass prefix='model.layers.0.block_sparse_moe.'"):
    convert.from_hf(convert.open_safetensors(tmp_path), config)
