"""Shells that behave: a jitted train step over the NNX and Linen shells compiles
once (every variable starts on the mesh with the sharding a step returns), a plain
call warns nothing, and params or a router bias from another config are refused
with the shapes named."""

import collections
import contextlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import hiermoe_jax as hm
from hiermoe_jax.params import check_params, check_router_bias
from helpers import mesh_of

CONFIG = hm.MoEConfig(d_model=16, d_ff=24, num_experts=16, top_k=2, dispatch="hier_dedup",
                      dropless=True, router="sigmoid_grouped", n_group=4, topk_group=2,
                      n_shared_experts=1, load_balance_weight=0.01, bias_update_rate=0.01)
# jax records one such event per lowering of a jitted function, i.e. per compilation
# (a persistent-cache hit still lowers first, so it is counted too).
LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def lowerings():
  """Counts lowerings per function name while the block runs."""
  counts = collections.Counter()

  def listener(event, duration, **kwargs):
    if event == LOWERING:
      counts[kwargs.get("fun_name")] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _train(step_once, steps=3):
  """Lowerings of each step (the first compiles, the rest must not)."""
  per_step = []
  with lowerings() as counts:
    for _ in range(steps):
      before = sum(counts.values())
      step_once()
      per_step.append(sum(counts.values()) - before)
  return counts, per_step


class TinyNNX(nnx.Module):
  def __init__(self, mesh, rngs):
    self.moe = hm.MoE(CONFIG, mesh=mesh, rngs=rngs)

  def __call__(self, x):
    return self.moe(x)


def test_nnx_train_step_compiles_once():
  mesh = mesh_of("2x4")
  model = TinyNNX(mesh, nnx.Rngs(0))
  replicated = NamedSharding(mesh, P())
  for path, value in nnx.iter_graph(model):
    if isinstance(value, nnx.Variable):
      sharding = value[...].sharding
      assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh, path
      if path[-1] in ("kernel", "router_bias", "placement") or path[-2] == "shared":
        assert sharding.is_equivalent_to(replicated, value[...].ndim), path
  # Under the mesh, the optimizer's own counters are created on it too.
  with jax.set_mesh(mesh):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 16))

  @nnx.jit
  def nnx_train_step(model, optimizer, x):
    def loss_fn(model):
      y, inter = nnx.capture(model, nnx.Intermediate)(x)
      (aux,) = hm.collect_aux(inter)
      return jnp.mean(y ** 2) + aux.aux_loss, aux.expert_counts
    (loss, counts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, counts

  def once():
    _, counts = nnx_train_step(model, optimizer, x)
    model.moe.update_router_bias(counts)  # state updated between steps, eagerly

  counts, per_step = _train(once)
  assert counts["jit(nnx_train_step)"] == 1, counts
  assert per_step[1:] == [0, 0], per_step


class TinyLinen(nn.Module):
  mesh: object

  @nn.compact
  def __call__(self, x):
    return hm.linen.MoE(CONFIG, self.mesh)(x)


def test_linen_train_step_compiles_once():
  mesh = mesh_of("2x4")
  model = TinyLinen(mesh)
  x = jax.random.normal(jax.random.key(1), (32, 16))
  variables = model.init(jax.random.key(0), x)
  for leaf in jax.tree.leaves(nn.unbox(variables)):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh

  @jax.jit
  def linen_train_step(variables, x):
    def loss_fn(params):
      y, state = model.apply({**variables, "params": params}, x, mutable=["intermediates"])
      (aux,) = hm.collect_aux(state["intermediates"])
      return jnp.mean(y ** 2) + aux.aux_loss, aux.expert_counts
    (loss, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {**variables, "params": params}, counts

  state = {"variables": variables}

  def once():
    variables, counts = linen_train_step(state["variables"], x)
    bias = variables["router_state"]["MoE_0"]["bias"]
    variables["router_state"]["MoE_0"]["bias"] = hm.update_router_bias(bias, counts, 0.01)
    state["variables"] = variables

  counts, per_step = _train(once)
  assert counts["jit(linen_train_step)"] == 1, counts
  assert per_step[1:] == [0, 0], per_step
  assert linen_train_step._cache_size() == 1


def test_plain_call_warns_nothing_and_capture_still_collects():
  mesh = mesh_of("2x4")
  layer = hm.MoE(CONFIG, mesh=mesh, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (32, 16))
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    y = layer(x)
    y_captured, inter = nnx.capture(layer, nnx.Intermediate)(x)
  assert not hasattr(layer, "aux")  # nothing sown into the module itself
  (aux,) = hm.collect_aux(inter)
  assert aux.expert_counts.shape == (16,)
  assert jnp.array_equal(y, y_captured)


def test_params_and_bias_from_another_config_are_named():
  params = hm.params.init_params_unsharded(jax.random.key(0), CONFIG)
  check_params(params, CONFIG)
  check_router_bias(jnp.zeros(16), CONFIG)
  check_router_bias(None, CONFIG)
  with pytest.raises(ValueError, match=r"params\['experts'\]\['gate'\] has shape \(16, 16, 24\), "
                     r"expected \(16, 16, 20\) = \[num_experts, d_model, d_ff\] for "
                     r"MoEConfig\(d_model=16, d_ff=20"):
    check_params(params, CONFIG.replace(d_ff=20, shared_d_ff=24))
  with pytest.raises(ValueError, match=r"params\['router'\]\['kernel'\] has shape \(16, 16\), "
                     r"expected \(16, 32\)"):
    check_params(params, CONFIG.replace(num_experts=32))
  with pytest.raises(ValueError, match=r"params has an entry 'shared' that .* does not use "
                     r"\(set n_shared_experts >= 1\)"):
    check_params(params, CONFIG.replace(n_shared_experts=0))
  with pytest.raises(ValueError, match=r"params has no entry 'shared_gate', which this "
                     r"MoEConfig needs \(shared_gate=True\)"):
    check_params(params, CONFIG.replace(router="softmax", n_group=1, topk_group=1,
                                        bias_update_rate=0.0, shared_gate=True))
  with pytest.raises(TypeError, match=r"params is a list"):
    check_params([params], CONFIG)
  with pytest.raises(ValueError, match=r"router_bias has shape \(8,\) and dtype float32, "
                     r"expected shape \(16,\)"):
    check_router_bias(jnp.zeros(8), CONFIG)
  # Shapes are static: the checks run under jit as well.
  with pytest.raises(ValueError, match=r"router_bias has shape \(8,\)"):
    jax.jit(lambda b: check_router_bias(b, CONFIG))(jnp.zeros(8))
