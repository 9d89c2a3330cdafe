"""The NNX and Linen shells inside tiny Flax models: init, apply, jit, grad, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import hiermoe_jax as hm
from helpers import assert_trees_close, mesh_of

CONFIG = hm.MoEConfig(d_model=16, d_ff=24, num_experts=16, top_k=2, dispatch="hier_dedup",
                      dropless=True, load_balance_weight=0.01)
EXPERT_SPEC = P(("node", "local"), None, None)


class TinyNNX(nnx.Module):
  def __init__(self, mesh, rngs):
    self.embed = nnx.Linear(8, 16, rngs=rngs)
    self.moe = hm.MoE(CONFIG, mesh=mesh, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    return self.head(h + self.moe(h))


def test_nnx_shell_matches_functional_core_and_trains():
  mesh = mesh_of("2x4")
  model = TinyNNX(mesh, nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["moe"]["params"]["experts"]["gate"].get_value() == EXPERT_SPEC
  assert model.moe.params["experts"]["up"][...].sharding.spec == EXPERT_SPEC
  x = jax.random.normal(jax.random.key(1), (8, 4, 8))

  h = model.embed(x)
  params = jax.tree.map(lambda v: v[...], model.moe.params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
  y, inter = nnx.capture(model.moe, nnx.Intermediate)(h)
  np.testing.assert_allclose(y, hm.reference_moe(params, h, CONFIG), atol=1e-5)
  (aux,) = hm.collect_aux(inter)
  assert aux.strategy == "hier_dedup" and int(aux.dropped) == 0

  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    def loss_fn(model):
      y, inter = nnx.capture(model, nnx.Intermediate)(x)
      (aux,) = hm.collect_aux(inter)
      return jnp.mean(y ** 2) + aux.aux_loss
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  bias_before = model.moe.router_bias[...]
  losses = [float(step(model, optimizer, x)) for _ in range(5)]
  assert losses[-1] < losses[0]
  # State that is not a Param is not touched by the optimizer.
  np.testing.assert_array_equal(model.moe.router_bias[...], bias_before)
  gate = model.moe.params["experts"]["gate"][...]
  assert gate.sharding.is_equivalent_to(NamedSharding(mesh, EXPERT_SPEC), gate.ndim)


class TinyLinen(nn.Module):
  mesh: object

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16)(x)
    return nn.Dense(4)(h + hm.linen.MoE(CONFIG, self.mesh)(h))


def test_linen_shell_init_apply_jit_grad():
  mesh = mesh_of("2x4")
  model = TinyLinen(mesh)
  x = jax.random.normal(jax.random.key(1), (8, 4, 8))
  variables = model.init(jax.random.key(0), x)
  specs = nn.get_partition_spec(variables)
  assert specs["params"]["MoE_0"]["experts/gate"] == EXPERT_SPEC
  assert specs["params"]["MoE_0"]["router/kernel"] == P()
  boxed = variables["params"]["MoE_0"]["experts/down"]
  assert nn.unbox(boxed).sharding.spec == EXPERT_SPEC

  @jax.jit
  def loss_fn(params, x):
    y, state = model.apply({**variables, "params": params}, x, mutable=["intermediates"])
    (aux,) = hm.collect_aux(state["intermediates"])
    return jnp.mean(y ** 2) + aux.aux_loss

  params = variables["params"]
  grads = jax.grad(loss_fn)(params, x)
  g = nn.unbox(grads["MoE_0"]["experts/gate"])
  assert g.shape == (16, 16, 24) and float(jnp.abs(g).sum()) > 0

  # The Linen output equals the functional core on the same weights.
  moe = nn.unbox(params["MoE_0"])
  core = {"router": {"kernel": moe["router/kernel"]},
          "experts": {k: moe[f"experts/{k}"] for k in ("gate", "up", "down")}}
  h = nn.Dense(16).apply({"params": nn.unbox(params["Dense_0"])}, x)
  y_shell = hm.linen.MoE(CONFIG, mesh).apply(
      {"params": params["MoE_0"], "router_state": variables["router_state"]["MoE_0"],
       "placement": variables["placement"]["MoE_0"]}, h)
  assert_trees_close(y_shell, hm.reference_moe(core, h, CONFIG))


def test_nnx_router_bias_update():
  mesh = mesh_of("2x4")
  config = hm.MoEConfig(d_model=16, d_ff=24, num_experts=16, top_k=2,
                        router="sigmoid_grouped", bias_update_rate=0.5)
  layer = hm.MoE(config, mesh=mesh, rngs=nnx.Rngs(0))
  counts = jnp.arange(16)
  layer.update_router_bias(counts)
  np.testing.assert_allclose(layer.router_bias[...], 0.5 * np.sign(7.5 - np.arange(16)))


DEEPSEEK = hm.MoEConfig(d_model=16, d_ff=24, num_experts=16, top_k=2, router="sigmoid_grouped",
                        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                        n_shared_experts=1, dispatch="hier_dedup", dropless=True)


def _to_hf(params, bias, prefix="model.layers.2.mlp."):
  """The inverse of convert.from_hf: a DeepSeek-V3 block's per-expert torch-layout keys."""
  p = jax.tree.map(np.asarray, params)
  sd = {f"{prefix}gate.weight": p["router"]["kernel"].T,
        f"{prefix}gate.e_score_correction_bias": np.asarray(bias)}
  for i in range(p["experts"]["gate"].shape[0]):
    for ours, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      sd[f"{prefix}experts.{i}.{hf}.weight"] = p["experts"][ours][i].T
  for ours, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
    sd[f"{prefix}shared_experts.{hf}.weight"] = p["shared"][ours].T
  return sd


def _hf_weights(mesh):
  params = hm.params.init_params_unsharded(jax.random.key(5), DEEPSEEK)
  bias = 0.1 * jax.random.normal(jax.random.key(6), (DEEPSEEK.num_experts,))
  x = jax.random.normal(jax.random.key(7), (32, 16))
  y, _ = hm.moe_apply(params, x, config=DEEPSEEK, mesh=mesh, router_bias=bias)
  return _to_hf(params, bias), params, bias, x, y


def _assert_on_mesh(tree, mesh):
  for leaf in jax.tree.leaves(tree):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh


def test_nnx_load_hf_sharded_on_the_layer_mesh():
  mesh = mesh_of("2x4")
  sd, params, bias, x, y = _hf_weights(mesh)
  layer = hm.MoE(DEEPSEEK, mesh=mesh, rngs=nnx.Rngs(0))
  layer.placement[...] = jnp.arange(16)[::-1]  # loading resets it to the checkpoint's order
  layer.load_hf(sd, prefix="model.layers.2.mlp.")
  assert_trees_close(layer(x), y)
  np.testing.assert_array_equal(layer.router_bias[...], bias)
  np.testing.assert_array_equal(layer.placement[...], np.arange(16))
  _assert_on_mesh(nnx.state(layer), mesh)
  assert layer.params["experts"]["up"][...].sharding.spec == EXPERT_SPEC
  with pytest.raises(hm.config.ConfigError, match=r"missing key 'gate.weight'.*pass "
                     r"prefix='model.layers.2.mlp.'"):
    layer.load_hf(sd)


def test_linen_load_hf_own_and_inside_a_model():
  mesh = mesh_of("2x4")
  sd, params, bias, x, y = _hf_weights(mesh)
  layer = hm.linen.MoE(DEEPSEEK, mesh)
  variables = hm.linen.load_hf(layer, sd, prefix="model.layers.2.mlp.")
  assert jax.tree.structure(variables) == jax.tree.structure(layer.init(jax.random.key(0), x))
  assert nn.get_partition_spec(variables)["params"]["experts/gate"] == EXPERT_SPEC
  _assert_on_mesh(variables, mesh)
  assert_trees_close(layer.apply(variables, x), y)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return hm.linen.MoE(DEEPSEEK, mesh, name="moe")(nn.Dense(16, name="embed")(x))

  model = Model()
  whole = model.init(jax.random.key(0), x)
  loaded = hm.linen.load_hf(layer, sd, prefix="model.layers.2.mlp.", variables=whole,
                            path="moe")
  assert jax.tree.structure(loaded) == jax.tree.structure(whole)
  h = nn.Dense(16).apply({"params": whole["params"]["embed"]}, x)
  assert_trees_close(model.apply(loaded, x), hm.moe_apply(params, h, config=DEEPSEEK, mesh=mesh,
                                                          router_bias=bias)[0])


def test_shell_errors():
  mesh = mesh_of("2x4")
  odd = hm.MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2)
  message = r"MoEConfig.num_experts=4 is invalid: must be a multiple of the 8 devices"
  with pytest.raises(hm.config.ConfigError, match=message):
    hm.MoE(odd, mesh=mesh, rngs=nnx.Rngs(0))
  with pytest.raises(hm.config.ConfigError, match=message):
    hm.linen.MoE(odd, mesh).init(jax.random.key(0), jnp.ones((8, 16)))
  with pytest.raises(TypeError, match=r"load_hf: module is a MoE; expected a hiermoe_jax.linen"):
    hm.linen.load_hf(hm.MoE(CONFIG, mesh=mesh, rngs=nnx.Rngs(0)), {})
