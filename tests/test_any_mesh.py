"""The block in a mesh with more axes than its expert hierarchy (docs/design.md,
section 2): tokens split over the batch axes too, experts replicated over them or
split tensor-parallel over a tensor axis. Outputs and gradients equal the dense
reference on 8 CPU devices arranged as (2, 2, 2)."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import AxisType

import hiermoe_jax as hm
from hiermoe_jax.errors import ConfigError
from hiermoe_jax.mesh import MeshShape
from helpers import assert_trees_close, check_against_reference, router_config

# (mesh axes, expert_axes, tensor_axis, batch_axes)
ROLES = {
    "data+hierarchy": (("data", "node", "local"), ("node", "local"), None, None),
    "expert+tensor": (("data", "expert", "tensor"), ("expert",), "tensor", None),
    "hierarchy+tensor": (("node", "local", "tensor"), ("node", "local"), "tensor", None),
    "reversed, replicated": (("a", "b", "c"), ("c", "a"), None, ()),
}


def _mesh(names):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  return jax.make_mesh((2, 2, 2), names, axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:8])


# Each case compiles a forward and backward pass, so the matrix keeps what differs:
# the flat and hierarchical dedup paths and auto in one role, one path in the others
# (hier_dedup where the hierarchy has two axes; a one-axis hierarchy is flat).
CASES = ([("data+hierarchy", s) for s in ("flat_dedup", "hier_dedup", "auto")]
         + [("expert+tensor", "flat_dedup"), ("hierarchy+tensor", "hier_dedup"),
            ("reversed, replicated", "hier_dedup")])


@pytest.mark.parametrize("role,strategy", CASES)
def test_block_in_a_larger_mesh_equals_the_reference(role, strategy):
  names, expert_axes, tensor_axis, batch_axes = ROLES[role]
  mesh = _mesh(names)
  config = router_config("softmax", dispatch=strategy, expert_axes=expert_axes,
                         tensor_axis=tensor_axis, batch_axes=batch_axes)
  check_against_reference(config, mesh)


def test_a_one_axis_hierarchy_is_flat_and_its_inter_hop_is_local():
  mesh = _mesh(("data", "expert", "tensor"))
  shape = MeshShape.of(mesh, ("expert",), tensor_axis="tensor")
  assert (shape.nodes, shape.local, shape.batch, shape.tensor) == (1, 2, 2, 2)
  assert shape.tier_axes("inter") == () and shape.tier_axes("flat") == ("expert",)
  assert shape.token_axes == ("data", "expert")


def test_capacity_drops_in_a_larger_mesh_match_the_hierarchy_alone():
  """Each (data) group exchanges its own tokens: with capacities, the drops of the
  (2, 2, 2) block are those of the 2x2 block run on each group's tokens."""
  names, expert_axes = ("data", "node", "local"), ("node", "local")
  mesh = _mesh(names)
  config = router_config("softmax", dispatch="hier_dedup", expert_axes=expert_axes,
                         dropless=False, capacity_factor=0.5)
  params = hm.init_params(jax.random.key(0), config, mesh)
  x = jax.random.normal(jax.random.key(1), (8 * 8, config.d_model))
  _, aux = hm.moe_apply(params, x, config=config, mesh=mesh)
  small = jax.make_mesh((2, 2), expert_axes, axis_types=(AxisType.Auto,) * 2,
                        devices=jax.devices()[:4])
  small_params = jax.tree.map(lambda a: jax.device_put(a, jax.sharding.NamedSharding(
      small, jax.sharding.PartitionSpec(*a.sharding.spec))), params)
  halves = [hm.moe_apply(small_params, x[i * 32:(i + 1) * 32], config=config, mesh=small)[1]
            for i in range(2)]
  assert int(aux.dropped) == sum(int(a.dropped) for a in halves) > 0


def test_bad_roles_are_clear_errors():
  mesh = _mesh(("data", "node", "local"))
  with pytest.raises(ConfigError, match="tensor_axis='model'.*not in the mesh"):
    hm.init_params(jax.random.key(0), router_config("softmax", tensor_axis="model"), mesh)
  with pytest.raises(ConfigError, match="MoEConfig.tensor_axis='node' is invalid"):
    router_config("softmax", tensor_axis="node")
  with pytest.raises(ConfigError, match="MoEConfig.batch_axes=.*is invalid"):
    router_config("softmax", batch_axes=("node",))
  config = router_config("softmax", expert_axes=("node", "local"), tensor_axis="data", d_ff=25)
  with pytest.raises(ConfigError, match="MoEConfig.d_ff=25 is invalid: must be a multiple of "
                                        "the 2 devices of tensor_axis='data'"):
    hm.init_params(jax.random.key(0), config, mesh)


def test_shells_in_a_larger_mesh_equal_the_functional_core():
  """hm.MoE (NNX) and hm.linen.MoE in a (data, expert, tensor) mesh: variables on
  the mesh with their roles' specs, outputs equal to moe_apply on the same weights."""
  from flax import linen as nn
  from flax import nnx
  mesh = _mesh(("data", "expert", "tensor"))
  config = router_config("softmax", dispatch="flat_dedup", expert_axes=("expert",),
                         tensor_axis="tensor")
  x = jax.random.normal(jax.random.key(1), (16, config.d_model))
  layer = hm.MoE(config, mesh=mesh, rngs=nnx.Rngs(0))
  params = jax.tree.map(lambda p: p[...], layer.params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert params["experts"]["gate"].sharding.spec == jax.sharding.PartitionSpec(
      ("expert",), None, "tensor")
  y = layer(x)
  y_core, _ = hm.moe_apply(params, x, config=config, mesh=mesh)
  assert_trees_close(y, y_core)
  module = hm.linen.MoE(config, mesh)
  variables = module.init(jax.random.key(0), x)
  y_linen, _ = module.apply(variables, x, mutable=["intermediates"])
  assert nn.unbox(variables["params"])["experts/down"].sharding.spec == (
      jax.sharding.PartitionSpec(("expert",), "tensor", None))
  assert y_linen.shape == x.shape
