"""Shared test utilities: meshes, configs, random inputs, value+grad closures."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax.dispatch import get_strategy
from hiermoe_jax.dispatch.capacity import capacities
from hiermoe_jax.mesh import MeshShape
from bruteforce import simulate

MESHES = {"1x1": (1, 1), "1x8": (1, 8), "2x4": (2, 4), "4x2": (4, 2), "8x1": (8, 1)}


def mesh_of(name: str):
  nodes, local = MESHES[name]
  if jax.device_count() < nodes * local:
    pytest.skip(f"needs {nodes * local} devices, have {jax.device_count()}")
  return hm.make_mesh(nodes, local, devices=jax.devices()[: nodes * local])


def router_config(router: str, **overrides) -> hm.MoEConfig:
  """Small configs for both routers; the softmax one has a gated shared expert."""
  if router == "softmax":
    base = dict(d_model=16, d_ff=24, num_experts=16, top_k=4, router="softmax",
                norm_topk_prob=True, n_shared_experts=1, shared_d_ff=20, shared_gate=True)
  else:
    base = dict(d_model=16, d_ff=24, num_experts=16, top_k=4, router="sigmoid_grouped",
                n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                n_shared_experts=2, shared_d_ff=8)
  return hm.MoEConfig(**{**base, "dropless": True, **overrides})


def random_inputs(config, mesh, *, tokens_per_device=8, seed=0, bias_scale=0.1):
  """Params, x [devices * tokens_per_device, D], a random placement and router bias
  (a large bias_scale skews the routing towards a few experts)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = hm.init_params(keys[0], config, mesh)
  devices = mesh.devices.size
  x = jax.random.normal(keys[1], (devices * tokens_per_device, config.d_model))
  placement = jax.random.permutation(keys[2], config.num_experts).astype(jnp.int32)
  bias = bias_scale * jax.random.normal(keys[3], (config.num_experts,))
  return params, x, placement, bias


def loss_and_output(apply_fn, cotangent):
  """A scalar loss sum(y * cotangent) whose gradients exercise the full VJP."""
  def fn(params, x):
    y = apply_fn(params, x)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y
  return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)


def assert_trees_close(actual, expected, *, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float32),
                                                       np.asarray(e, np.float32),
                                                       rtol=rtol, atol=atol),
               actual, expected)


def check_against_reference(config, mesh, *, tokens_per_device=8, seed=0, kept_fn=None,
                            bias_scale=0.1):
  """moe_apply (jitted, with a random placement and router bias) equals the dense
  reference in outputs and gradients; kept_fn gives the reference the kept pairs."""
  params, x, placement, bias = random_inputs(config, mesh, tokens_per_device=tokens_per_device,
                                             seed=seed, bias_scale=bias_scale)
  cot = jax.random.normal(jax.random.key(seed + 7), x.shape)
  run = jax.jit(loss_and_output(
      lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh, placement=placement,
                                router_bias=bias)[0], cot))
  (_, y), grads = run(params, x)
  kept = None if kept_fn is None else kept_fn(params, x, placement, bias)
  ref = jax.jit(loss_and_output(
      lambda p, x: hm.reference_moe(p, x, config, placement=placement, router_bias=bias,
                                    kept_TK=kept), cot))
  (_, y_ref), grads_ref = ref(params, x)
  assert_trees_close(y, y_ref)
  assert_trees_close(grads, grads_ref)


def bruteforce_kept(config, mesh, tokens_per_device):
  """kept_fn for check_against_reference: the pairs an independent loop simulation keeps."""
  shape = MeshShape.of(mesh)
  caps = capacities(get_strategy(config.dispatch), tokens=tokens_per_device,
                    top_k=config.top_k, num_experts=config.num_experts, shape=shape,
                    capacity_factor=config.capacity_factor, dropless=config.dropless)

  def kept_fn(params, x, placement, bias):
    routing = hm.reference.reference_routing(params, x, config, bias)
    slot_of = np.argsort(np.asarray(placement))
    slots = slot_of[np.asarray(routing.ids_TK)].reshape(shape.devices, tokens_per_device, -1)
    sim = simulate(slots.tolist(), strategy=config.dispatch, nodes=shape.nodes,
                   local=shape.local, num_experts=config.num_experts, hop_caps=caps.hops,
                   expert_cap=caps.expert, pair_cap=None if config.dropless else caps.pairs)
    return jnp.asarray(np.array(sim["kept"]).reshape(-1, config.top_k)), sim
  return kept_fn


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for a subprocess of the suite: `devices` simulated CPU devices and this
  process's other XLA flags (conftest's compile flags), so that it compiles the same
  programs and shares their persistent-cache entries."""
  count = "--xla_force_host_platform_device_count"
  rest = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
  return " ".join([f"{count}={devices}", *rest])


def shared_dir(tmp_path_factory) -> pathlib.Path:
  """A directory of this pytest session that every xdist worker sees."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def skip_without_gpu_aot():
  """Skips the calling test module when the gpu-aot extra (the CUDA plugin, which
  compiles for compile-only GPU devices) is not installed."""
  for module in ("jax_plugins.xla_cuda12", "jax_cuda12_plugin"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} is not installed (pip install -e '.[gpu-aot]')",
                  allow_module_level=True)
