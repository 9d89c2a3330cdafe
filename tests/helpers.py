"""Shared test utilities: meshes, configs, random inputs, value+grad closures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm

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


def random_inputs(config, mesh, *, tokens_per_device=8, seed=0):
  """Params, x [devices * tokens_per_device, D], a random placement and router bias."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = hm.init_params(keys[0], config, mesh)
  devices = mesh.devices.size
  x = jax.random.normal(keys[1], (devices * tokens_per_device, config.d_model))
  placement = jax.random.permutation(keys[2], config.num_experts).astype(jnp.int32)
  bias = 0.1 * jax.random.normal(keys[3], (config.num_experts,))
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
