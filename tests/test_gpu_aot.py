"""hiermoe_jax.gpu_aot: CUDA executables for a 2x8 H200 cluster, compiled on this CPU."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from helpers import skip_without_gpu_aot

# The CUDA plugin registers compile-only devices with JAX_PLATFORMS=cpu (conftest).
skip_without_gpu_aot()

import hiermoe_jax as hm  # noqa: E402
from hiermoe_jax import gpu_aot, params as params_lib  # noqa: E402
from hiermoe_jax.config import ConfigError  # noqa: E402

NODES, LOCAL = 2, 8
NODE_GROUPS = [[l, LOCAL + l] for l in range(LOCAL)]  # same local index, each process
LOCAL_GROUPS = [list(range(n * LOCAL, (n + 1) * LOCAL)) for n in range(NODES)]


@pytest.fixture(scope="module")
def mesh():
  return gpu_aot.mesh("h200", NODES, LOCAL)


@pytest.mark.parametrize("gpu", sorted(gpu_aot.GPUS))
def test_target_config_parses(gpu):
  devices = gpu_aot.mesh(gpu, 1, 2).devices.flat
  assert [d.device_kind for d in devices] == [gpu_aot.GPUS[gpu].description] * 2


def test_mesh_is_nodes_processes_of_local_devices(mesh):
  assert mesh.axis_names == ("node", "local")
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert mesh.devices.size == 16
  assert [[d.process_index for d in row] for row in mesh.devices] == [[0] * 8, [1] * 8]
  assert [[d.id for d in row] for row in mesh.devices] == LOCAL_GROUPS


def test_collectives_and_memory_of_two_tier_all_to_all(mesh):
  def body(x):
    x = jax.lax.all_to_all(x, "node", 0, 0, tiled=True)
    return jax.lax.all_to_all(x, "local", 0, 0, tiled=True)

  rows = NamedSharding(mesh, P(("node", "local")))
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(("node", "local")),
                            out_specs=P(("node", "local"))))
  compiled = f.lower(jax.ShapeDtypeStruct((16 * 64, 256), jnp.bfloat16, sharding=rows)).compile()

  found = gpu_aot.collectives(compiled, mesh)
  assert [(c["kind"], c["replica_groups"], c["label"]) for c in found] == [
      ("all-to-all", NODE_GROUPS, "inter-node"), ("all-to-all", LOCAL_GROUPS, "intra-node")]
  per_device = 64 * 256 * 2  # bf16 rows of one device
  assert all(c["operand_bytes"] == c["result_bytes"] == per_device for c in found)

  memory = gpu_aot.memory(compiled, "h200")
  assert set(memory) == {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                         "total_bytes", "device_bytes"}
  assert memory["argument_bytes"] == memory["output_bytes"] == per_device
  assert memory["total_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                   - memory["alias_bytes"] + memory["temp_bytes"]) > 0
  assert memory["device_bytes"] == 141 * 2 ** 30


def test_moe_hier_dedup_stages_on_h200(mesh):
  config = hm.MoEConfig(d_model=256, d_ff=512, num_experts=16, top_k=4,
                        dispatch="hier_dedup", dtype="bfloat16")
  params = jax.tree.map(
      lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.float32,
                                               sharding=NamedSharding(mesh, spec)),
      params_lib.param_shapes(config), params_lib.param_specs(config),
      is_leaf=lambda x: isinstance(x, tuple))
  x = jax.ShapeDtypeStruct((16 * 64, 256), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(("node", "local"))))
  f = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh))
  compiled = f.lower(params, x).compile()

  a2a = [c for c in gpu_aot.collectives(compiled, mesh) if c["kind"] == "all-to-all"]
  tiers = [{"inter-node": "node", "intra-node": "local"}[c["label"]] for c in a2a]
  for c, tier in zip(a2a, tiers):
    assert c["replica_groups"] == (NODE_GROUPS if tier == "node" else LOCAL_GROUPS), c
  # Stage 1 (across nodes) runs first and its reverse last; stage 2 between them.
  assert tiers[0] == tiers[-1] == "node" and "local" in tiers[1:-1], tiers
  memory = gpu_aot.memory(compiled, "h200")
  assert 0 < memory["total_bytes"] < memory["device_bytes"]


@pytest.mark.parametrize("attrs, groups", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups={}, to_apply=%add", [[0, 1, 2, 3]]),
    ("replica_groups=[2,2]<=[4], dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", [[0, 2], [1, 3]]),
    ("source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
])
def test_replica_group_formats(attrs, groups):
  assert gpu_aot.replica_groups(attrs, 4) == groups


def test_iota_groups_of_a_2x8_mesh():
  assert gpu_aot.replica_groups("replica_groups=[2,8]<=[16]", 16) == LOCAL_GROUPS
  assert gpu_aot.replica_groups("replica_groups=[8,2]<=[2,8]T(1,0)", 16) == NODE_GROUPS


def test_shape_bytes():
  assert gpu_aot.shape_bytes("((bf16[64,256]{1,0}), bf16[64,256]{1,0})") == 2 * 64 * 256 * 2
  assert gpu_aot.shape_bytes("(f32[], u32[], token[])") == 8
  assert gpu_aot.shape_bytes("f8e4m3fn[10]{0}") == 10


def test_errors_name_the_argument(monkeypatch):
  with pytest.raises(ConfigError, match=r"gpu='a100' is invalid: must be one of \('h100'"):
    gpu_aot.mesh("a100", 2, 8)
  with pytest.raises(ConfigError, match=r"nodes=0 is invalid: must be an integer >= 1"):
    gpu_aot.mesh("h200", 0, 8)
  with pytest.raises(ConfigError, match=r"gpu='v100' is invalid"):
    gpu_aot.memory(None, "v100")
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "jax_cuda12_plugin" else find_spec(name, *a))
  with pytest.raises(ConfigError, match=r'jax-cuda12-plugin, which is not installed: '
                                        r'pip install -e "\.\[gpu-aot\]"') as error:
    gpu_aot.mesh("h200", 2, 8)
  assert "\n" not in str(error.value)


def test_replica_groups_read_the_named_mesh_form():
  """XLA may print groups as a named mesh, its device ids an iota, and the axes spanned."""
  attrs = ("replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) "
           "{'axis_0'}, dimensions={0}")
  assert gpu_aot.replica_groups(attrs, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert gpu_aot.replica_groups("replica_groups=mesh['a'=4,'b'=2] {'b'}", 8) == [
      [0, 1], [2, 3], [4, 5], [6, 7]]
