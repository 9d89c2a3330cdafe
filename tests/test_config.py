"""MoEConfig validation rules and Hugging Face config import."""

import pytest

import hiermoe_jax as hm

BASE = dict(d_model=16, d_ff=32, num_experts=8, top_k=2)


@pytest.mark.parametrize("changes, message", [
    (dict(top_k=0), r"top_k=0 .*integer >= 1"),
    (dict(top_k=9), r"top_k=9 .*top_k <= num_experts=8"),
    (dict(d_model=0), r"d_model=0"),
    (dict(d_ff=2.5), r"d_ff=2.5"),
    (dict(router="topk"), r"router='topk' .*softmax"),
    (dict(router="sigmoid_grouped", n_group=3), r"n_group=3 .*divide num_experts=8"),
    (dict(router="sigmoid_grouped", n_group=4, topk_group=5), r"topk_group=5 .*<= n_group=4"),
    (dict(router="sigmoid_grouped", n_group=4, topk_group=1, top_k=3),
     r"topk_group=1 .*experts per group \(2\) must be >= top_k=3"),
    (dict(router="sigmoid_grouped", n_group=8, topk_group=2), r"n_group=8 .*>= 2 experts"),
    (dict(n_group=2), r"n_group=2 .*sigmoid_grouped"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0"),
    (dict(n_shared_experts=-1), r"n_shared_experts=-1"),
    (dict(shared_d_ff=0, n_shared_experts=1), r"shared_d_ff=0"),
    (dict(shared_gate=True), r"shared_gate=True .*n_shared_experts >= 1"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 .*> 0"),
    (dict(dispatch="alltoall"), r"dispatch='alltoall' .*hier_dedup"),
    (dict(dtype="int8"), r"dtype='int8'"),
    (dict(param_dtype="float64"), r"param_dtype='float64'"),
    (dict(load_balance_weight=-1.0), r"load_balance_weight=-1.0 .*>= 0"),
    (dict(z_loss_weight=-0.1), r"z_loss_weight=-0.1"),
    (dict(bias_update_rate=0.001), r"bias_update_rate=0.001 .*sigmoid_grouped"),
    (dict(expert_compute="loop"), r"expert_compute='loop'"),
    (dict(permute_impl="cuda"), r"permute_impl='cuda'"),
    (dict(all_to_all="nccl"), r"all_to_all='nccl'"),
])
def test_validation(changes, message):
  with pytest.raises(ValueError, match=message):
    hm.MoEConfig(**{**BASE, **changes})


def test_dtype_accepts_jnp_dtypes():
  import jax.numpy as jnp
  assert hm.MoEConfig(**BASE, dtype=jnp.bfloat16).dtype == "bfloat16"


def test_mesh_validation():
  import jax
  mesh = hm.make_mesh(2, 4)
  with pytest.raises(ValueError, match=r"num_experts=4 is invalid: must be a multiple of the "
                     r"8 devices of the 2x4 mesh"):
    hm.init_params(jax.random.key(0), hm.MoEConfig(**{**BASE, "num_experts": 4}), mesh)
  with pytest.raises(ValueError, match=r"nodes=3 x local=4 = 12 devices, but there are 8"):
    hm.make_mesh(3, 4)
  with pytest.raises(ValueError, match=r"local=-1 is invalid for 8 devices"):
    hm.make_mesh(nodes=3)
  assert dict(hm.make_mesh(local=2).shape) == {"node": 4, "local": 2}


MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
           "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02}
QWEN2 = {"model_type": "qwen2_moe", "hidden_size": 2048, "moe_intermediate_size": 1408,
         "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False,
         "shared_expert_intermediate_size": 5632, "router_aux_loss_coef": 0.001}
QWEN3 = {"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
         "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True}
DEEPSEEK = {"model_type": "deepseek_v3", "hidden_size": 7168, "moe_intermediate_size": 2048,
            "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
            "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_shared_experts": 1,
            "scoring_func": "sigmoid"}


def test_from_hf_families():
  mixtral = hm.MoEConfig.from_hf(MIXTRAL)
  assert (mixtral.num_experts, mixtral.top_k, mixtral.d_ff) == (8, 2, 14336)
  assert mixtral.norm_topk_prob and mixtral.router == "softmax"
  assert mixtral.load_balance_weight == 0.02
  qwen2 = hm.MoEConfig.from_hf(QWEN2)
  assert qwen2.shared_gate and qwen2.n_shared_experts == 1 and qwen2.shared_width == 5632
  assert not qwen2.norm_topk_prob
  qwen3 = hm.MoEConfig.from_hf(QWEN3, dispatch="hier_dedup")
  assert qwen3.norm_topk_prob and qwen3.shared_width == 0 and qwen3.dispatch == "hier_dedup"
  ds = hm.MoEConfig.from_hf(DEEPSEEK)
  assert (ds.router, ds.n_group, ds.topk_group, ds.routed_scaling_factor) == (
      "sigmoid_grouped", 8, 4, 2.5)
  assert ds.shared_width == 2048


def test_from_hf_errors():
  with pytest.raises(ValueError, match=r"model_type='llama' is not supported"):
    hm.MoEConfig.from_hf({"model_type": "llama"})
  with pytest.raises(ValueError, match=r"missing key 'num_local_experts'"):
    hm.MoEConfig.from_hf({k: v for k, v in MIXTRAL.items() if k != "num_local_experts"})
  with pytest.raises(ValueError, match=r"scoring_func='softmax'"):
    hm.MoEConfig.from_hf({**DEEPSEEK, "scoring_func": "softmax"})
