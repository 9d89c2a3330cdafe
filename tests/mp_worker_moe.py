"""One process of the multi-process MoE test (run through scripts/launch.py).

  python scripts/launch.py --processes 2 --local-devices 4 -- \
      python tests/mp_worker_moe.py OUT.npz [STRATEGY ...]

Runs the given dispatch strategies (default: all) on the (process_count x local_device_count) mesh with
the inputs of `inputs()`, gathers each globally sharded output and, on process 0,
writes them to OUT.npz keyed by strategy. tests/test_multiprocess.py imports
`inputs`/`run` to compute the same thing in one process.
"""

import sys

import numpy as np

CONFIG = dict(d_model=32, d_ff=64, num_experts=16, top_k=4, dropless=True)
TOKENS_PER_DEVICE = 32


def inputs(mesh, config):
  """Params (seed 0) and tokens x [T, D] (seed 1), sharded over the mesh."""
  import jax
  import hiermoe_jax as hm
  from hiermoe_jax import mesh as mesh_lib

  params = hm.init_params(jax.random.key(0), config, mesh)
  shape = (mesh.size * TOKENS_PER_DEVICE, config.d_model)
  x_np = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
  sharding = mesh_lib.named(mesh, mesh_lib.sharded_rows(2))
  x = jax.make_array_from_callback(shape, sharding, lambda index: x_np[index])
  return params, x


def run(mesh, strategies=None) -> dict[str, np.ndarray]:
  """{strategy: y} with y gathered to a host numpy array on every process."""
  import jax
  from jax.experimental import multihost_utils
  import hiermoe_jax as hm
  from hiermoe_jax.config import STRATEGIES

  base = hm.MoEConfig(**CONFIG)
  params, x = inputs(mesh, base)
  out = {}
  for name in strategies or STRATEGIES:
    config = base.replace(dispatch=name)
    y, _ = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh))(params, x)
    out[name] = np.asarray(multihost_utils.process_allgather(y, tiled=True))
  return out


def main(path: str, strategies: list[str]) -> None:
  from hiermoe_jax import distributed
  distributed.initialize()  # before anything touches JAX devices

  import jax
  import hiermoe_jax as hm

  mesh = hm.make_mesh()
  print(f"process {jax.process_index()}/{jax.process_count()}: mesh {dict(mesh.shape)}, "
        f"{jax.local_device_count()} local devices", flush=True)
  out = run(mesh, strategies)
  if jax.process_index() == 0:
    np.savez(path, **out)
    print(f"wrote {sorted(out)} to {path}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
